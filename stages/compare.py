"""compare: did domain-adaptive pretraining help, by how much, and at what cost?

Reads every `finetune` run named in params (variants x seeds) and the adaptation curve's runs
(`finetune_curve`: the domain model's pretraining snapshots), and reports:
- mean +- std per variant over seeds, the paired per-seed differences, and a paired bootstrap over test
  examples for domain - general (the verdict, the report's first line) and domain - domain_novocab; the
  measure is macro-F1 for classification, nDCG@10 (per query, by ir-measures) for retrieval (`report.SCORING`);
- with TAPT variants (`pretrain.tapt`), what the domain corpus and the task text each add: tapt - general,
  dapt_tapt - domain, dapt_tapt - tapt and dapt_tapt - general, by the same bootstrap;
- TF-IDF + logistic-regression references trained on the same split (sequence classification): one on the
  same text the transformers saw (each text cut where the base tokenizer's `max_seq_length` window ends), one
  on whole texts, so the gap between them is what the cut costs; for retrieval, BM25 (bm25s) and each model's
  zero-shot scores (before fine-tuning);
- the share of texts longer than `max_seq_length` per variant and split (from the fine-tuning runs, or counted
  here with the base tokenizer for runs that did not record it);
- the budget beside the published recipe (`RECIPE`): DAPT tokens, fine-tuning epochs and sequence length, and
  a warning right after the verdict when the run is far below it;
- the forgetting probe: general-text MLM loss and perplexity of the general and the adapted models;
- the adaptation curve: downstream score against DAPT tokens and device-hours, and whether the last stretch
  of DAPT still paid;
- the pretraining and tokenizer numbers that explain the result.
Writes `reports/comparison.md`, the self-contained `reports/comparison.html`, PNG figures in
`reports/figures/`, `metrics/compare.json` (every number), `metrics/headline.json` (the verdict's numbers: what
`dvc metrics show` prints) and `metrics/adaptation_curve.csv`; in MLflow, the stage's run is the comparison's
parent and every fine-tuning run it compares is a child, tagged variant and seed.

Run: `dvc repro compare` (or `python -m stages.compare`); `dvc metrics show` for the headline,
`dvc metrics show metrics/compare.json` for the rest.
"""

from __future__ import annotations

import csv
import json
import statistics
from dataclasses import asdict, dataclass
from typing import get_args

import mlflow
import numpy as np
from pydantic import Field
from scipy import stats
from seqeval.metrics.sequence_labeling import get_entities
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import confusion_matrix
from sklearn.pipeline import make_pipeline

from dapt import registry, report, tracking
from dapt.common import (
    Paths,
    Section,
    active_profile,
    atomic_path,
    load_params,
    load_paths,
    log,
    read_jsonl,
    setup_stage,
    write_json,
    write_text,
)
from dapt.finetuning import retrieval
from dapt.finetuning.tasks import load_tokenizer, scores, truncated
from dapt.report import SCORING, Scoring
from stages.finetune import SPLITS, FinetuneParams, TrainingParams, run_info_path, run_name
from stages.pretrain import PretrainParams, TaptVariant

METRICS = report.METRICS
Counts = tuple[np.ndarray, ...]  # per example (x class): true positives, true, predicted; or a retrieval score
# what each added pretraining contributes, when TAPT variants ran: (what is added, a, b), a - b
TAPT_VARIANTS = get_args(TaptVariant)
CONTRIBUTIONS = (("DAPT (domain corpus)", "domain", "general"), ("TAPT (task text)", "tapt", "general"),
                 ("TAPT after DAPT", "dapt_tapt", "domain"), ("DAPT before TAPT", "dapt_tapt", "tapt"),
                 ("DAPT + TAPT", "dapt_tapt", "general"))


class CompareParams(Section):
    tfidf_max_features: int = Field(ge=100)
    tfidf_c: float = Field(gt=0)
    bootstrap_resamples: int = Field(2000, ge=100)
    seed: int = 0


@dataclass(frozen=True)
class Recipe:
    """The published budget a run is measured against (`budget`)."""

    dapt_max_tokens: float        # DAPT stops at the first of these reached
    dapt_max_epochs: float
    learning_rate: tuple[float, float]
    epochs: int                   # fine-tuning: at most this many, the best on dev kept
    patience: int                 # ... stopping after this many epochs without dev improvement
    max_seq_length: int


RECIPE = Recipe(
    # Gururangan et al. 2020, "Don't Stop Pretraining" (ACL), sec. 3 and app. B: DAPT is 12.5k steps of
    # 2048 sequences of 512 tokens (~13B tokens, one to several passes over 2-8B-token domain corpora); TAPT
    # is 100 epochs of the (small) task text. Here: 2B tokens or 10 epochs of the corpus, the first reached
    dapt_max_tokens=2.0e9,
    dapt_max_epochs=10,
    # fine-tuning: Devlin et al. 2019 (BERT) app. A.3 search 2e-5..5e-5; Gururangan et al. 2020 app. B train
    # 10 epochs (3 on the largest tasks) with early stopping, patience 3 on dev, at 512 tokens (the models' limit)
    learning_rate=(2e-5, 5e-5),
    epochs=10,
    patience=3,
    max_seq_length=512,
)
# a run is "far below the recipe" (the report says so beside the verdict) when any of these holds
FAR_BELOW_DAPT_SHARE = 0.10     # DAPT saw under a tenth of the tokens the recipe trains on this corpus
FAR_BELOW_EPOCHS = 3            # fewer fine-tuning epochs than the recipe's patience: no early stopping
FAR_BELOW_TRUNCATED = 0.10      # over a tenth of test texts were cut: the task was judged on openings


