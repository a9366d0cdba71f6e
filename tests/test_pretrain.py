"""pretrain: packing, the masking recipe, sparse prediction equals the full loss, early stopping, the stage."""

import json
import math

import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer

from stages import pretrain
from stages.pretrain import DomainGeneralStopping, PretrainParams, SparseMLM, fixed_eval_batches, make_collator, \
    pack, run
from tests.conftest import CORPUS, write_jsonl

P = PretrainParams(variants=["domain"], max_seq_length=16, mlm_probability=0.15, mask_replace_prob=0.8,
                   random_replace_prob=0.1, batch_size=4, learning_rate=1e-3, weight_decay=0.0, warmup_ratio=0.0, head_warmup_steps=2,
                   head_warmup_learning_rate=1e-3, max_steps=6, eval_steps=3, max_eval_blocks=4, patience=2,
                   min_delta=0.0, max_general_degradation=0.5)


@pytest.fixture(scope="module")
def tok(tiny_bert):
    return AutoTokenizer.from_pretrained(tiny_bert)


def test_pack_full_blocks_with_separators(tok):
    blocks = pack(tok, ["the cat sat", "on the mat", "the dog slept by the fire"], 6)
    assert blocks.shape[1] == 6 and (blocks[:, 0] == tok.cls_token_id).all()
    stream = blocks[:, 1:].reshape(-1).tolist()
    expected = []
    for text in ["the cat sat", "on the mat", "the dog slept by the fire"]:
        expected += tok(text, add_special_tokens=False)["input_ids"] + [tok.sep_token_id]
    assert stream == expected[: len(stream)] and len(expected) - len(stream) < 5
    assert tok.pad_token_id not in stream and tok.cls_token_id not in stream
    with pytest.raises(ValueError, match="not enough for one block"):
        pack(tok, ["the"], 64)


def test_masking_recipe_is_dynamic_and_only_on_real_tokens(tok):
    blocks = pack(tok, CORPUS * 20, 32)
    rows = [{"input_ids": b} for b in blocks]
    collator = make_collator(tok, P)
    a, b = collator(rows), collator(rows)
    selected = a["labels"] != -100
    assert 0.11 < selected.float().mean() < 0.19
    assert not torch.equal(a["labels"] != -100, b["labels"] != -100)  # fresh masks each time
    specials = (blocks == tok.cls_token_id) | (blocks == tok.sep_token_id)
    assert not (selected & specials).any()
    assert torch.equal(a["labels"][selected], blocks[selected])  # labels are the original tokens
    masked = (a["input_ids"] == tok.mask_token_id) & selected
    assert 0.7 < masked.sum() / selected.sum() < 0.9
    assert torch.equal(a["input_ids"][~selected], blocks[~selected])


def test_validation_masks_are_fixed(tok):
    blocks = pack(tok, CORPUS, 16)
    first = fixed_eval_batches(blocks, make_collator(tok, P, seed=7), 4)
    second = fixed_eval_batches(blocks, make_collator(tok, P, seed=7), 4)
    assert all(torch.equal(x["labels"], y["labels"]) for x, y in zip(first, second, strict=True))


