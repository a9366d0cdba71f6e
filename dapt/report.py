"""report: the comparison's figures, markdown and self-contained HTML, from numbers `compare` computed.

Pure rendering: no statistics are computed here and nothing is read from disk except the figures the HTML
embeds. Every figure is a PNG in `reports/figures/`; `comparison.md` links them and `comparison.html`
carries them inline (base64), so the HTML opens offline, from an e-mail or an MLflow artifact view.
"""

from __future__ import annotations

import base64
import math
import re
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and in CI
import markdown
import matplotlib.pyplot as plt
import numpy as np

from dapt.common import atomic_path, write_text

COLOURS = {"general": "#8da0cb", "domain": "#fc8d62", "domain_novocab": "#66c2a5", "tapt": "#e78ac3",
           "dapt_tapt": "#a6d854"}


@dataclass(frozen=True)
class Scoring:
    """How a task kind is scored and named: the table's test metrics (the first decides the verdict), their names,
    the word the verdict uses, what a bootstrap resamples, and the prefix of the headline's keys."""

    metrics: tuple[str, ...]
    names: tuple[str, ...]
    word: str
    unit: str
    short: str

    @property
    def primary(self) -> str:
        return self.metrics[0]


SCORING = {
    "sequence_classification": Scoring(("test_macro_f1", "test_accuracy"), ("macro-F1", "accuracy"), "macro-F1",
                                       "texts", "f1"),
    "token_classification": Scoring(("test_macro_f1", "test_accuracy"), ("entity macro-F1", "token accuracy"),
                                    "macro-F1", "sentences", "f1"),
    # BEIR's headline measure first; MRR@10 as MS MARCO reports it; Recall@100: what a re-ranker could still fix
    "retrieval": Scoring(("test_ndcg_at_10", "test_mrr_at_10", "test_recall_at_100"),
                         ("nDCG@10", "MRR@10", "Recall@100"), "nDCG@10", "queries", "ndcg"),
}
CLASSIFICATION = SCORING["sequence_classification"]
# what the budget's truncated share counts (compare's `truncated_split`): test texts, or a retrieval corpus's documents
TRUNCATED_UNITS = {"test": "test texts", "corpus": "corpus documents"}
METRICS = CLASSIFICATION.metrics


def save(fig, path: Path) -> None:
    """A figure to PNG, atomically."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------
# figures


def plot_scores(summary: dict, runs: dict[str, dict[int, dict]], references: dict[str, dict[str, float]],
                path: Path, scoring: Scoring = CLASSIFICATION, zero_shot: dict[str, dict] | None = None) -> None:
    """Bars (mean +- std over seeds) per variant with each seed as a dot; each reference (label -> scores,
    e.g. TF-IDF on the same text and on whole texts, BM25) as a grey line; each variant's zero-shot score (variant
    -> scores, retrieval) as a hollow marker on its bar."""
    zero_shot = zero_shot or {}
    fig, axes = plt.subplots(1, len(scoring.metrics), figsize=(4.5 * len(scoring.metrics), 3.8))
    variants = list(summary)
    for ax, metric, name in zip(axes, scoring.metrics, scoring.names, strict=True):
        means = [summary[v][metric]["mean"] for v in variants]
        stds = [summary[v][metric]["std"] for v in variants]
        ax.bar(variants, means, yerr=stds, capsize=6, color=[COLOURS.get(v, "#bbbbbb") for v in variants])
        for i, v in enumerate(variants):
            ys = [r[metric] for r in runs[v].values()]
            ax.scatter([i] * len(ys), ys, color="black", s=12, zorder=3)
            if v in zero_shot:
                ax.scatter([i], [zero_shot[v][metric]], marker="D", facecolors="none", edgecolors="black", s=40,
                           zorder=3, label="zero-shot (not fine-tuned)" if i == 0 else None)
        for (label, scores), style in zip(references.items(), ("--", ":", "-."), strict=False):  # at most two
            ax.axhline(scores[metric], linestyle=style, color="grey", label=label)
        if references or zero_shot:
            ax.legend(loc="lower right", fontsize=7)
        title = metric.replace("test_", "test ").replace("_", "-") if scoring.short == "f1" else f"test {name}"
        ax.set_title(title + " (mean +- std over seeds)")
        ax.set_ylim(0, 1)
        ax.tick_params(axis="x", labelsize=8)
    save(fig, path)


def plot_curve(points: list[dict], general: dict[str, float], path: Path, word: str = "macro-F1") -> None:
    """Downstream score (`word`: macro-F1, nDCG@10; mean +- std over seeds) against the tokens of DAPT behind each
    point; the general model as a band. Each point is labelled with its share of the steps and its device-hours."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    x = [p["tokens_seen"] for p in points]
    ax.errorbar(x, [p["mean"] for p in points], yerr=[p["std"] for p in points], marker="o", capsize=5,
                color=COLOURS["domain"], label="domain model after DAPT")
    for p in points:
        ax.annotate(f"{p['label']}\n{p['device_hours']:.2g} device-h", (p["tokens_seen"], p["mean"]),
                    textcoords="offset points", xytext=(0, 10), ha="center", fontsize=7)
    ax.axhline(general["mean"], color=COLOURS["general"], label="general model")
    ax.axhspan(general["mean"] - general["std"], general["mean"] + general["std"], color=COLOURS["general"], alpha=0.2)
    ax.set_xlabel("DAPT tokens seen")
    ax.set_ylabel(f"test {word}")
    ax.set_title("Adaptation curve: does more DAPT pay?")
    ax.legend(loc="lower right", fontsize=8)
    save(fig, path)