# ---------------------------------------------------------------------------------------------------
# statistics


def mean_std(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def summarise(runs: dict[str, dict[int, dict]],
              metrics: tuple[str, ...] = METRICS) -> dict[str, dict[str, dict[str, float]]]:
    """variant -> metric -> mean/std/n over seeds."""
    return {v: {m: mean_std([r[m] for r in by_seed.values()]) for m in metrics} for v, by_seed in runs.items()}


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


def class_counts(labels: list[str], preds: list[str], classes: list[str]) -> Counts:
    """Sequence classification: one-hot true positives, true and predicted class per example."""
    index = {c: i for i, c in enumerate(classes)}
    true = np.eye(len(classes))[[index[c] for c in labels]]
    pred = np.eye(len(classes))[[index[c] for c in preds]]
    return true * pred, true, pred


def entity_counts(tags: list[list[str]], preds: list[list[str]], types: list[str]) -> Counts:
    """Token classification: per sentence and entity type, exactly matched, gold and predicted entities
    (seqeval's spans, so macro-F1 from these counts is seqeval's entity-level macro-F1)."""
    index = {t: i for i, t in enumerate(types)}
    tp, true, pred = (np.zeros((len(tags), len(types))) for _ in range(3))
    for i, (gold, guess) in enumerate(zip(tags, preds, strict=True)):
        g, p = set(get_entities(gold)), set(get_entities(guess))
        for kind, *_ in g:
            true[i, index[kind]] += 1
        for kind, *_ in p:
            pred[i, index[kind]] += 1
        for kind, *_ in g & p:
            tp[i, index[kind]] += 1
    return tp, true, pred


def macro_f1_resampled(counts: Counts, weights: np.ndarray) -> np.ndarray:
    """Macro-F1 of each resample, given as example counts (`weights`, resamples x examples).

    Matches scikit-learn's and seqeval's macro average: classes absent from both the labels and the
    predictions of a resample do not count."""
    tp, n_true, n_pred = (weights @ c for c in counts)
    present = (n_true + n_pred) > 0
    f1 = np.divide(2 * tp, n_true + n_pred, out=np.zeros_like(tp), where=present)
    return (f1 * present).sum(1) / np.maximum(present.sum(1), 1)


def mean_resampled(values: Counts, weights: np.ndarray) -> np.ndarray:
    """The mean of a per-example score (`values[0]`, e.g. a query's nDCG@10) in each resample."""
    return weights @ values[0] / weights.sum(1)


def paired_bootstrap(counts_a: list[Counts], counts_b: list[Counts], resamples: int, seed: int,
                     chunk: int = 250, score=macro_f1_resampled) -> dict[str, float]:
    """`score` (macro-F1 from per-example counts, or `mean_resampled` of per-query scores) of a - b, averaged over
    seeds, with a 95% percentile interval and a two-sided p-value.

    Two levels, both paired: each resample draws test examples with replacement (the same draw for every seed
    and both variants) and then seeds with replacement (the same seeds for both variants), so the interval
    covers fine-tuning noise as well as the test set's. Resamples are drawn `chunk` at a time: the weight matrix
    is resamples x examples."""
    n, k = len(counts_a[0][0]), len(counts_a)
    rng = np.random.default_rng(seed)
    full = np.ones((1, n))
    observed = float(np.mean([score(a, full)[0] - score(b, full)[0] for a, b in zip(counts_a, counts_b, strict=True)]))
    diff = []
    for size in [chunk] * (resamples // chunk) + [resamples % chunk] * bool(resamples % chunk):
        weights = rng.multinomial(n, np.full(n, 1 / n), size=size).astype(float)
        per_seed = np.stack([score(a, weights) - score(b, weights)
                             for a, b in zip(counts_a, counts_b, strict=True)])  # seeds x resamples
        seeds = rng.integers(0, k, size=(k, size))
        diff.append(np.take_along_axis(per_seed, seeds, axis=0).mean(0))
    diff = np.concatenate(diff)
    p = min(1.0, 2 * min((diff <= 0).mean(), (diff >= 0).mean()))
    return {"mean": observed, "ci_low": float(np.percentile(diff, 2.5)), "ci_high": float(np.percentile(diff, 97.5)),
            "p_value": float(p), "resamples": resamples}


def verdict_word(diff: dict[str, float], alpha: float = 0.05) -> str:
    """better, worse (significant at `alpha`) or no difference: the verdict in one word."""
    if diff["n"] < 2 or diff["p_value"] >= alpha:
        return "no difference"
    return "better" if diff["mean"] > 0 else "worse"


def verdict(diff: dict[str, float], alpha: float = 0.05, word: str = "macro-F1") -> str:
    """One honest sentence: significant at `alpha` (by `diff["method"]`, a paired t-test over seeds unless
    stated), with the effect size (in `word`: macro-F1, nDCG@10) and its interval, or not a result."""
    mean, n = diff["mean"], diff["n"]
    stats_text = (f"domain - general {word} = {mean:+.3f} (95% CI {diff['ci_low']:+.3f} to {diff['ci_high']:+.3f}, "
                  f"{diff.get('method', 'paired t-test')} {report.fmt_p(diff['p_value'])}, domain better in "
                  f"{diff['wins']}/{n} seeds)")
    word = verdict_word(diff, alpha)
    if word == "no difference":
        return f"No significant difference between the domain-adapted and the general model: {stats_text}."
    return f"The domain-adapted model is significantly {word}: {stats_text}."


def slope_verdict(before: str, after: str, d: dict, alpha: float = 0.05, word: str = "macro-F1") -> str:
    """What the last stretch of the adaptation curve says about more DAPT."""
    text = (f"From {before} to {after} of DAPT, {word} changed by {d['mean']:+.3f} "
            f"({report.fmt_ci(d)}, {report.fmt_p(d['p_value'])})")
    if d["p_value"] < alpha and d["mean"] > 0:
        return f"{text}: still rising at the end, so more DAPT may well pay."
    if d["p_value"] < alpha:
        return f"{text}: falling at the end; more DAPT of this kind is unlikely to help."
    return f"{text}: not distinguishable from no change, so this curve gives no evidence that more DAPT would pay."


def bm25_reference(test: list[dict], corpus: list[dict]) -> dict[str, float]:
    """BM25's mean test scores (bm25s over whole documents, no training): the bar for retrieval, as TF-IDF + LR is
    for classification."""
    per_query = retrieval.evaluate(retrieval.qrels_of(test), retrieval.bm25_run(corpus, test))
    return {f"test_{k}": v for k, v in retrieval.mean_scores(per_query).items()}


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


# ---------------------------------------------------------------------------------------------------
# what the transformers saw, and the budget beside the published recipe


def seen_texts(tok, texts: list[str], max_len: int) -> list[str]:
    """Each text as far as a transformer with `max_len` positions reads it (special tokens included, as
    `finetune` encodes): cut where the last token that fits ends, by the fast tokenizer's character offsets.
    A text that fits is kept whole (trailing characters that make no token included)."""
    if not tok.is_fast:
        raise ValueError("compare: the base model's tokenizer has no fast version; its character offsets are needed")
    enc = tok(texts, truncation=True, max_length=max_len, return_offsets_mapping=True, return_special_tokens_mask=True)
    out = []
    for text, offsets, special, cut in zip(texts, enc["offset_mapping"], enc["special_tokens_mask"],
                                           truncated(enc, max_len), strict=True):
        end = max((e for (_, e), sp in zip(offsets, special, strict=True) if not sp), default=0)
        out.append(text[:end] if cut else text)
    return out


def truncated_share(tok, examples: list[dict], max_len: int) -> float:
    """Share of examples longer than `max_len` tokens (special tokens included) with `tok`, as `finetune`
    encodes them: a text, or pre-split words for a token task (`tokens`)."""
    if not examples:
        return 0.0
    words = "tokens" in examples[0]
    enc = tok([ex["tokens"] if words else ex["text"] for ex in examples], is_split_into_words=words,
              truncation=True, max_length=max_len)
    return sum(truncated(enc, max_len)) / len(examples)


def truncation(runs: dict[str, dict[int, dict]], task: dict[str, list[dict]], tok, max_len: int) -> dict[str, dict]:
    """variant -> split -> share of texts longer than the window: as the fine-tuning runs recorded it
    (`truncated`, with their own tokenizer), else counted here with `tok` (the base model's): runs from before
    finetune recorded it."""
    counted = None
    out = {}
    for v, by_seed in runs.items():
        recorded = next(iter(by_seed.values())).get("truncated")
        if recorded is None:
            counted = counted or {s: truncated_share(tok, task[s], max_len) for s in SPLITS}
        out[v] = {**(recorded or counted), "source": "run" if recorded else "base tokenizer"}
    return out


def budget(pre: dict | None, t: TrainingParams, truncated_test: float | None, profile: str | None,
           epochs_run: float | None = None, recipe: Recipe = RECIPE) -> dict:
    """What ran beside what the published recipe would run on this corpus and task, and whether it is far below
    (`reasons`: dapt, epochs, truncated). `pre`: the domain model's pretrain metrics (None: none ran);
    `epochs_run`: the fine-tuning runs' mean epochs (early stopping may end them before `t.epochs`)."""
    out = {"profile": profile, "finetune_epochs": t.epochs, "finetune_patience": t.patience,
           "finetune_epochs_run": epochs_run, "finetune_learning_rate": t.learning_rate,
           "max_seq_length": t.max_seq_length, "truncated_test": truncated_test,
           **{f"recipe_{k}": v for k, v in asdict(recipe).items()}}
    reasons = []
    if pre is not None:
        epochs = pre.get("corpus_epochs") or 0.0
        corpus = pre["tokens_seen"] / epochs if epochs > 0 else None
        by_epochs = recipe.dapt_max_epochs * corpus if corpus else float("inf")
        recipe_tokens = round(min(recipe.dapt_max_tokens, by_epochs))
        out.update(dapt_tokens_seen=pre["tokens_seen"], dapt_corpus_epochs=epochs, corpus_tokens=corpus,
                   recipe_tokens=recipe_tokens,
                   recipe_bound="epochs" if by_epochs < recipe.dapt_max_tokens else "tokens",
                   dapt_share_of_recipe=pre["tokens_seen"] / recipe_tokens)
        if out["dapt_share_of_recipe"] < FAR_BELOW_DAPT_SHARE:
            reasons.append("dapt")
    if t.epochs < FAR_BELOW_EPOCHS:
        reasons.append("epochs")
    if truncated_test is not None and truncated_test > FAR_BELOW_TRUNCATED:
        reasons.append("truncated")
    return {**out, "reasons": reasons, "far_below": bool(reasons)}


def reference_key(key: str) -> str:
    """A reference's name in metrics files: the TF-IDF rows are `tfidf_<text>`; BM25 and zero-shot rows their own."""
    return f"tfidf_{key}" if key in ("same_text", "whole_text") else key


def headline(summary: dict, diff: dict, references: dict[str, dict], budget_facts: dict,
             probe: list[dict], scoring: Scoring = report.CLASSIFICATION) -> dict:
    """The verdict's numbers, what `dvc metrics show` prints: short names (`f1_...` for classification, `ndcg_...`
    for retrieval), one row. `general_loss_ratio` is the domain model's general-text MLM loss after DAPT over the
    probe's reference (above 1: forgetting)."""
    after = next((row for row in probe if row.get("variant") == "domain"), None)
    m, short = scoring.primary, scoring.short
    return {
        "verdict": verdict_word(diff),
        f"{short}_domain": summary["domain"][m]["mean"],
        f"{short}_general": summary["general"][m]["mean"],
        f"{short}_diff": diff["mean"], f"{short}_diff_ci_low": diff["ci_low"], f"{short}_diff_ci_high": diff["ci_high"],
        "p_value": diff["p_value"],
        **{f"{short}_{reference_key(key)}": r[m] for key, r in references.items()},
        **({"dapt_tokens": budget_facts["dapt_tokens_seen"], "dapt_recipe_tokens": budget_facts["recipe_tokens"]}
           if "dapt_tokens_seen" in budget_facts else {}),
        "far_below_recipe": budget_facts["far_below"],
        **({"profile": budget_facts["profile"]} if budget_facts["profile"] is not None else {}),
        # the budget's truncated share: of test texts, or for retrieval of the corpus's documents
        **({f"truncated_{budget_facts.get('truncated_split', 'test')}": budget_facts["truncated_test"]}
           if budget_facts["truncated_test"] is not None else {}),
        **({"general_loss_ratio": after["loss"] / probe[0]["loss"]} if after else {}),
    }


# ---------------------------------------------------------------------------------------------------
# reading the runs


def bootstrap_runs(rows: dict[str, list[dict]], names_a: list[str], names_b: list[str], kind: str,
                   classes: list[str], p: CompareParams) -> dict[str, float]:
    """`paired_bootstrap` of the fine-tuning runs `names_a` - `names_b` (seed by seed), from their predictions."""
    ids = {tuple(r["id"] for r in rows[n]) for n in [*names_a, *names_b]}
    if len(ids) > 1:
        raise ValueError(f"compare: the runs {names_a + names_b} scored different test examples; rerun them together")
    score = mean_resampled if kind == "retrieval" else macro_f1_resampled
    return paired_bootstrap([counts_of(rows[n], kind, classes) for n in names_a],
                            [counts_of(rows[n], kind, classes) for n in names_b], p.bootstrap_resamples, p.seed,
                            score=score)


def compare_variants(runs: dict[str, dict[int, dict]], rows: dict[str, list[dict]], a: str, b: str, seeds: list[int],
                     kind: str, classes: list[str], p: CompareParams) -> dict:
    """a - b: the per-seed t-test (as `seed_test`), with the paired bootstrap over test examples as the headline."""
    seed_test = paired_difference(runs, a, b, SCORING[kind].primary)
    boot = bootstrap_runs(rows, [run_name(a, s) for s in seeds], [run_name(b, s) for s in seeds], kind, classes, p)
    n = len(rows[run_name(a, seeds[0])])
    return {**seed_test, **boot, "seed_test": seed_test,
            "method": f"paired bootstrap over {n:,} test {SCORING[kind].unit} x {len(seeds)} seeds,"}


def load_runs(paths: Paths, variants: list[str], seeds: list[int], at: int | None = None) -> dict[str, dict[int, dict]]:
    """variant -> seed -> the fine-tuning run's metrics.json, with its MLflow run where it recorded one."""
    return {v: {s: load_run(paths, run_name(v, s, at)) for s in seeds} for v in variants}


def load_run(paths: Paths, name: str) -> dict:
    """A fine-tuning run's results and, for the lineage tags only, its MLflow run (metrics/finetune/<name>.json: not
    a dependency of this stage, as it changes with every rerun; absent, the compared run goes without the link)."""
    info = run_info_path(paths, name)
    extra = json.loads(info.read_text()) if info.exists() else {}
    return {**json.loads((paths.finetune / name / "metrics.json").read_text()), **extra}


def load_metrics(paths: Paths, name: str) -> dict:
    """metrics/<name>.json and, for pretrain, its time and MLflow run (metrics/<name>_run.json: not a dependency of
    this stage, as it changes with every rerun; a rerun with the same model keeps the report's numbers valid)."""
    run = paths.metrics / f"{name}_run.json"
    return {**json.loads((paths.metrics / f"{name}.json").read_text()),
            **(json.loads(run.read_text()) if run.exists() else {})}


def load_predictions(paths: Paths, name: str) -> list[dict]:
    return read_jsonl(paths.finetune / name / "predictions.jsonl")


def task_kind(runs: dict[str, dict[int, dict]]) -> str:
    """sequence_classification, token_classification or retrieval, as the fine-tuning runs recorded it."""
    kinds = {m.get("task", "sequence_classification") for by_seed in runs.values() for m in by_seed.values()}
    if len(kinds) != 1:
        raise ValueError(f"compare: the fine-tuning runs are of different tasks: {sorted(kinds)}")
    return kinds.pop()


def counts_of(rows: list[dict], kind: str, classes: list[str]) -> Counts:
    """What the bootstrap resamples, per test example: class or entity counts, or a query's primary score."""
    if kind == "retrieval":
        return (np.array([r[SCORING[kind].primary.removeprefix("test_")] for r in rows], dtype=float),)
    if kind == "token_classification":
        return entity_counts([r["tags"] for r in rows], [r["pred"] for r in rows], classes)
    return class_counts([r["label"] for r in rows], [r["pred"] for r in rows], classes)


def classes_of(predictions: list[list[dict]], kind: str) -> list[str]:
    """Every class (entity type, for token tasks) in the gold labels or any prediction."""
    if kind == "token_classification":
        return sorted({e[0] for rows in predictions for r in rows for key in ("tags", "pred")
                       for e in get_entities(r[key])})
    return sorted({r[key] for rows in predictions for r in rows for key in ("label", "pred")})


def confusion(rows_by_seed: list[list[dict]], kind: str, labels: list[str]) -> np.ndarray:
    """Confusion matrix summed over seeds; over word tags for token tasks."""
    true_key = "tags" if kind == "token_classification" else "label"
    flat = (lambda x: x) if kind == "token_classification" else (lambda x: [x])
    y = [t for rows in rows_by_seed for r in rows for t in flat(r[true_key])]
    p = [t for rows in rows_by_seed for r in rows for t in flat(r["pred"])]
    return confusion_matrix(y, p, labels=labels)


def forgetting_probe(extra: dict[str, dict]) -> list[dict]:
    """General-text MLM loss of each model before and after DAPT, from pretrain's evaluations (fixed masks, so
    comparable). The first row is the reference the others are compared with (`short` names it): the general
    model (the base-vocabulary run's starting point) when domain_novocab was pretrained, else the domain model
    before DAPT; its name says which, whichever variants ran."""
    pre = {k.removeprefix("pretrain_"): m for k, m in extra.items() if k.startswith("pretrain_")}
    if not pre:
        return []
    rows = []
    if "domain_novocab" in pre:
        rows.append({"name": "general model (base encoder and vocabulary)", "short": "the general model",
                     "loss": pre["domain_novocab"]["general_loss_start"], "general_model": True})
    if "domain" in pre:
        rows.append({"name": "domain before DAPT (new vocabulary, step 0)", "short": "domain before DAPT",
                     "loss": pre["domain"]["general_loss_start"]})
    for v, m in pre.items():
        how = "TAPT" if v in TAPT_VARIANTS else "DAPT"
        rows.append({"name": f"{v} after {how} (step {m['best_step']})", "short": f"{v} after {how}", "variant": v,
                     "loss": m["general_loss_best"], "start": m["general_loss_start"]})
    return rows


def snapshot_device_hours(pre: dict | None, pct: int, step: int) -> float:
    """The compute behind the snapshot at `pct`: pretrain's record (its metrics, not the snapshot folder, hold the
    time), or the run's share by steps where it has none (a snapshot saved before a resumed run's restart)."""
    recorded = (pre or {}).get("snapshot_device_hours", {}).get(str(pct))
    if recorded is not None:
        return recorded
    if pre is None:
        return float("nan")
    return run_hours(pre) * step / max(pre["steps"], 1)


def run_hours(pre: dict) -> float:
    """A pretraining run's device-hours (NaN where its time was not kept: metrics/pretrain_<variant>_run.json)."""
    return pre.get("device_hours", pre.get("seconds", float("nan")) / 3600)


def curve_points(paths: Paths, fp: FinetuneParams, snapshots: list[int], runs: dict, pre: dict | None,
                 metric: str = "test_macro_f1") -> list[dict]:
    """One point per pretraining snapshot and the final domain model: `metric` over seeds, the compute behind
    it, and the paired per-seed difference to the general model."""
    points = []
    for pct in sorted(snapshots):
        by_seed = load_runs(paths, ["domain"], fp.seeds, at=pct)["domain"]
        snap = by_seed[fp.seeds[0]]["snapshot"]
        if not snap.get("reached", True):  # training stopped first: this snapshot is the final model again
            continue
        points.append({"label": f"{pct}%", "percent": pct, "at": pct, "runs": by_seed,
                       **{k: snap[k] for k in ("step", "tokens_seen", "device")},
                       "device_hours": snapshot_device_hours(pre, pct, snap["step"]),
                       "corpus_epochs": snap.get("corpus_epochs")})
    if pre is not None:
        # the saved model is the best evaluation's: its tokens are those seen up to that step; its device-hours
        # are the whole run's, since finding it took the evaluations after it too
        points.append({"label": f"final (step {pre['best_step']}, {pre['stop_reason']})", "percent": 100,
                       "at": None, "runs": runs["domain"], "step": pre["best_step"],
                       "tokens_seen": pre["tokens_seen"] * pre["best_step"] // max(pre["steps"], 1),
                       "corpus_epochs": pre["corpus_epochs"] * pre["best_step"] / max(pre["steps"], 1)
                       if "corpus_epochs" in pre else None,
                       "device_hours": run_hours(pre),
                       "device": pre.get("device", "cpu")})
    points.sort(key=lambda pt: (pt["step"], pt["percent"]))
    for p in points:
        p.update(mean_std([r[metric] for r in p["runs"].values()]))
        p["vs_general"] = paired_difference({"a": p["runs"], "general": runs["general"]}, "a", "general", metric)
    return points


def curve_csv(points: list[dict], metric: str = "test_macro_f1") -> str:
    """The adaptation curve's points; the score's mean last, as DVC plots a CSV's last column by default."""
    m = metric.removeprefix("test_")
    rows = [f"percent,step,tokens_seen,device_hours,{m}_std,minus_general,{m}_mean"]
    rows += [f"{p['percent']},{p['step']},{p['tokens_seen']},{p['device_hours']:.6f},{p['std']:.6f},"
             f"{p['vs_general']['mean']:.6f},{p['mean']:.6f}" for p in points]
    return "\n".join(rows) + "\n"


def log_children(fp: FinetuneParams, named_runs: dict[str, dict]) -> None:
    """Every compared fine-tuning run as a child of this comparison's MLflow run, tagged variant and seed (and
    dapt_percent for the curve), with its params and scores and a link to the run that trained it, when that run
    is on this tracking server."""
    logged = {name: m["mlflow_run_id"] for name, m in named_runs.items() if m.get("mlflow_run_id")}
    found = tracking.existing_run_ids(logged.values())
    if found is None:  # tracking has stopped (and said why): nothing more to log
        return
    if missing := sorted(name for name, run_id in logged.items() if run_id not in found):
        # DVC reused results fine-tuned while another store was tracking (or the runs were deleted)
        stores = sorted({named_runs[name].get("mlflow_tracking_uri") or "an unrecorded store" for name in missing})
        log.warning("compare: %d fine-tuning runs (%s) are not on the tracking server %s (they were logged to %s), "
                    "so their compared copies carry no finetune_run_id. To link them, fine-tune them again against "
                    "this server: `dvc repro -f -s finetune finetune_curve`, then `dvc repro`", len(missing),
                    ", ".join(missing), mlflow.get_tracking_uri(), ", ".join(stores))
    for name, m in named_runs.items():
        # role, not stage: these copies must not double the fine-tuning runs a `tags.stage` filter finds
        tags = {"variant": m["variant"], "seed": str(m["seed"]), "role": "compared",
                **({"dapt_percent": str(m["dapt_percent"])} if "dapt_percent" in m else {}),
                **({"finetune_run_id": logged[name]} if logged.get(name) in found else {})}
        stage = "finetune_curve" if "dapt_percent" in m else "finetune"  # named as the run it copies
        with tracking.child_run(f"{stage}-{name}", tags):
            tracking.log_params({**tracking.flatten(fp.training), "variant": m["variant"], "seed": m["seed"]})
            tracking.log_metrics({k: v for k, v in m.items() if k.startswith(("test_", "dev_"))})


# ---------------------------------------------------------------------------------------------------


def run(p: CompareParams, fp: FinetuneParams, paths: Paths, snapshots: list[int] | None = None,
        profile: str | None = None) -> None:
    """Collect the fine-tuning runs, compute the statistics, write the reports, figures and metrics.
    `profile`: the budget profile in use (`common.active_profile()`), named beside the budget."""
    snapshots = snapshots or []
    figures = paths.reports / "figures"
    with tracking.stage_run("compare", p):
        # runs
        if not {"general", "domain"} <= set(fp.variants):
            raise ValueError(f"compare: finetune.variants must include general and domain, got {fp.variants}")
        runs = load_runs(paths, fp.variants, fp.seeds)
        kind = task_kind(runs)
        scoring, token_task, retrieval_task = SCORING[kind], kind == "token_classification", kind == "retrieval"
        pm = scoring.primary.removeprefix("test_")  # the verdict's measure in metric names: macro_f1, ndcg_at_10
        # predictions of every run, the adaptation curve's included, by run name
        names = [run_name(v, s) for v in runs for s in fp.seeds] + \
            [run_name("domain", s, pct) for pct in snapshots for s in fp.seeds]
        rows = {name: load_predictions(paths, name) for name in names}
        classes = [] if retrieval_task else classes_of(list(rows.values()), kind)
        extra = {name: load_metrics(paths, name)
                 for name in ["adapt_tokenizer", *(f"pretrain_{v}" for v in fp.variants if v != "general")]
                 if (paths.metrics / f"{name}.json").exists()}
        if (paths.reports / "new_tokens.tsv").exists():
            extra["new_tokens"] = list(csv.DictReader((paths.reports / "new_tokens.tsv").open(encoding="utf-8"),
                                                      delimiter="\t"))

        # what the transformers saw: the first max_seq_length tokens; the TF-IDF references see that text and
        # the whole text
        max_len = fp.training.max_seq_length
        task = {s: read_jsonl(paths.task / f"{s}.jsonl") for s in SPLITS}
        base_tok = load_tokenizer(paths.base_model, kind)
        cut = truncation(runs, task, base_tok, max_len)
        references = {}
        if retrieval_task:  # BM25, and each model before fine-tuning (the same for every seed)
            references["bm25"] = bm25_reference(task["test"], read_jsonl(paths.task / "corpus.jsonl"))
            references |= {f"zero_shot_{v}": {m: by_seed[fp.seeds[0]][f"zero_shot_{m}"] for m in scoring.metrics}
                           for v, by_seed in runs.items()}
        elif not token_task:
            seen = {s: seen_texts(base_tok, [ex["text"] for ex in task[s]], max_len) for s in ("train", "test")}
            seen = {s: [{**ex, "text": text} for ex, text in zip(task[s], seen[s], strict=True)] for s in seen}
            references = {"same_text": tfidf_baseline(seen["train"], seen["test"], p),
                          "whole_text": tfidf_baseline(task["train"], task["test"], p)}

        # statistics: per variant, per seed, and over test examples
        summary = summarise(runs, scoring.metrics)

        diff = compare_variants(runs, rows, "domain", "general", fp.seeds, kind, classes, p)
        vocab = compare_variants(runs, rows, "domain", "domain_novocab", fp.seeds, kind, classes, p) \
            if "domain_novocab" in runs else None
        # what the domain corpus and the task text each add, when TAPT variants ran
        contributions = [{"label": label, "a": a, "b": b,
                          **compare_variants(runs, rows, a, b, fp.seeds, kind, classes, p)}
                         for label, a, b in CONTRIBUTIONS if {a, b} <= set(runs)] \
            if set(TAPT_VARIANTS) & set(runs) else []
        probe = forgetting_probe(extra)
        epochs_run = [m["epochs_run"] for by_seed in runs.values() for m in by_seed.values() if "epochs_run" in m]
        # what the cut costs most: test texts, or for retrieval the documents (queries are short)
        cut_split = "corpus" if "corpus" in cut["general"] else "test"
        budget_facts = budget(extra.get("pretrain_domain"), fp.training, cut["general"][cut_split], profile,
                              statistics.fmean(epochs_run) if epochs_run else None)
        budget_facts["truncated_split"] = cut_split
        points = curve_points(paths, fp, snapshots, runs, extra.get("pretrain_domain"), scoring.primary)
        slope = None
        if len(points) >= 2:
            last, before = points[-1], points[-2]
            slope = bootstrap_runs(rows, [run_name("domain", s, last["at"]) for s in fp.seeds],
                                   [run_name("domain", s, before["at"]) for s in fp.seeds], kind, classes, p)
            slope["text"] = slope_verdict(f"step {before['step']:,}", f"step {last['step']:,}", slope,
                                          word=scoring.word)

        # figures
        curves = {v: list(csv.DictReader((paths.metrics / f"pretrain_{v}_curve.csv").open()))
                  for v in fp.variants if (paths.metrics / f"pretrain_{v}_curve.csv").exists()}
        curves = {v: [{k: float(x) for k, x in row.items()} for row in history] for v, history in curves.items()}
        with atomic_path(figures) as tmp:
            tmp.mkdir()
            lines = {k: r for k, r in references.items() if not k.startswith("zero_shot_")}
            zero_shot = {k.removeprefix("zero_shot_"): r for k, r in references.items() if k.startswith("zero_shot_")}
            report.plot_scores(summary, runs, report.reference_labels(lines, max_len), tmp / "scores.png", scoring,
                               zero_shot)
            if not retrieval_task:
                labels = sorted({t for v in runs for s in fp.seeds for r in rows[run_name(v, s)]
                                 for t in (r["tags"] + r["pred"] if token_task else [r["label"], r["pred"]])})
                report.plot_confusions({v: confusion([rows[run_name(v, s)] for s in fp.seeds], kind, labels)
                                        for v in runs}, labels, tmp / "confusion.png")
            if points:
                report.plot_curve(points, summary["general"][scoring.primary], tmp / "adaptation_curve.png",
                                  scoring.word)
            if curves:
                report.plot_dapt_losses(curves, tmp / "dapt_loss.png")
            if "adapt_tokenizer" in extra:
                report.plot_fertility(extra["adapt_tokenizer"], tmp / "fertility.png")

        # report
        text = report.comparison_markdown(verdict(diff, word=scoring.word), summary, diff, references, extra, vocab,
                                          probe, points, slope, token_task, budget_facts, cut, max_len, scoring,
                                          contributions)
        write_text(paths.reports / "comparison.md", text)
        report.write_html(text, paths.reports, paths.reports / "comparison.html")
        if points:
            write_text(paths.metrics / "adaptation_curve.csv", curve_csv(points, scoring.primary))

        # metrics, and the comparison in MLflow: this run the parent, the fine-tuning runs its children
        metrics = {
            **{f"{v}_{m.removeprefix('test_')}_{k}": s[m][k] for v, s in summary.items() for m in scoring.metrics
               for k in ("mean", "std")},
            **{f"{reference_key(key)}_{m.removeprefix('test_')}": v for key, r in references.items()
               for m, v in r.items()},
            **{f"{v}_truncated_{s}": t[s] for v, t in cut.items() for s in (*SPLITS, "corpus") if s in t},
            **{f"budget_{k}": budget_facts[k] for k in ("profile", "dapt_tokens_seen", "recipe_tokens",
                                                        "dapt_share_of_recipe", "finetune_epochs",
                                                        "finetune_epochs_run", "max_seq_length",
                                                        "truncated_test", "far_below")
               if budget_facts.get(k) is not None},
            f"domain_minus_general_{pm}_mean": diff["mean"],
            f"domain_minus_general_{pm}_std": diff["std"],
            "domain_minus_general_p_value": diff["p_value"],
            "domain_minus_general_ci_low": diff["ci_low"],
            "domain_minus_general_ci_high": diff["ci_high"],
            "domain_wins": diff["wins"],
            **({f"domain_minus_novocab_{pm}_mean": vocab["mean"], "domain_minus_novocab_p_value": vocab["p_value"]}
               if vocab else {}),
            **{k: v for c in contributions if (c["a"], c["b"]) != ("domain", "general")
               for k, v in {f"{c['a']}_minus_{c['b']}_{pm}_mean": c["mean"],
                            f"{c['a']}_minus_{c['b']}_p_value": c["p_value"],
                            f"{c['a']}_minus_{c['b']}_ci_low": c["ci_low"],
                            f"{c['a']}_minus_{c['b']}_ci_high": c["ci_high"]}.items()},
            **({"general_text_loss_general_model": probe[0]["loss"]}
               if probe and probe[0].get("general_model") else {}),
            **({"general_text_loss_domain_start": extra["pretrain_domain"]["general_loss_start"],
                "general_text_loss_domain": extra["pretrain_domain"]["general_loss_best"]}
               if "pretrain_domain" in extra else {}),
            **{f"curve_{pt['percent']}_{pm}_mean": pt["mean"] for pt in points},
            **({"curve_last_step_gain": slope["mean"], "curve_last_step_p_value": slope["p_value"]} if slope else {}),
            "seeds": len(fp.seeds),
        }
        write_json(paths.metrics / "compare.json", metrics)
        head = headline(summary, diff, references, budget_facts, probe, scoring)
        write_json(paths.metrics / "headline.json", head)
        tracking.log_metrics(metrics)
        for name in ("comparison.md", "comparison.html"):
            tracking.log_artifact(paths.reports / name)
        tracking.log_artifacts(figures, "figures")
        log_children(fp, {**{run_name(v, s): m for v, by_seed in runs.items() for s, m in by_seed.items()},
                          **{run_name("domain", s, pt["at"]): m for pt in points if pt["at"] is not None
                             for s, m in pt["runs"].items()}})
        # the verdict on the models' registered versions, the alias on the one it favours
        ingest = paths.metrics / "ingest.json"
        registry.record_comparison(head, {
            "general": json.loads(ingest.read_text()).get("mlflow_run_id") if ingest.exists() else None,
            **{v: extra[f"pretrain_{v}"].get("mlflow_run_id") for v in fp.variants if f"pretrain_{v}" in extra}})
        log.info("compare: %s", verdict(diff, word=scoring.word))
        print(text)


def main() -> None:
    setup_stage()
    run(load_params("compare", CompareParams), load_params("finetune", FinetuneParams), load_paths(),
        load_params("pretrain", PretrainParams).snapshots, active_profile())


if __name__ == "__main__":
    main()
