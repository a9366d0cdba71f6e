"""finetune: class weights, metrics, the shared pooler, and the stage on a tiny task."""

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from seqeval.metrics import accuracy_score, f1_score
from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer, BertModel

from dapt.finetuning.tasks import (
    align_labels,
    encode_words,
    prefix_space_for_words,
    scores,
    tag_scores,
    task_type,
    word_predictions,
)
from stages.finetune import (
    FinetuneParams,
    TrainingParams,
    WeightedLoss,
    class_weights,
    init_classifier,
    read_task,
    run,
    share_pooler,
)
from tests.conftest import write_jsonl

# the stage tests' settings: a tiny model learns the toy tasks in two epochs at this rate
P = FinetuneParams(variants=["general"], seeds=[0], training=TrainingParams(
    learning_rate=1e-3, epochs=2, batch_size=4, max_seq_length=16, warmup_ratio=0.0, weight_decay=0.0))


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


def test_task_is_read_into_memory_as_datasets(tmp_path):
    train = [{"id": "a:1", "text": "x", "label": "1"}, {"id": "a:2", "text": "y", "label": "2"}]
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "dev.jsonl", [{"id": "b:1", "tokens": ["x"], "tags": ["O"], "text": "x"}])
    write_jsonl(tmp_path / "test.jsonl", [{"id": "c:1", "text": "z", "label": "01"}])
    task = read_task(tmp_path)
    assert task["train"].to_list() == train
    assert task["dev"][0]["tags"] == ["O"] and task["test"][0]["label"] == "01"  # labels stay strings
    assert not any(split.cache_files for split in task.values())  # nothing left behind on disk


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
    run(P, project, "general", 0)
    out = project.finetune / "general-0"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["labels"] == ["other", "permissive"] and 0 <= metrics["test_macro_f1"] <= 1
    assert metrics["task"] == "sequence_classification"
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == len(rows) and {p["pred"] for p in preds} <= {"other", "permissive"}
    assert preds[0]["id"] == "test0"
    assert abs(metrics["test_accuracy"] - sum(p["pred"] == p["label"] for p in preds) / len(preds)) < 1e-9


def test_early_stopping_keeps_the_best_epoch_and_reports_truncation(project, tiny_bert):
    # a learning rate too small to change a prediction: dev macro-F1 never improves after epoch 1, so
    # patience 1 stops after epoch 2 of 5; one text in four is longer than max_seq_length (16 tokens)
    shutil.copytree(tiny_bert, project.base_model)
    rows = [{"text": "the licensor grants a licence", "label": "permissive"},
            {"text": "the cat sat on the mat", "label": "other"},
            {"text": "a short one", "label": "other"},
            {"text": " ".join(["the licensee shall keep every notice"] * 4), "label": "permissive"}] * 4
    for split in ("train", "dev", "test"):
        write_jsonl(project.task / f"{split}.jsonl", rows)
    slow = P.model_copy(update={"training": P.training.model_copy(update={"learning_rate": 1e-12, "epochs": 5,
                                                                          "patience": 1})})
    run(slow, project, "general", 0)
    metrics = json.loads((project.finetune / "general-0" / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2
    assert metrics["max_seq_length"] == 16
    assert metrics["truncated"] == {"train": 0.25, "dev": 0.25, "test": 0.25}


def test_stage_fine_tunes_a_pretraining_snapshot(project, tiny_bert):
    import shutil

    shutil.copytree(tiny_bert, project.base_model)
    shutil.copytree(tiny_bert, project.snapshot_dir("domain", 50))
    (project.snapshot_dir("domain", 50) / "snapshot.json").write_text(json.dumps({"step": 5, "tokens_seen": 640}))
    rows = [{"text": "the licensor grants a licence", "label": "permissive"},
            {"text": "the cat sat on the mat", "label": "other"}] * 4
    for split in ("train", "dev", "test"):
        write_jsonl(project.task / f"{split}.jsonl", rows)
    p = P.model_copy(update={"training": P.training.model_copy(update={"epochs": 1})})
    run(p, project, "domain", 1, at=50)
    metrics = json.loads((project.finetune / "domain-at50-1" / "metrics.json").read_text())
    assert metrics["dapt_percent"] == 50 and metrics["snapshot"] == {"step": 5, "tokens_seen": 640}
    assert metrics["variant"] == "domain" and metrics["seed"] == 1
    import mlflow

    # the run's time and MLflow run beside the results, not in them: a rerun with the same scores changes nothing
    assert not {"seconds", "mlflow_run_id"} & set(metrics)
    info = json.loads((project.metrics / "finetune" / "domain-at50-1.json").read_text())
    tags = mlflow.get_run(info["mlflow_run_id"]).data.tags
    assert (tags["stage"], tags["dapt_percent"], tags["variant"]) == ("finetune_curve", "50", "domain")
    assert info["mlflow_tracking_uri"] == mlflow.get_tracking_uri() and info["seconds"] > 0


# ---------------------------------------------------------------------------------------------------
# token classification


def test_task_type_from_the_records():
    assert task_type([{"text": "a", "label": "x"}]) == "sequence_classification"
    assert task_type([{"text": "a", "tokens": ["a"], "tags": ["O"]}]) == "token_classification"
    assert task_type([{"text": "a query", "qrels": {"d1": 1}}]) == "retrieval"
    with pytest.raises(ValueError, match="several task types"):
        task_type([{"text": "a", "label": "x"}, {"tokens": ["a"], "tags": ["O"]}])


def test_align_labels_first_sub_token_only():
    # [CLS] New York ##er [SEP] for words "New", "Yorker" with labels 3, 5
    assert align_labels([None, 0, 1, 1, None], [3, 5]) == [-100, 3, 5, -100, -100]
    assert align_labels([None, 0, 0, 0, 1, 2, 2, None], [1, 2, 0]) == [-100, 1, -100, -100, 2, 0, -100, -100]


def test_byte_level_words_get_a_prefix_space_and_first_piece_labels(tiny_roberta, tiny_bert):
    tok = AutoTokenizer.from_pretrained(tiny_roberta)
    assert prefix_space_for_words(tok)
    enc = encode_words(tok, {"tokens": [["the", "licensor", "grants"]], "tags": [["O", "B-P", "O"]]},
                       {"O": 0, "B-P": 1}, 16)
    # hand-checked: "grants" is two pieces; every word starts with Ġ as it would in running text
    assert tok.convert_ids_to_tokens(enc["input_ids"][0]) == ["<s>", "Ġthe", "Ġlicensor", "Ġgrant", "s", "</s>"]
    assert enc["labels"] == [[-100, 0, 1, 0, -100, -100]]
    assert not prefix_space_for_words(AutoTokenizer.from_pretrained(tiny_bert))  # WordPiece: nothing to do


def test_word_without_tokens_keeps_later_words_aligned(tiny_bert):
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    batch = {"tokens": [["the", "\u200b", "licensor"]], "tags": [["O", "O", "B-P"]]}  # BERT deletes zero-width spaces
    enc = encode_words(tok, batch, {"O": 0, "B-P": 1}, 16)
    assert [label for label in enc["labels"][0] if label != -100] == [0, 0, 1]
    assert tok.unk_token_id in enc["input_ids"][0]


def test_truncated_words_are_predicted_outside():
    # sentence 2 kept only its first word: the window ended there
    label_ids = np.array([[-100, 1, 0, -100, -100], [-100, 0, -100, -100, -100]])
    pred_ids = np.array([[1, 0, 1, 0, 0], [1, 0, 0, 0, 0]])
    assert word_predictions(label_ids, pred_ids, [2, 3], ["B-P", "O"]) == [["B-P", "O"], ["B-P", "O", "O"]]


def test_tag_scores_entity_level():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-LOC", "O"]]
    pred = [["B-PER", "I-PER", "O", "O"], ["B-LOC", "B-PER"]]
    # PER: 1 right of 1 gold, 2 predicted -> F1 2/3; LOC: 1 right of 2 gold, 1 predicted -> F1 2/3
    assert tag_scores(gold, pred) == pytest.approx({"accuracy": 4 / 6, "macro_f1": 2 / 3, "micro_f1": 2 / 3})
    assert tag_scores([["O"]], [["O"]]) == {"accuracy": 1.0, "macro_f1": 0.0, "micro_f1": 0.0}  # no NaN


def test_weighted_loss_ignores_unlabelled_tokens():
    logits = torch.randn(2, 3, 4)
    targets = torch.tensor([[-100, 2, 1], [0, -100, -100]])
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0])
    loss = WeightedLoss(weights)(SimpleNamespace(logits=logits), targets)
    kept = targets != -100
    expected = torch.nn.functional.cross_entropy(logits[kept], targets[kept], weight=weights)
    assert torch.allclose(loss, expected)