def plot_dapt_losses(curves: dict[str, list[dict]], path: Path) -> None:
    """Validation MLM loss on domain and general text over pretraining steps, one line per variant."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharex=True)
    for ax, text in zip(axes, ("domain", "general"), strict=True):
        for variant, rows in curves.items():
            ax.plot([r["step"] for r in rows], [r[f"{text}_loss"] for r in rows], marker=".",
                    color=COLOURS.get(variant), label=variant)
        ax.set_title(f"{text} validation text")
        ax.set_xlabel("step (head warm-up included)")
        ax.set_ylabel("MLM loss")
        ax.legend(fontsize=8)
    save(fig, path)


def plot_confusions(matrices: dict[str, np.ndarray], classes: list[str], path: Path) -> None:
    """Row-normalised confusion matrices (true class per row), predictions summed over seeds, one per variant."""
    fig, axes = plt.subplots(1, len(matrices), figsize=(4.2 * len(matrices) + 1, 4.4), squeeze=False)
    short = [c if len(c) <= 14 else c[:13] + "." for c in classes]
    for ax, (variant, m) in zip(axes[0], matrices.items(), strict=True):
        rows = m / np.maximum(m.sum(1, keepdims=True), 1)
        ax.imshow(rows, vmin=0, vmax=1, cmap="Blues")
        for i, j in np.ndindex(rows.shape):
            if m[i, j]:
                ax.text(j, i, f"{rows[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if rows[i, j] > 0.5 else "black")
        ax.set_xticks(range(len(classes)), short, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(classes)), short if ax is axes[0][0] else [], fontsize=7)
        ax.set_title(variant)
        ax.set_xlabel("predicted")
    axes[0][0].set_ylabel("true")
    save(fig, path)


def plot_fertility(tok: dict, path: Path) -> None:
    """Tokens per word and the share of words split into 3+ pieces, before and after tokenizer adaptation."""
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
    texts = ["domain", "general"]
    for ax, (key, title) in zip(axes, (("tokens_per_word", "tokens per word"),
                                       ("split_3plus", "words in 3+ pieces")), strict=True):
        xs = np.arange(len(texts))
        for offset, when in ((-0.2, "before"), (0.2, "after")):
            ax.bar(xs + offset, [tok[f"{t}_{key}_{when}"] for t in texts], width=0.4, label=f"{when} adaptation",
                   color="#bbbbbb" if when == "before" else COLOURS["domain"])
        ax.set_xticks(xs, [f"{t} text" for t in texts])
        ax.set_title(f"{title} (lower is better)")
        ax.legend(fontsize=8)
    save(fig, path)


# ---------------------------------------------------------------------------------------------------
# text


def fmt_p(p: float) -> str:
    """A p-value as printed: a bootstrap's 0 means below its resolution, not zero."""
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def fmt_ci(d: dict, digits: int = 3) -> str:
    return f"95% CI {d['ci_low']:+.{digits}f} to {d['ci_high']:+.{digits}f}"


