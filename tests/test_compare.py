"""compare: statistics, the verdict wording, and the stage on fake fine-tuning results."""

import json

import pytest

from stages.compare import CompareParams, paired_difference, run, summarise, verdict
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


def test_verdict_is_honest_about_noise():
    assert verdict(paired_difference(runs_of([0.5, 0.6, 0.7], [0.6, 0.7, 0.8]), "domain", "general",
                                     "test_macro_f1")).startswith("The domain-adapted model is better")
    assert verdict(paired_difference(runs_of([0.5, 0.6, 0.7], [0.4, 0.5, 0.6]), "domain", "general",
                                     "test_macro_f1")).startswith("The domain-adapted model is worse")
    assert verdict(paired_difference(runs_of([0.5, 0.6, 0.7], [0.6, 0.5, 0.71]), "domain", "general",
                                     "test_macro_f1")).startswith("Domain adaptation made no clear difference")


def test_stage_report_metrics_and_plot(project):
    rows = [{"text": "mit licence permission is hereby granted", "label": "permissive"},
            {"text": "gnu general public licence copyleft", "label": "copyleft"}] * 5
    for split in ("train", "test"):
        write_jsonl(project.task / f"{split}.jsonl", rows)
    for v, scores in (("general", [0.5, 0.6]), ("domain", [0.7, 0.8])):
        for seed, f in enumerate(scores):
            out = project.finetune / f"{v}-{seed}"
            out.mkdir(parents=True)
            (out / "metrics.json").write_text(json.dumps({"test_macro_f1": f, "test_accuracy": f + 0.1}))
    fp = FinetuneParams(variants=["general", "domain"], seeds=[0, 1], training=TrainingParams(
        learning_rate=1e-4, epochs=1, batch_size=2, max_seq_length=8, warmup_ratio=0, weight_decay=0))
    run(CompareParams(tfidf_max_features=1000, tfidf_c=1.0), fp, project)
    report = (project.reports / "comparison.md").read_text()
    assert report.splitlines()[2].startswith("**The domain-adapted model is better: domain - general macro-F1 = +0.200")
    assert "| general | 2 | 0.550 +- 0.071 |" in report
    metrics = json.loads((project.metrics / "compare.json").read_text())
    assert metrics["domain_macro_f1_mean"] == pytest.approx(0.75) and metrics["tfidf_macro_f1"] == 1.0
    assert (project.reports / "comparison.png").read_bytes()[:4] == b"\x89PNG"