def test_sparse_loss_equals_full_vocabulary_loss(tiny_bert, tok):
    mlm = AutoModelForMaskedLM.from_pretrained(tiny_bert).eval()
    batch = make_collator(tok, P, seed=0)([{"input_ids": b} for b in pack(tok, CORPUS, 16)[:4]])
    full = mlm(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    sparse = SparseMLM(mlm)(**batch)
    assert torch.allclose(full, sparse["loss"], atol=1e-5)
    assert sparse["count"].item() == (batch["labels"] != -100).sum().item()


def stopping_with(monkeypatch, tmp_path, scores, **overrides):
    """A stopping callback whose evaluations return `scores` in turn; saves are counted, not written."""
    p = P.model_copy(update=overrides)
    monkeypatch.setattr(pretrain, "evaluate", lambda model, batches: scores[len(cb.history)][batches])
    monkeypatch.setattr(pretrain.tracking, "log_metrics", lambda *a, **k: None)  # no MLflow run here
    cb = DomainGeneralStopping(p, {"domain": "domain", "general": "general"}, tmp_path / "best", tok=None,
                               step_offset=0)
    saves = []
    monkeypatch.setattr(cb, "save", lambda model: saves.append(len(cb.history)))
    return cb, saves


def score(domain, general):
    return {"domain": {"loss": domain, "perplexity": math.exp(domain), "accuracy": 0.0},
            "general": {"loss": general, "perplexity": math.exp(general), "accuracy": 0.0}}


def test_stops_on_patience_and_keeps_best(monkeypatch, tmp_path):
    cb, saves = stopping_with(monkeypatch, tmp_path, [score(5, 5), score(4, 5), score(4.1, 5), score(4.0, 5)],
                              patience=2, min_delta=0.01)
    assert [cb.evaluate_and_decide(None, s) for s in (0, 1, 2, 3)] == [False, False, False, True]
    assert cb.stop_reason == "patience" and cb.best["domain_loss"] == 4 and saves == [1, 2]


def test_stops_when_general_degrades_and_never_saves_degraded(monkeypatch, tmp_path):
    # general falls first (fresh head), then rises 30% above its best: over-specialisation
    cb, saves = stopping_with(monkeypatch, tmp_path, [score(5, 6), score(4, 4), score(3, 5.2)],
                              max_general_degradation=0.2)
    assert [cb.evaluate_and_decide(None, s) for s in (0, 1, 2)] == [False, False, True]
    assert cb.stop_reason == "general_degradation" and cb.best["domain_loss"] == 4 and saves == [1, 2]


def test_modernbert_head_is_found_and_sparse_loss_matches():
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    config = ModernBertConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
                              sep_token_id=2, global_attn_every_n_layers=1, max_position_embeddings=64)
    mlm = ModernBertForMaskedLM(config).eval()
    head_params = {id(w) for w in pretrain.mlm_head(mlm).parameters()}
    assert {id(w) for w in mlm.head.parameters()} <= head_params
    ids = torch.randint(3, 64, (2, 12))
    labels = torch.full_like(ids, -100)
    labels[:, [2, 5, 9]] = ids[:, [2, 5, 9]]
    full = mlm(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
    sparse = SparseMLM(mlm)(input_ids=ids, labels=labels, attention_mask=torch.ones_like(ids))["loss"]
    assert torch.allclose(full, sparse, atol=1e-5)


@pytest.mark.parametrize("family", ["tiny_bert", "tiny_roberta"])
def test_stage_trains_and_reports(project, family, request):
    model_dir = request.getfixturevalue(family)
    write_jsonl(project.domain_train, [{"id": str(i), "text": t} for i, t in enumerate(CORPUS * 3)])
    write_jsonl(project.domain_valid, [{"id": "v", "text": " ".join(CORPUS)}])
    write_jsonl(project.general_valid, [{"id": "g", "text": " ".join(reversed(CORPUS))}])
    start = AutoModelForMaskedLM.from_pretrained(model_dir)
    start.save_pretrained(project.init_dir("domain"))
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(project.init_dir("domain"))
    run(P, project, "domain")
    metrics = json.loads((project.metrics / "pretrain_domain.json").read_text())
    # the validation text is the training text: a working loop must beat its starting point
    assert metrics["best_step"] > 0 and metrics["domain_loss_best"] < metrics["domain_loss_start"]
    assert metrics["steps"] == P.max_steps and metrics["stop_reason"] == "max_steps"
    curve = (project.metrics / "pretrain_domain_curve.csv").read_text().splitlines()
    assert curve[0].startswith("step,domain_loss,") and len(curve) == 1 + 1 + P.max_steps // P.eval_steps
    trained = AutoModelForMaskedLM.from_pretrained(project.model_dir("domain"))
    assert not torch.equal(trained.base_model.encoder.layer[0].attention.self.query.weight,
                           start.base_model.encoder.layer[0].attention.self.query.weight)