def fmt_tokens(n: float) -> str:
    """A token count as read aloud: 307,200 -> 0.307M, 2e9 -> 2B."""
    if n >= 1e9:
        return f"{n / 1e9:.3g}B"
    return f"{n / 1e6:.3g}M" if n >= 1e4 else f"{n:,.0f}"


def reference_labels(references: dict[str, dict], max_len: int) -> dict[str, dict]:
    """compare's references (`same_text`, `whole_text`, `bm25`, `zero_shot_<variant>`) under the names the table
    and the figure give them."""
    names = {"same_text": f"TF-IDF + LR, same text as the transformers (first {max_len} tokens)",
             "whole_text": "TF-IDF + LR, whole text", "bm25": "BM25 (bm25s, whole documents, no training)"}
    return {names.get(key) or f"{key.removeprefix('zero_shot_')}, zero-shot (not fine-tuned)": r
            for key, r in references.items()}


def scores_table(summary: dict, references: dict[str, dict], metric_names: tuple[str, ...],
                 metrics: tuple[str, ...] = METRICS) -> list[str]:
    """Variant | seeds | mean +- std of each metric; the references (label -> scores) as the last rows."""
    lines = ["| variant | seeds | " + " | ".join(f"test {name}" for name in metric_names) + " |",
             "|---|---|" + "---|" * len(metrics)]
    for v, s in summary.items():
        lines.append(f"| {v} | {s[metrics[0]]['n']} | "
                     + " | ".join(f"{s[m]['mean']:.3f} +- {s[m]['std']:.3f}" for m in metrics) + " |")
    for label, r in references.items():
        lines.append(f"| {label} | - | " + " | ".join(f"{r[m]:.3f}" for m in metrics) + " |")
    return lines


def truncation_line(truncated: dict[str, dict], max_len: int, references: bool, token_task: bool,
                    unit: str | None = None) -> str:
    """What the transformers saw (the first `max_len` tokens, and how many test texts were longer) and what each
    TF-IDF reference saw. `truncated`: variant -> split -> share, and its `source` (run or base tokenizer);
    `unit`: what a split holds (texts, sentences, queries)."""
    unit = unit or ("sentences" if token_task else "texts")
    shares = {v: t["test"] for v, t in truncated.items()}
    if all(t["source"] != "run" for t in truncated.values()):
        which = "counted with the general model's tokenizer"
    elif len(set(shares.values())) == 1:
        which = "with every variant's tokenizer"
    else:
        which = ", ".join(f"{v} {s:.0%}" for v, s in shares.items()) + ": each variant's own tokenizer"
    docs = truncated["general"].get("corpus")
    one = {"queries": "query", "sentences": "sentence"}.get(unit, "text")
    line = (f"The transformers read the first {max_len} tokens of each {one}"
            + (" and document" if docs is not None else "") + " (special tokens included) and "
            f"nothing after: {shares['general']:.0%} of test {unit}"
            + (f" and {docs:.0%} of the corpus's documents" if docs is not None else "") + f" were longer ({which}).")
    if references:
        line += (" The first TF-IDF row was trained and tested on that same text (each text cut where the general "
                 f"model's {max_len}-token window ends), the second on whole texts: the gap between them is what the "
                 "cut costs a bag of words.")
    return line


