"""compare: statistics, the verdict wording, and the stage on fake fine-tuning results."""

import json

import numpy as np
import pytest

from stages.compare import CompareParams, macro_f1_resampled, paired_bootstrap, paired_difference, run, summarise, \
    verdict
from stages.finetune import FinetuneParams, TrainingParams
from tests.conftest import write_jsonl


def runs_of(general, domain):
    return {"general": {s: {"test_macro_f1": f, "test_accuracy": f} for s, f in enumerate(general)},
            "domain": {s: {"test_macro_f1": f, "test_accuracy": f} for s, f in enumerate(domain)}}


def test_paired_difference_and_summary():
    runs = runs_of([0.5, 0.6, 0.7], [0.6, 0.7, 0.7])
    diff = paired_difference(runs, "domain", "general", "test_macro_f1")
    assert diff["mean"] == pytest.approx(0.2 / 3) and diff["wins"] == 2 and diff["n"] == 3
    assert summarise(runs)["general"]["test_macro_f1"]["mean"] == pytest.approx(0.6)
    assert summarise(runs)["general"]["test_macro_f1"]["std"] == pytest.approx(0.1)


def test_paired_t_test_matches_hand_computation():
    diff = paired_difference(runs_of([0.50, 0.60, 0.70], [0.55, 0.62, 0.78]), "domain", "general", "test_macro_f1")
    d = [0.05, 0.02, 0.08]
    mean, sd = sum(d) / 3, (sum((x - sum(d) / 3) ** 2 for x in d) / 2) ** 0.5
    assert diff["mean"] == pytest.approx(mean) and diff["std"] == pytest.approx(sd)
    half = 4.302652729911275 * sd / 3 ** 0.5  # t(0.975, df=2)
    assert (diff["ci_low"], diff["ci_high"]) == pytest.approx((mean - half, mean + half))
    assert diff["p_value"] == pytest.approx(0.1020, abs=5e-4)  # t = 0.05 / (0.03 / sqrt(3)) = 2.89, df = 2


def test_verdict_is_honest_about_noise():
    consistent = paired_difference(runs_of([0.5, 0.6, 0.7, 0.6], [0.61, 0.70, 0.82, 0.69]), "domain", "general",
                                   "test_macro_f1")
    assert verdict(consistent).startswith("The domain-adapted model is significantly better")
    worse = paired_difference(runs_of([0.5, 0.6, 0.7, 0.6], [0.39, 0.50, 0.58, 0.51]), "domain", "general",
                              "test_macro_f1")
    assert verdict(worse).startswith("The domain-adapted model is significantly worse")
    noisy = paired_difference(runs_of([0.5, 0.6, 0.7], [0.6, 0.5, 0.71]), "domain", "general", "test_macro_f1")
    assert verdict(noisy).startswith("No significant difference")


def test_stage_report_metrics_and_plot(project):
    rows = [{"text": "mit licence permission is hereby granted", "label": "permissive"},
            {"text": "gnu general public licence copyleft", "label": "copyleft"}] * 5
    for split in ("train", "test"):
        write_jsonl(project.task / f"{split}.jsonl", rows)
    for v, scores in (("general", [0.5, 0.6]), ("domain", [0.7, 0.8]), ("domain_novocab", [0.65, 0.7])):
        for seed, f in enumerate(scores):
            out = project.finetune / f"{v}-{seed}"
            out.mkdir(parents=True)
            (out / "metrics.json").write_text(json.dumps({"test_macro_f1": f, "test_accuracy": f + 0.1}))
    fp = FinetuneParams(variants=["general", "domain", "domain_novocab"], seeds=[0, 1], training=TrainingParams(
        learning_rate=1e-4, epochs=1, batch_size=2, max_seq_length=8, warmup_ratio=0, weight_decay=0))
    (project.metrics).mkdir()
    (project.metrics / "pretrain_domain.json").write_text(json.dumps({
        "stop_reason": "max_steps", "steps": 150, "best_step": 150, "tokens_seen": 1000, "seconds": 9.0,
        **{f"{s}_loss_{w}": 5.0 for s in ("domain", "general") for w in ("start", "best", "end")}}))
    (project.reports).mkdir()
    (project.reports / "new_tokens.tsv").write_text("token\tfrequency\tbase_pieces\ttokens_saved\n"
                                                    "licensor\t1270\t3\t2540\n")
    run(CompareParams(tfidf_max_features=1000, tfidf_c=1.0), fp, project)
    report = (project.reports / "comparison.md").read_text()
    assert "Pretraining hit its step limit (150 steps) with domain validation loss still falling" in report
    # +0.2 on both seeds: no spread, so the difference is taken as exact
    assert report.splitlines()[2].startswith("**The domain-adapted model is significantly better: domain - general "
                                             "macro-F1 = +0.200")
    assert "| general | 2 | 0.550 +- 0.071 |" in report
    assert "Gain from the new vocabulary (domain - domain_novocab, the same pretraining without it): macro-F1 +0.075" \
        in report
    assert "`licensor` (1,270x, 3 pieces before)" in report
    assert "| domain | 150 | max_steps | 150 | 1,000 | 9 | general | 5.000 |" in report
    metrics = json.loads((project.metrics / "compare.json").read_text())
    assert metrics["domain_macro_f1_mean"] == pytest.approx(0.75) and \
        metrics["domain_minus_novocab_macro_f1_mean"] == pytest.approx(0.075) and metrics["tfidf_macro_f1"] == 1.0
    assert (project.reports / "comparison.png").read_bytes()[:4] == b"\x89PNG"


def test_resampled_macro_f1_matches_scikit_learn():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 4, 300), rng.integers(0, 3, 300)  # class 3 is never predicted
    ours = macro_f1_resampled(y, p, np.ones((1, 300)), 5)[0]  # class 4 appears nowhere: not counted
    assert ours == pytest.approx(f1_score(y, p, average="macro", zero_division=0))
    weights = rng.multinomial(300, np.full(300, 1 / 300), size=3).astype(float)
    for w, f1 in zip(weights, macro_f1_resampled(y, p, weights, 5), strict=True):
        idx = np.repeat(np.arange(300), w.astype(int))
        assert f1 == pytest.approx(f1_score(y[idx], p[idx], average="macro", zero_division=0))


def test_paired_bootstrap_separates_signal_from_noise():
    labels = ["a", "b"] * 100
    same = paired_bootstrap(labels, [labels[::-1]], [labels[::-1]], 500, 0)
    assert same["mean"] == 0 and same["ci_low"] == same["ci_high"] == 0 and same["p_value"] == 1
    flipped = ["b" if x == "a" else "a" for x in labels]
    clear = paired_bootstrap(labels, [labels, labels], [flipped, flipped], 500, 0)
    assert clear["mean"] == 1 and clear["ci_low"] > 0.9 and clear["p_value"] == 0
    noisy = [x if i % 10 else ("b" if x == "a" else "a") for i, x in enumerate(labels)]  # 10% wrong
    other = list(noisy)  # two errors fixed, two new ones: as good, differently wrong
    other[0], other[10], other[1], other[2] = labels[0], labels[10], noisy[2], noisy[1]
    close = paired_bootstrap(labels, [noisy], [other], 500, 0)
    assert close["ci_low"] < 0 < close["ci_high"] and close["p_value"] > 0.05
