"""compare: did domain-adaptive pretraining help? General vs domain over seeds, with a TF-IDF reference.

Reads every `finetune` run named in params (variants x seeds), reports mean +- std per variant, the paired
per-seed difference domain - general (and domain - domain_novocab: the vocabulary's share), a TF-IDF + logistic-regression baseline trained on the same split,
and the pretraining and tokenizer numbers that explain the result. Writes `reports/comparison.md`,
`reports/comparison.png` and `metrics/compare.json`.

Run: `dvc repro compare` (or `python -m stages.compare`).
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
from pydantic import Field  # noqa: E402
from scipy import stats  # noqa: E402
from sklearn.feature_extraction.text import TfidfVectorizer  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402

from stages import tracking  # noqa: E402
from stages.common import Paths, Section, atomic_path, load_params, load_paths, log, read_jsonl, \
    setup_logging, write_json, write_text  # noqa: E402
from stages.finetune import FinetuneParams, scores  # noqa: E402

METRICS = ("test_macro_f1", "test_accuracy")


class CompareParams(Section):
    tfidf_max_features: int = Field(ge=100)
    tfidf_c: float = Field(gt=0)
    bootstrap_resamples: int = Field(2000, ge=100)
    seed: int = 0


# ---------------------------------------------------------------------------------------------------
# pure helpers


def mean_std(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def summarise(runs: dict[str, dict[int, dict]]) -> dict[str, dict[str, dict[str, float]]]:
    """variant -> metric -> mean/std/n over seeds."""
    return {v: {m: mean_std([r[m] for r in by_seed.values()]) for m in METRICS} for v, by_seed in runs.items()}


def paired_difference(runs: dict[str, dict[int, dict]], a: str, b: str, metric: str) -> dict[str, float]:
    """Per-seed a - b on the seeds both variants share: mean, std, wins, a paired t-test and its 95% CI."""
    seeds = sorted(set(runs[a]) & set(runs[b]))
    diffs = [runs[a][s][metric] - runs[b][s][metric] for s in seeds]
    out = {**mean_std(diffs), "wins": sum(d > 0 for d in diffs), "diffs": diffs, "p_value": 1.0,
           "ci_low": float("-inf"), "ci_high": float("inf")}
    if len(diffs) > 1 and out["std"] > 0:
        test = stats.ttest_1samp(diffs, 0.0)  # on the per-seed differences: the paired t-test
        ci = test.confidence_interval(0.95)
        out.update(p_value=float(test.pvalue), ci_low=float(ci.low), ci_high=float(ci.high))
    elif len(diffs) > 1:  # identical differences on every seed: no spread to test against
        out.update(p_value=0.0 if out["mean"] else 1.0, ci_low=out["mean"], ci_high=out["mean"])
    return out


def macro_f1_resampled(y_true: np.ndarray, y_pred: np.ndarray, weights: np.ndarray, n_classes: int) -> np.ndarray:
    """Macro-F1 of each bootstrap resample, given as example counts (`weights`, resamples x examples).

    Matches scikit-learn's macro average: classes absent from both the labels and the predictions of a resample
    do not count."""
    true = np.eye(n_classes)[y_true]  # examples x classes
    pred = np.eye(n_classes)[y_pred]
    tp, n_true, n_pred = weights @ (true * pred), weights @ true, weights @ pred
    present = (n_true + n_pred) > 0
    f1 = np.divide(2 * tp, n_true + n_pred, out=np.zeros_like(tp), where=present)
    return (f1 * present).sum(1) / present.sum(1)


def paired_bootstrap(labels: list[str], preds_a: list[list[str]], preds_b: list[list[str]], resamples: int,
                     seed: int) -> dict[str, float]:
    """Macro-F1 of a - b (averaged over seeds) with a 95% percentile interval and a two-sided p-value from
    resampling test examples with replacement; the same resample for every seed and both variants (paired)."""
    classes = sorted(set(labels) | {p for ps in (*preds_a, *preds_b) for p in ps})
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[c] for c in labels])
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(len(y), np.full(len(y), 1 / len(y)), size=resamples).astype(float)
    full = np.ones((1, len(y)))
    diff = np.zeros(resamples)
    observed = 0.0
    for pa, pb in zip(preds_a, preds_b, strict=True):
        a, b = np.array([index[c] for c in pa]), np.array([index[c] for c in pb])
        diff += macro_f1_resampled(y, a, weights, len(classes)) - macro_f1_resampled(y, b, weights, len(classes))
        observed += float(macro_f1_resampled(y, a, full, len(classes))[0]
                          - macro_f1_resampled(y, b, full, len(classes))[0])
    diff /= len(preds_a)
    observed /= len(preds_a)
    p = min(1.0, 2 * min((diff <= 0).mean(), (diff >= 0).mean()))
    return {"mean": observed, "ci_low": float(np.percentile(diff, 2.5)), "ci_high": float(np.percentile(diff, 97.5)),
            "p_value": float(p), "resamples": resamples}


def verdict(diff: dict[str, float], alpha: float = 0.05) -> str:
    """One honest sentence: significant at `alpha` (by `diff["method"]`, a paired t-test over seeds unless
    stated), with the effect size and its interval, or not a result."""
    mean, n = diff["mean"], diff["n"]
    stats_text = (f"domain - general macro-F1 = {mean:+.3f} (95% CI {diff['ci_low']:+.3f} to {diff['ci_high']:+.3f}, "
                  f"{diff.get('method', 'paired t-test')} p = {diff['p_value']:.3f}, domain better in "
                  f"{diff['wins']}/{n} seeds)")
    if n < 2 or diff["p_value"] >= alpha:
        return f"No significant difference between the domain-adapted and the general model: {stats_text}."
    word = "better" if mean > 0 else "worse"
    return f"The domain-adapted model is significantly {word}: {stats_text}."


def tfidf_baseline(train: list[dict], test: list[dict], p: CompareParams) -> dict[str, float]:
    """Word uni+bigram TF-IDF with class-balanced logistic regression: the bar a neural model must clear."""
    clf = make_pipeline(
        TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, max_features=p.tfidf_max_features),
        LogisticRegression(C=p.tfidf_c, class_weight="balanced", max_iter=2000),
    )
    clf.fit([ex["text"] for ex in train], [ex["label"] for ex in train])
    pred = clf.predict([ex["text"] for ex in test]).tolist()
    labels = sorted({ex["label"] for ex in train})
    index = {label: i for i, label in enumerate(labels)}
    return {f"test_{k}": v for k, v in scores([index[ex["label"]] for ex in test], [index[y] for y in pred]).items()}


def plot(summary: dict, runs: dict[str, dict[int, dict]], tfidf: dict[str, float], path: Path) -> None:
    """Bars (mean +- std) per variant with each seed as a dot; the TF-IDF score as a dashed line."""
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.5 * len(METRICS), 3.8))
    variants = list(summary)
    for ax, metric in zip(axes, METRICS, strict=True):
        means = [summary[v][metric]["mean"] for v in variants]
        stds = [summary[v][metric]["std"] for v in variants]
        ax.bar(variants, means, yerr=stds, capsize=6, color=["#8da0cb", "#fc8d62", "#66c2a5"][: len(variants)])
        for i, v in enumerate(variants):
            ys = [r[metric] for r in runs[v].values()]
            ax.scatter([i] * len(ys), ys, color="black", s=12, zorder=3)
        ax.axhline(tfidf[metric], linestyle="--", color="grey", label="TF-IDF + LR")
        ax.set_title(metric.replace("test_", "test ").replace("_", "-"))
        ax.set_ylim(0, 1)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def report(summary: dict, diff: dict, tfidf: dict, extra: dict[str, dict], vocab: dict | None = None,
           seed_test: dict | None = None) -> str:
    """The markdown report: verdict first, then the table, then what explains it.

    `extra`: `pretrain_<variant>` and `adapt_tokenizer` metrics; `vocab`: domain - domain_novocab, when run.
    """
    lines = ["# General vs domain-adapted model\n", f"**{verdict(diff)}**\n"]
    pre = extra.get("pretrain_domain")
    if pre and pre["stop_reason"] == "max_steps" and pre["best_step"] == pre["steps"]:
        lines.append(f"Pretraining hit its step limit ({pre['steps']} steps) with domain validation loss still "
                     "falling: this measures a short adaptation, not a converged one.\n")
    lines += ["| variant | seeds | test macro-F1 | test accuracy |", "|---|---|---|---|"]
    for v, s in summary.items():
        f1, acc = s["test_macro_f1"], s["test_accuracy"]
        lines.append(f"| {v} | {f1['n']} | {f1['mean']:.3f} +- {f1['std']:.3f} | {acc['mean']:.3f} +- {acc['std']:.3f} |")
    lines.append(f"| TF-IDF + LR (reference) | - | {tfidf['test_macro_f1']:.3f} | {tfidf['test_accuracy']:.3f} |")
    if seed_test is not None and seed_test is not diff:
        lines += ["", f"Over seeds alone (paired t-test on the {seed_test['n']} per-seed differences): 95% CI "
                  f"{seed_test['ci_low']:+.3f} to {seed_test['ci_high']:+.3f}, p = {seed_test['p_value']:.3f}."]
    lines += ["", "Per-seed domain - general macro-F1: " + ", ".join(f"{d:+.3f}" for d in diff["diffs"]) + ".",
              "Seeds vary fine-tuning only: the domain model comes from one pretraining run.", ""]
    if vocab:
        lines += [f"Gain from the new vocabulary (domain - domain_novocab, the same pretraining without it): macro-F1 "
                  f"{vocab['mean']:+.3f} (95% CI {vocab['ci_low']:+.3f} to {vocab['ci_high']:+.3f}, paired t-test "
                  f"p = {vocab['p_value']:.2f}, domain better in {vocab['wins']}/{vocab['n']} seeds).", ""]
    lines += ["![comparison](comparison.png)", ""]
    pretrained = {k.removeprefix("pretrain_"): m for k, m in extra.items() if k.startswith("pretrain_")}
    if pretrained:
        lines += ["## Continued pretraining", "",
                  "| variant | steps | stopped | best step | tokens seen | seconds | validation | loss start | best | end |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for v, m in pretrained.items():
            for name in ("domain", "general"):
                lines.append(f"| {v} | {m['steps']} | {m['stop_reason']} | {m['best_step']} | {m['tokens_seen']:,} | "
                             f"{m['seconds']:.0f} | {name} | {m[f'{name}_loss_start']:.3f} | "
                             f"{m[f'{name}_loss_best']:.3f} | {m[f'{name}_loss_end']:.3f} |")
        lines.append("")
    tok = extra.get("adapt_tokenizer")
    if tok:
        lines += ["## Tokenizer", "", f"{tok['new_tokens']} domain tokens added (vocabulary {tok['base_vocab_size']} -> "
                  f"{tok['vocab_size']}).", "", "| text | tokens/word before | after | words in 3+ pieces before | after |",
                  "|---|---|---|---|---|"]
        for name in ("domain", "general"):
            lines.append(f"| {name} | {tok[f'{name}_tokens_per_word_before']:.3f} | {tok[f'{name}_tokens_per_word_after']:.3f}"
                         f" | {tok[f'{name}_split_3plus_before']:.1%} | {tok[f'{name}_split_3plus_after']:.1%} |")
        lines.append("")
    new = extra.get("new_tokens")
    if new:
        lines += [f"The {min(len(new), 20)} new tokens that save the most (all in `new_tokens.tsv`): " + ", ".join(
            f"`{r['token']}` ({int(r['frequency']):,}x, {r['base_pieces']} pieces before)" for r in new[:20]) + ".", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------


def run(p: CompareParams, fp: FinetuneParams, paths: Paths) -> None:
    """Collect the fine-tuning runs, compute the statistics, write report, plot and metrics."""
    with tracking.stage_run("compare", p):
        runs = {v: {s: json.loads((paths.finetune / f"{v}-{s}" / "metrics.json").read_text()) for s in fp.seeds}
                for v in fp.variants}
        summary = summarise(runs)
        task = {s: read_jsonl(paths.task / f"{s}.jsonl") for s in ("train", "test")}
        tfidf = tfidf_baseline(task["train"], task["test"], p)
        diff = paired_difference(runs, "domain", "general", "test_macro_f1") if {"domain", "general"} <= set(runs) \
            else paired_difference({"domain": {}, "general": {}}, "domain", "general", "test_macro_f1")
        seed_test = diff
        predictions = {(v, s): paths.finetune / f"{v}-{s}" / "predictions.jsonl" for v in runs for s in fp.seeds}
        if {"domain", "general"} <= set(runs) and all(f.exists() for f in predictions.values()):
            rows = {k: read_jsonl(f) for k, f in predictions.items()}
            labels = [r["label"] for r in rows[("general", fp.seeds[0])]]
            boot = paired_bootstrap(labels, [[r["pred"] for r in rows[("domain", s)]] for s in fp.seeds],
                                    [[r["pred"] for r in rows[("general", s)]] for s in fp.seeds],
                                    p.bootstrap_resamples, p.seed)
            diff = {**diff, **boot, "method": f"paired bootstrap over {len(labels):,} test texts x {len(fp.seeds)} "
                                              f"seeds,"}
        vocab = paired_difference(runs, "domain", "domain_novocab", "test_macro_f1") \
            if {"domain", "domain_novocab"} <= set(runs) else None
        names = ["adapt_tokenizer", *(f"pretrain_{v}" for v in fp.variants if v != "general")]
        extra = {name: json.loads((paths.metrics / f"{name}.json").read_text())
                 for name in names if (paths.metrics / f"{name}.json").exists()}
        if (paths.reports / "new_tokens.tsv").exists():
            extra["new_tokens"] = list(csv.DictReader((paths.reports / "new_tokens.tsv").open(encoding="utf-8"),
                                                      delimiter="\t"))

        plot(summary, runs, tfidf, paths.reports / "comparison.png")
        text = report(summary, diff, tfidf, extra, vocab, seed_test)
        write_text(paths.reports / "comparison.md", text)
        metrics = {
            **{f"{v}_{m.removeprefix('test_')}_{k}": s[m][k] for v, s in summary.items() for m in METRICS
               for k in ("mean", "std")},
            **{f"tfidf_{m.removeprefix('test_')}": v for m, v in tfidf.items()},
            "domain_minus_general_macro_f1_mean": diff["mean"],
            "domain_minus_general_macro_f1_std": diff["std"],
            "domain_minus_general_p_value": diff["p_value"],
            "domain_minus_general_ci_low": diff["ci_low"],
            "domain_minus_general_ci_high": diff["ci_high"],
            "domain_wins": diff["wins"],
            **({"domain_minus_novocab_macro_f1_mean": vocab["mean"], "domain_minus_novocab_p_value": vocab["p_value"]}
               if vocab else {}),
            "seeds": len(fp.seeds),
        }
        write_json(paths.metrics / "compare.json", metrics)
        tracking.log_metrics(metrics)
        mlflow.log_artifact(str(paths.reports / "comparison.md"))
        mlflow.log_artifact(str(paths.reports / "comparison.png"))
        log.info("compare: %s", verdict(diff))
        print(text)


def main() -> None:
    setup_logging()
    run(load_params("compare", CompareParams), load_params("finetune", FinetuneParams), load_paths())


if __name__ == "__main__":
    main()