def budget_line(b: dict) -> str:
    """The budget that ran beside the published recipe, in one paragraph; a warning when far below it."""
    parts = []
    if "dapt_tokens_seen" in b:
        bound = (f"{b['recipe_dapt_max_epochs']:g} epochs" if b["recipe_bound"] == "epochs"
                 else f"{fmt_tokens(b['recipe_dapt_max_tokens'])} tokens")
        parts.append(f"DAPT saw {fmt_tokens(b['dapt_tokens_seen'])} tokens ({b['dapt_corpus_epochs']:.3g} corpus "
                     f"epochs; the recipe trains {fmt_tokens(b['recipe_tokens'])} here: {bound})")
    low, high = b["recipe_learning_rate"]
    lr = "" if low <= b["finetune_learning_rate"] <= high else f", learning rate {b['finetune_learning_rate']:g}"
    truncated = "" if b["truncated_test"] is None else \
        f"; {b['truncated_test']:.0%} of {TRUNCATED_UNITS[b.get('truncated_split', 'test')]} truncated"
    epochs = f"{b['finetune_epochs']} epochs"
    if b.get("finetune_patience"):
        epochs = f"up to {epochs} (best on dev, patience {b['finetune_patience']}"
        epochs += f"; {b['finetune_epochs_run']:.2g} run on average)" if b.get("finetune_epochs_run") else ")"
    parts.append(f"fine-tuning {epochs} at {b['max_seq_length']} tokens{lr} (recipe: up to "
                 f"{b['recipe_epochs']} epochs, best on dev, patience {b['recipe_patience']}, "
                 f"{b['recipe_max_seq_length']} tokens, learning rate {low:g} to {high:g}{truncated})")
    facts = "; ".join(parts)
    facts = facts[0].upper() + facts[1:]
    name = "Budget" + (f" (profile {b['profile']})" if b.get("profile") else "")
    if b["far_below"]:
        return (f"**{name}: far below the published recipe.** {facts}. Read the verdict as a smoke test of the "
                "pipeline, not as evidence about DAPT.")
    return f"{name}: not far below the published recipe. {facts}."


def forgetting_section(probe: list[dict], gain: float, word: str = "macro-F1") -> list[str]:
    """General-text MLM loss and perplexity before and after DAPT, beside the downstream gain; every row compared
    with the first (`short` names it), and the notes only about rows the table has."""
    lines = ["## Forgetting probe: general text", "",
             f"Downstream gain of the domain model: {word} {gain:+.3f}. What DAPT did to general text, on the "
             "held-out general validation set (the same masked positions for every model):", "",
             f"| model | general MLM loss | perplexity | vs {probe[0]['short']} |", "|---|---|---|---|"]
    base = probe[0]["loss"]
    for row in probe:
        change = "-" if row is probe[0] else f"{row['loss'] - base:+.3f} ({(row['loss'] / base - 1):+.1%})"
        lines.append(f"| {row['name']} | {row['loss']:.3f} | {math.exp(min(row['loss'], 50)):,.1f} | {change} |")
    if probe[0].get("general_model"):
        notes = ["The general model is the base encoder with an MLM head trained alone for the head warm-up (the "
                 "base model may ship without one): the starting point of the base-vocabulary run (domain_novocab)."]
    else:
        notes = ["No general-model row: it is the starting point of the base-vocabulary run (domain_novocab), which "
                 f"was not pretrained here; the rows compare with {probe[0]['short']} instead (the base encoder with "
                 "the new vocabulary, its MLM head trained alone for the head warm-up)."]
    if any(row.get("variant") == "domain" for row in probe):
        notes.append("Losses under the adapted tokenizer average over its own, slightly different, tokens.")
    lines += ["", " ".join(notes)]
    if any(row["loss"] < row["start"] for row in probe if "start" in row):
        lines[-1] += (" General loss *fell* during DAPT: the MLM head was still learning, which hides any "
                      "forgetting of the encoder; read it as no measurable forgetting at this scale, not as a gain.")
    return [*lines, ""]


def curve_section(points: list[dict], general: dict, slope: dict | None, figure: str,
                  word: str = "macro-F1") -> list[str]:
    """The adaptation curve: one row per point with its compute, and what the last step of the curve says."""
    lines = ["## Adaptation curve", "",
             "Fine-tuning from intermediate DAPT checkpoints, with the same settings and seeds as the table above.",
             "", f"| DAPT | step | tokens seen | corpus epochs | device-hours (final: whole run) | test {word} "
             "| vs general (paired over seeds) |", "|---|---|---|---|---|---|---|"]
    for p in points:
        vs = f"{p['vs_general']['mean']:+.3f} ({p['vs_general']['wins']}/{p['vs_general']['n']} seeds better)"
        epochs = "-" if p.get("corpus_epochs") is None else f"{p['corpus_epochs']:.3g}"
        lines.append(f"| {p['label']} | {p['step']:,} | {p['tokens_seen']:,} | {epochs} | {p['device_hours']:.3g} "
                     f"({p['device']}) | {p['mean']:.3f} +- {p['std']:.3f} | {vs} |")
    lines.append(f"| general model | - | - | - | - | {general['mean']:.3f} +- {general['std']:.3f} | - |")
    if slope:
        lines += ["", f"**{slope['text']}**"]
    lines += ["", f"![adaptation curve]({figure})", ""]
    return lines