SENTENCES = [
    (["the", "licensor", "grants", "the", "licensee", "a", "licence"], ["O", "B-PARTY", "O", "O", "B-PARTY", "O", "O"]),
    (["the", "software", "licence", "is", "provided", "as", "is"], ["O", "B-DOC", "I-DOC", "O", "O", "O", "O"]),
    (["the", "cat", "sat", "on", "the", "mat"], ["O", "O", "O", "O", "O", "O"]),
]


@pytest.mark.parametrize("model_fixture", ["tiny_bert", "tiny_roberta"])
def test_stage_on_a_tagged_task(project, model_fixture, request):
    shutil.copytree(request.getfixturevalue(model_fixture), project.base_model)
    rows = [{"tokens": w, "tags": t, "text": " ".join(w)} for w, t in SENTENCES] * 6
    long = (["the", "licensor", "grants"] * 10, ["O", "B-PARTY", "O"] * 10)  # 30 words: cut at 16 tokens
    splits = {"train": rows, "dev": rows[:6], "test": rows[:3] + [{"tokens": long[0], "tags": long[1]}]}
    for split, examples in splits.items():
        write_jsonl(project.task / f"{split}.jsonl", [{**r, "id": f"{split}{i}"} for i, r in enumerate(examples)])
    run(P, project, "general", 0)

    out = project.finetune / "general-0"
    metrics = json.loads((out / "metrics.json").read_text())
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert metrics["task"] == "token_classification"
    assert metrics["labels"] == ["B-DOC", "B-PARTY", "I-DOC", "O"]
    assert [r["id"] for r in preds] == ["test0", "test1", "test2", "test3"]
    assert [r["tags"] for r in preds] == [ex["tags"] for ex in splits["test"]]
    assert all(len(r["pred"]) == len(r["tags"]) and set(r["pred"]) <= set(metrics["labels"]) for r in preds)
    assert preds[3]["pred"][14:] == ["O"] * 16  # at most 14 words fit between the two special tokens
    y_true, y_pred = [r["tags"] for r in preds], [r["pred"] for r in preds]
    assert metrics["test_macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0))
    assert metrics["test_micro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="micro", zero_division=0))
    assert metrics["test_accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert {"dev_macro_f1", "dev_micro_f1", "dev_accuracy"} <= set(metrics)
