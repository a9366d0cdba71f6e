"""finetune: class weights, metrics, the shared pooler, and the stage on a tiny task."""

import json

import torch
from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, BertModel

from stages.finetune import FinetuneParams, TrainingParams, class_weights, init_classifier, run, scores, \
    share_pooler
from tests.conftest import write_jsonl


def test_class_weights_balanced():
    w = class_weights([0, 0, 0, 1, 2, 2], 3)
    assert torch.allclose(w, torch.tensor([6 / 9, 6 / 3, 6 / 6]))


def test_same_seed_same_head_for_both_variants(tiny_bert, tmp_path):
    mlm_dir = tmp_path / "mlm"
    AutoModelForMaskedLM.from_pretrained(tiny_bert).save_pretrained(mlm_dir)
    heads = []
    for path, draws in ((tiny_bert, 0), (mlm_dir, 3)):
        torch.manual_seed(0)
        torch.randn(draws)  # loading a checkpoint with more missing weights consumes more random numbers
        clf = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)
        init_classifier(clf, seed=5)
        heads.append(clf.classifier.weight.clone())
    assert torch.equal(heads[0], heads[1]) and heads[0].std() > 0


def test_scores():
    assert scores([0, 0, 1, 1], [0, 0, 0, 1]) == {"accuracy": 0.75, "macro_f1": (0.8 + 2 / 3) / 2}


def test_pooler_comes_from_base_when_checkpoint_has_none(tiny_bert, tmp_path):
    mlm_dir = tmp_path / "mlm"
    AutoModelForMaskedLM.from_pretrained(tiny_bert).save_pretrained(mlm_dir)  # drops the pooler
    clf, info = AutoModelForSequenceClassification.from_pretrained(mlm_dir, num_labels=2, output_loading_info=True)
    assert share_pooler(clf, info["missing_keys"], tiny_bert)
    ref = BertModel.from_pretrained(tiny_bert).pooler.dense.weight
    assert torch.equal(clf.bert.pooler.dense.weight, ref)
    general, info = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2,
                                                                       output_loading_info=True)
    assert not share_pooler(general, info["missing_keys"], tiny_bert)  # already has the trained one


def test_stage_writes_metrics_and_predictions(project, tiny_bert):
    import shutil

    shutil.copytree(tiny_bert, project.base_model)
    rows = [{"text": "the licensor grants a licence", "label": "permissive"},
            {"text": "the cat sat on the mat", "label": "other"}] * 8
    for split in ("train", "dev", "test"):
        write_jsonl(project.task / f"{split}.jsonl", [{**r, "id": f"{split}{i}"} for i, r in enumerate(rows)])
    p = FinetuneParams(variants=["general"], seeds=[0], training=TrainingParams(
        learning_rate=1e-3, epochs=2, batch_size=4, max_seq_length=16, warmup_ratio=0.0, weight_decay=0.0))
    run(p, project, "general", 0)
    out = project.finetune / "general-0"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["labels"] == ["other", "permissive"] and 0 <= metrics["test_macro_f1"] <= 1
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == len(rows) and {p["pred"] for p in preds} <= {"other", "permissive"}
    assert preds[0]["id"] == "test0"
    assert abs(metrics["test_accuracy"] - sum(p["pred"] == p["label"] for p in preds) / len(preds)) < 1e-9


def test_stage_fine_tunes_a_pretraining_snapshot(project, tiny_bert):
    import shutil

    shutil.copytree(tiny_bert, project.base_model)
    shutil.copytree(tiny_bert, project.snapshot_dir("domain", 50))
    (project.snapshot_dir("domain", 50) / "snapshot.json").write_text(json.dumps({"step": 5, "tokens_seen": 640}))
    rows = [{"text": "the licensor grants a licence", "label": "permissive"},
            {"text": "the cat sat on the mat", "label": "other"}] * 4
    for split in ("train", "dev", "test"):
        write_jsonl(project.task / f"{split}.jsonl", rows)
    p = FinetuneParams(variants=["domain"], seeds=[1], training=TrainingParams(
        learning_rate=1e-3, epochs=1, batch_size=4, max_seq_length=16, warmup_ratio=0.0, weight_decay=0.0))
    run(p, project, "domain", 1, at=50)
    metrics = json.loads((project.finetune / "domain-at50-1" / "metrics.json").read_text())
    assert metrics["dapt_percent"] == 50 and metrics["snapshot"] == {"step": 5, "tokens_seen": 640}
    assert metrics["variant"] == "domain" and metrics["seed"] == 1 and metrics["mlflow_run_id"]