def comparison_markdown(verdict: str, summary: dict, diff: dict, references: dict[str, dict], extra: dict[str, dict],
                        vocab: dict | None, probe: list[dict], points: list[dict], slope: dict | None,
                        token_task: bool, budget: dict, truncated: dict[str, dict], max_len: int,
                        scoring: Scoring | None = None, contributions: list[dict] | None = None) -> str:
    """The comparison report: verdict first, the budget beside it, then the table, then what explains it.

    `diff`: domain - general (bootstrap, with the per-seed test as `seed_test`); `references`: compare's TF-IDF
    scores (`same_text`, `whole_text`) or, for retrieval, BM25's and each model's zero-shot scores; `extra`:
    `pretrain_<variant>`, `adapt_tokenizer` and `new_tokens`; `vocab`: domain - domain_novocab, when run; `budget`:
    compare's `budget`; `truncated`: variant -> split -> share of texts longer than `max_len` tokens; `scoring`: the
    task kind's metrics (`SCORING`); `contributions`: what DAPT and TAPT each add, when TAPT variants ran."""
    scoring = scoring or SCORING["token_classification" if token_task else "sequence_classification"]
    retrieval = scoring is SCORING["retrieval"]
    word = scoring.word
    head = ["# General vs domain-adapted model\n", f"**{verdict}**\n", budget_line(budget) + "\n"]
    pre = extra.get("pretrain_domain")
    if pre and pre["stop_reason"] == "max_steps" and pre["best_step"] == pre["steps"]:
        head.append(f"Pretraining hit its budget ({pre['steps']:,} steps, {pre['tokens_seen']:,} tokens, "
                    f"{pre['corpus_epochs']:.2f} corpus epochs) with domain validation loss still falling: this "
                    "measures a short adaptation, not a converged one.\n")
    head += scores_table(summary, reference_labels(references, max_len), scoring.names, scoring.metrics)
    head += ["", truncation_line(truncated, max_len, bool(references) and not retrieval, token_task, scoring.unit)]
    if retrieval:
        head += ["", "Each model is a bi-encoder (mean-pooled, cosine, exact search over the whole corpus) trained "
                 "with in-batch negatives; its zero-shot row is the same model before fine-tuning. BM25 is the "
                 "lexical reference (bm25s, whole documents). Measures by ir-measures, per query, then averaged."]
    if token_task:
        head += ["", "No TF-IDF reference: it is a sequence classifier. Entity macro-F1 is seqeval's, over entity "
                 "types; token accuracy counts every word's tag."]
    seed_test = diff["seed_test"]
    head += ["", f"Over seeds alone (paired t-test on the {seed_test['n']} per-seed differences): "
             f"{fmt_ci(seed_test)}, {fmt_p(seed_test['p_value'])}.",
             "", f"Per-seed domain - general {word}: " + ", ".join(f"{d:+.3f}" for d in diff["diffs"]) + ".",
             "Seeds vary fine-tuning only: the domain model comes from one pretraining run.", ""]
    if vocab:
        head += [f"Gain from the new vocabulary (domain - domain_novocab, the same pretraining without it): {word} "
                 f"{vocab['mean']:+.3f} ({fmt_ci(vocab)}, {vocab['method']} {fmt_p(vocab['p_value'])}, "
                 f"domain better in {vocab['wins']}/{vocab['n']} seeds).", ""]
    head += ["![scores per variant](figures/scores.png)", ""]

    sections = []
    if contributions:
        sections.append(contributions_section(contributions, word))
    if probe:
        sections.append(forgetting_section(probe, diff["mean"], word))
    if points:
        sections.append(curve_section(points, summary["general"][scoring.primary], slope,
                                      "figures/adaptation_curve.png", word))
    pretrained = {k.removeprefix("pretrain_"): m for k, m in extra.items() if k.startswith("pretrain_")}
    if pretrained:
        lines = ["## Continued pretraining", "",
                 "| variant | steps | stopped | best step | tokens seen | corpus epochs | seconds | validation "
                 "| loss start | best | end |",
                 "|---|---|---|---|---|---|---|---|---|---|---|"]
        for v, m in pretrained.items():
            for name in ("domain", "general"):
                text = "task dev" if name == "domain" and v in ("tapt", "dapt_tapt") else name  # TAPT's own
                lines.append(f"| {v} | {m['steps']} | {m['stop_reason']} | {m['best_step']} | {m['tokens_seen']:,} | "
                             f"{m['corpus_epochs']:.2f} | {m.get('seconds', float('nan')):.0f} | {text} | "
                             f"{m[f'{name}_loss_start']:.3f} | "
                             f"{m[f'{name}_loss_best']:.3f} | {m[f'{name}_loss_end']:.3f} |")
        sections.append([*lines, "", "![DAPT validation loss](figures/dapt_loss.png)", ""])
    if not retrieval:
        sections.append(["## Errors", "", "Row-normalised confusion matrices, test predictions of every seed together"
                         + (" (word tags)" if token_task else "") + ":", "",
                         "![confusion matrices](figures/confusion.png)", ""])
    tok = extra.get("adapt_tokenizer")
    if tok:
        lines = ["## Tokenizer", "", f"{tok['new_tokens']} domain tokens added (vocabulary {tok['base_vocab_size']} -> "
                 f"{tok['vocab_size']}).", "",
                 "| text | tokens/word before | after | words in 3+ pieces before | after |", "|---|---|---|---|---|"]
        for name in ("domain", "general"):
            lines.append(f"| {name} | {tok[f'{name}_tokens_per_word_before']:.3f} | "
                         f"{tok[f'{name}_tokens_per_word_after']:.3f}"
                         f" | {tok[f'{name}_split_3plus_before']:.1%} | {tok[f'{name}_split_3plus_after']:.1%} |")
        lines += ["", "![fertility](figures/fertility.png)", ""]
        new = extra.get("new_tokens")
        if new:
            lines += [f"The {min(len(new), 20)} new tokens that save the most (all in `new_tokens.tsv`): " + ", ".join(
                f"`{r['token']}` ({int(r['frequency']):,}x, {r['base_pieces']} pieces before)" for r in new[:20]) + ".",
                ""]
        sections.append(lines)
    return "\n".join([*head, *(line for section in sections for line in section)]) + "\n"


def contributions_section(rows: list[dict], word: str) -> list[str]:
    """What the domain corpus (DAPT) and the task's own text (TAPT) each add: one paired comparison per row
    (`label`, `a`, `b` and compare's bootstrap numbers)."""
    lines = ["## What the domain corpus and the task text each add", "",
             "DAPT: continued MLM on the domain corpus; TAPT: continued MLM on the task's own train text, unlabelled "
             "(Gururangan et al. 2020). Each row pairs two fine-tuned variants over the same test "
             "examples and seeds.", "",
             f"| what is added | comparison | {word} difference | 95% CI | p | seeds better |",
             "|---|---|---|---|---|---|"]
    lines.extend(f"| {r['label']} | {r['a']} - {r['b']} | {r['mean']:+.3f} | {r['ci_low']:+.3f} to "
                 f"{r['ci_high']:+.3f} | {fmt_p(r['p_value'])} | {r['wins']}/{r['n']} |" for r in rows)
    return [*lines, ""]


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f3f3f3}img{max-width:100%}
code{background:#f3f3f3;padding:0 3px}"""


def html_report(md_text: str, base: Path, title: str = "General vs domain-adapted model") -> str:
    """The markdown as one self-contained HTML page: every local image inlined as a data URI."""
    body = markdown.markdown(md_text, extensions=["tables"])

    def inline(match: re.Match) -> str:
        src = base / match.group(1)
        data = base64.b64encode(src.read_bytes()).decode("ascii")
        return f'src="data:image/png;base64,{data}"'

    body = re.sub(r'src="([^":]+\.png)"', inline, body)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>"
            f"<style>{CSS}</style></head>\n<body>\n{body}\n</body></html>\n")


def write_html(md_text: str, base: Path, path: Path) -> None:
    write_text(path, html_report(md_text, base))
