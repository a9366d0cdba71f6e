"""pretrain: packing, the masking recipe, sparse prediction equals the full loss, early stopping, the stage."""

import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForMaskedLM, AutoTokenizer, TrainingArguments

from dapt.common import ParamsError, validate_section, write_json
from dapt.pretraining import blocks, mlm
from dapt.pretraining.mlm import compile_regions, encoder_layers, mlm_head, pack
from stages import pretrain
from stages.pretrain import DomainGeneralStopping, PretrainParams, SparseMLM, fixed_eval_batches, make_collator, run
from tests.conftest import CORPUS, write_jsonl, write_parquet_shards

ROOT = Path(__file__).resolve().parents[1]

P = PretrainParams(variants=["domain"], max_seq_length=16, mlm_probability=0.15, mask_replace_prob=0.8,
                   random_replace_prob=0.1, batch_size=4, learning_rate=1e-3, weight_decay=0.0, warmup_ratio=0.0,
                   head_warmup_steps=2, head_warmup_learning_rate=1e-3, max_steps=6, eval_steps=3, save_steps=3,
                   max_eval_blocks=4, patience=2,
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
    assert torch.equal(a["masked_positions"], selected.flatten().nonzero().squeeze(1))  # what SparseMLM gathers


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
    # without the collator's positions (a batch from elsewhere) it finds them itself
    assert torch.equal(SparseMLM(mlm)(input_ids=batch["input_ids"], labels=batch["labels"])["loss"], sparse["loss"])


def test_compile_regions_is_the_same_model_and_keeps_its_names(tiny_bert, tok):
    model = SparseMLM(AutoModelForMaskedLM.from_pretrained(tiny_bert)).eval()
    batch = tok(["the licensor grants the licensee a licence", "the software"], padding=True, return_tensors="pt")
    batch["labels"] = torch.where(batch["attention_mask"].bool(), batch["input_ids"], -100)
    before, names = model(**batch), list(model.state_dict())
    compile_regions(model)
    after = model(**batch)
    torch.testing.assert_close(after["loss"], before["loss"])
    assert after["correct"] == before["correct"]
    assert list(model.state_dict()) == names  # checkpoints load into an uncompiled model
    twin = copy.deepcopy(model)  # a copy computes with its own weights, not through the original's compiled head
    with torch.no_grad():
        twin.mlm.cls.predictions.bias.add_(100 * torch.arange(twin.mlm.config.vocab_size) % 7)
    assert not torch.equal(twin(**batch)["loss"], after["loss"])
    with pytest.raises(ValueError, match="no encoder layers found on Linear"):
        encoder_layers(torch.nn.Linear(2, 2))


def test_compiled_regions_stay_within_the_compilers_limit():
    """ModernBERT has three kinds of layer: evaluation graphs (eval mode, a smaller last batch) on top of the
    warm-up's (encoder frozen) and training's would pass the compiler's limit of 8 and leave training eager
    without an error (here: an error). A new number of masked positions must not compile the head again."""
    from torch._dynamo.utils import counters
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    torch.manual_seed(0)
    lm = ModernBertForMaskedLM(ModernBertConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
        global_attn_every_n_layers=3, local_attention=8, max_position_embeddings=64, pad_token_id=0))
    lm.set_attn_implementation("sdpa")
    model = SparseMLM(lm)
    compile_regions(model, backend="eager")  # the graphs are what counts here, not the code generated for them

    def batch(n, every=4):
        ids = torch.randint(5, 64, (n, 16))
        labels = torch.full_like(ids, -100)
        labels[:, ::every] = ids[:, ::every]
        return {"input_ids": ids, "labels": labels}

    counters.clear()
    head = mlm.own_head_parameters(lm)
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for frozen in (True, False):  # the head warm-up, then training
            for w in model.parameters():
                w.requires_grad_(not frozen or id(w) in head)
            model(**batch(4))["loss"].backward()  # 16 masked positions
            graphs = counters["stats"]["unique_graphs"]
            assert graphs > 0
            model(**batch(4, every=3))["loss"].backward()  # 24: the head's graph takes any number
            assert counters["stats"]["unique_graphs"] == graphs
            scores = mlm.evaluate(model, [batch(4), batch(2)])
            assert counters["stats"]["unique_graphs"] == graphs and model.training
    assert scores["loss"] > 0


def test_several_gpus_in_one_process_are_refused(monkeypatch, project):
    monkeypatch.setattr(TrainingArguments, "n_gpu", property(lambda self: 2))
    with pytest.raises(ValueError, match="one process sees 2 GPUs.*torchrun --nproc_per_node 2"):
        run(P, project, "domain")


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
    head_params = {id(w) for w in mlm_head(mlm).parameters()}
    assert {id(w) for w in mlm.head.parameters()} <= head_params
    ids = torch.randint(3, 64, (2, 12))
    labels = torch.full_like(ids, -100)
    labels[:, [2, 5, 9]] = ids[:, [2, 5, 9]]
    full = mlm(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
    sparse = SparseMLM(mlm)(input_ids=ids, labels=labels, attention_mask=torch.ones_like(ids))["loss"]
    assert torch.allclose(full, sparse, atol=1e-5)


@pytest.mark.parametrize("family,compiled,bf16_weights", [("tiny_bert", False, False), ("tiny_roberta", True, False),
                                                         ("tiny_roberta", True, True)])
def test_stage_trains_and_reports(project, family, compiled, bf16_weights, request):
    prepare(Path("."), project, request.getfixturevalue(family))
    start = AutoModelForMaskedLM.from_pretrained(project.init_dir("domain"))
    # lr 5e-3 and all validation blocks: at 1e-3 on 4 blocks, six steps sometimes left a random 2-layer model's
    # domain loss where it started (the fixture's tokenizer, and so the model, differs from run to run)
    run(P.model_copy(update={"snapshots": [0, 50], "learning_rate": 5e-3, "max_eval_blocks": 32,
                             "torch_compile": compiled, "bf16_weights": bf16_weights}), project, "domain")
    metrics = json.loads((project.metrics / "pretrain_domain.json").read_text())
    # the validation text is the training text: a working loop must beat its starting point
    assert metrics["best_step"] > 0 and metrics["domain_loss_best"] < metrics["domain_loss_start"], metrics
    assert metrics["steps"] == P.max_steps and metrics["stop_reason"] == "max_steps"
    curve = (project.metrics / "pretrain_domain_curve.csv").read_text().splitlines()
    assert curve[0].startswith("step,domain_loss,") and len(curve) == 1 + 1 + P.max_steps // P.eval_steps
    trained = AutoModelForMaskedLM.from_pretrained(project.model_dir("domain"))
    query = lambda m: m.base_model.encoder.layer[0].attention.self.query.weight  # noqa: E731
    assert not torch.equal(query(trained), query(start))
    # saved as trained: the fp32 weights, not the bf16 ones a `bf16_weights` run computes with
    assert {w.dtype for w in load_file(project.model_dir("domain") / "model.safetensors").values()} == {torch.float32}
    assert not torch.equal(query(trained), query(trained).to(torch.bfloat16).float())
    # the adaptation curve's snapshots: before any DAPT step, and halfway, each with its compute
    index = json.loads((project.snapshot_dir("domain", 0).parent / "snapshots.json").read_text())
    assert [(k, v["step"], v["reached"]) for k, v in index.items()] == [("0", 0, True), ("50", 3, True)]
    assert index["50"]["tokens_seen"] == 3 * P.batch_size * P.max_seq_length
    # no wall-clock value in what fine-tuning reads: a rerun with the same weights reruns nothing downstream
    assert not {"seconds", "device_hours"} & set(index["50"])
    # the time beside the metrics, in a file compare does not depend on
    timing = json.loads((project.metrics / "pretrain_domain_run.json").read_text())
    assert timing["snapshot_device_hours"]["50"] > 0 and timing["seconds"] > 0 and timing["mlflow_run_id"]
    assert not {"seconds", "device_hours", "mlflow_run_id"} & set(json.loads(
        (project.metrics / "pretrain_domain.json").read_text()))
    train_blocks = json.loads((project.metrics / "pretrain_domain.json").read_text())["train_blocks"]
    assert index["50"]["corpus_epochs"] == pytest.approx(3 * P.batch_size / train_blocks)
    at0, at50 = (AutoModelForMaskedLM.from_pretrained(project.snapshot_dir("domain", pct)) for pct in (0, 50))
    assert torch.equal(query(at0), query(start))
    assert not torch.equal(query(at50), query(start)) and not torch.equal(query(at50), query(trained))
    assert AutoTokenizer.from_pretrained(project.snapshot_dir("domain", 50))


def test_an_epoch_budget_with_replay_reports_tokens_and_corpus_epochs(project, tiny_bert, tmp_path):
    """Budgets in epochs and evaluation in tokens resolve to steps on the data; the metrics and MLflow say how
    many tokens and corpus epochs the model saw, and which budget stopped it."""
    import mlflow

    prepare(tmp_path, project, tiny_bert)
    write_parquet_shards(project.general_train, [{"id": f"g{i}", "text": t} for i, t in enumerate(reversed(CORPUS))])
    p = P.model_copy(update={"max_steps": 100, "max_epochs": 0.5, "eval_steps": None, "eval_tokens": 128.0,
                             "general_replay": 0.25, "head_warmup_steps": 0, "snapshots": [],
                             # the budget, not early stopping, must end it whatever the tiny model's losses do
                             "patience": 1000, "max_general_degradation": 1000.0})
    run(p, project, "domain")
    m = json.loads((project.metrics / "pretrain_domain.json").read_text())
    tok = AutoTokenizer.from_pretrained(project.init_dir("domain"))
    domain = len(pack(tok, CORPUS * 3, P.max_seq_length))
    assert m["train_blocks"] == domain + round(domain / 3)  # a quarter of the mix is general text
    assert m["budget"] == "max_epochs" and m["steps"] == math.ceil(0.5 * m["train_blocks"] / P.batch_size) < 100
    assert m["tokens_seen"] == m["steps"] * P.batch_size * P.max_seq_length
    assert m["corpus_epochs"] == pytest.approx(m["steps"] * P.batch_size / m["train_blocks"]) and \
        0.5 <= m["corpus_epochs"] < 0.5 + P.batch_size / m["train_blocks"]
    steps = [int(r.split(",")[0]) for r in (project.metrics / "pretrain_domain_curve.csv").read_text().split()[1:]]
    assert steps[:3] == [0, 2, 4]  # 128 tokens = 2 steps of 4 x 16
    [run_] = mlflow.search_runs(experiment_names=["dapt"], output_format="list",
                                filter_string="tags.stage = 'pretrain'")
    assert run_.data.metrics["corpus_epochs"] == pytest.approx(m["corpus_epochs"]) and run_.data.tags["budget"] == \
        "max_epochs" and run_.data.metrics["tokens_seen"] == m["tokens_seen"]


def test_tokenize_only_fills_the_cache_the_stage_then_reads(project, tiny_bert, tmp_path, monkeypatch):
    prepare(tmp_path, project, tiny_bert)
    pretrain.tokenize_only(P, project, "domain")
    assert len(list((project.checkpoints / "domain" / "tokens").glob("*/tokens.json"))) == 3  # train + 2 validation
    monkeypatch.setattr(blocks, "tokenize_units", lambda *a, **k: pytest.fail("tokenised again"))
    run(P, project, "domain")
    assert json.loads((project.metrics / "pretrain_domain.json").read_text())["steps"] == P.max_steps


def test_snapshots_a_run_never_reached_get_its_final_model(tmp_path, tok):
    final = tmp_path / "final"
    final.mkdir()
    (final / "model.safetensors").write_text("weights")
    snaps = pretrain.Snapshots(P.model_copy(update={"snapshots": [0, 80]}), tmp_path / "snaps", tok, 1)
    (tmp_path / "snaps" / "0").mkdir(parents=True)  # taken during training
    snaps.finish(final, final_step=2)
    info = json.loads((tmp_path / "snaps" / "80" / "snapshot.json").read_text())
    assert info["reached"] is False and info["step"] == 2 and info["percent"] == 80
    assert (tmp_path / "snaps" / "80" / "model.safetensors").read_text() == "weights"
    assert not (tmp_path / "snaps" / "0" / "snapshot.json").exists()  # a snapshot taken is left alone


def test_snapshot_percentages_are_validated():
    with pytest.raises(ValueError, match="pretrain.snapshots"):
        P.model_validate({**P.model_dump(), "snapshots": [0, 100]})
    assert P.model_copy(update={"snapshots": [0, 25, 50]}).snapshot_steps() == {0: 0, 2: 25, 3: 50}
    with pytest.raises(ValueError, match="distinct steps"):  # 5% of 6 steps is step 0 too
        P.model_validate({**P.model_dump(), "snapshots": [0, 5]})


def test_resumed_run_keeps_counting_its_compute(monkeypatch, tmp_path):
    cb, _ = stopping_with(monkeypatch, tmp_path, [])
    cb.started -= 100  # 100 s spent before the checkpoint
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / cb.STATE).write_text(json.dumps(cb.state()))
    resumed, _ = stopping_with(monkeypatch, tmp_path, [])
    resumed.restore(tmp_path / "checkpoint-3")
    assert time.time() - resumed.started == pytest.approx(100, abs=5)
    snaps = pretrain.Snapshots(P, tmp_path / "snaps", None, processes=2, clock=resumed)
    snaps.record_time(50)
    assert snaps.device_hours["50"] == pytest.approx(2 * 100 / 3600, rel=0.05)


def test_masking_never_selects_or_inserts_special_tokens(tok):
    blocks = pack(tok, CORPUS * 20, 32)
    collator = make_collator(tok, P.model_copy(update={"random_replace_prob": 0.9, "mask_replace_prob": 0.1}))
    specials = torch.tensor(tok.all_special_ids)
    out = collator([{"input_ids": b} for b in blocks])
    randomised = (out["labels"] != -100) & (out["input_ids"] != tok.mask_token_id)
    assert randomised.sum() > 100
    assert not torch.isin(out["input_ids"][randomised], specials).any()  # random tokens are real tokens
    assert (out["input_ids"][randomised] < len(tok)).all()


@pytest.mark.parametrize("family", ["wordpiece", "bytelevel"])
def test_whole_word_masking_selects_whole_words(family, tiny_bert, tiny_roberta):
    tok = AutoTokenizer.from_pretrained(tiny_bert if family == "wordpiece" else tiny_roberta)
    texts = ["indemnification merchantability sublicensable irrevocably"] * 40  # words of several pieces
    blocks = pack(tok, texts, 32)
    out = make_collator(tok, P.model_copy(update={"whole_word_mask": True}))([{"input_ids": b} for b in blocks])
    starts = mlm.word_begins(blocks, *mlm.word_starts(tok))
    selected = out["labels"] != -100
    assert 0.05 < selected.float().mean() < 0.3
    word = starts.cumsum(-1)  # word index within each row
    for r in range(len(blocks)):
        for w in word[r][selected[r]].unique():
            members = (word[r] == w) & ~mlm.MaskingCollator(tok, 0.15, 0.8, 0.1).special[blocks[r]]
            assert selected[r][members].all()  # a selected word is selected in full
    if family == "bytelevel":  # a word after a line break has no "Ġ" but is a word of its own
        ids = tok("licensor\nlicensee", add_special_tokens=False)["input_ids"]
        begins = mlm.word_begins(torch.tensor([ids]), *mlm.word_starts(tok))[0]
        newline = next(i for i, t in enumerate(tok.convert_ids_to_tokens(ids)) if "Ċ" in t)
        assert begins[newline] and begins[newline + 1]
    # several pieces per word here: token-level masking would split words
    token_level = make_collator(tok, P)([{"input_ids": b} for b in blocks])["labels"] != -100
    split = [(token_level[r][word[r] == w]).any() and not (token_level[r][word[r] == w]).all()
             for r in range(len(blocks)) for w in word[r].unique()]
    assert any(split)


def test_replay_mixes_the_configured_share():
    domain, general = torch.zeros(300, 4, dtype=torch.long), torch.ones(50, 4, dtype=torch.long)
    mixed = pretrain.with_replay(domain, general, 0.25, seed=0)
    assert len(mixed) == 400 and sum(int(mixed[i][0]) for i in range(400)) == 100
    again = pretrain.with_replay(domain, general, 0.25, seed=0)
    assert all(torch.equal(mixed[i], again[i]) for i in range(400))
    assert pretrain.with_replay(domain, general, 0.0, seed=0) is domain


def test_budgets_in_tokens_and_epochs_resolve_to_the_first_reached():
    p = P.model_copy(update={"max_steps": None, "max_tokens": 640.0})  # 64 tokens a step (4 x 16) per process
    assert p.resolve(100, 1)[0].max_steps == 10 and p.resolve(100, 2)[0].max_steps == 5
    p = P.model_copy(update={"max_steps": 50, "max_epochs": 2.0})  # 100 blocks, 4 a step: 50 steps an epoch... x2
    assert p.resolve(100, 1) [1] == "max_steps" and p.resolve(100, 1)[0].max_steps == 50
    assert p.resolve(40, 1)[1] == "max_epochs" and p.resolve(40, 1)[0].max_steps == 20
    p = P.model_copy(update={"eval_steps": None, "eval_tokens": 200.0})
    assert p.resolve(100, 1)[0].eval_steps == 3  # 200 / 64 rounded
    with pytest.raises(ValueError, match="set a budget"):
        PretrainParams.model_validate({**P.model_dump(), "max_steps": None})
    with pytest.raises(ValueError, match="one of eval_steps and eval_tokens"):
        PretrainParams.model_validate({**P.model_dump(), "eval_tokens": 1000})
    with pytest.raises(ValueError, match="fall on the same step"):
        P.model_copy(update={"max_steps": None, "max_tokens": 64.0, "snapshots": [0, 50]}).resolve(100, 1)


def test_checkpoints_hold_each_tied_tensor_once(tiny_roberta):
    model = SparseMLM(AutoModelForMaskedLM.from_pretrained(tiny_roberta))
    state = model.state_dict()
    assert "mlm.roberta.embeddings.word_embeddings.weight" in state and "mlm.lm_head.decoder.weight" not in state
    fresh = SparseMLM(AutoModelForMaskedLM.from_pretrained(tiny_roberta))
    with torch.no_grad():
        fresh.mlm.roberta.embeddings.word_embeddings.weight.zero_()
    fresh.load_state_dict(state, strict=False)
    assert torch.equal(fresh.mlm.lm_head.decoder.weight, model.mlm.lm_head.decoder.weight)


def test_master_weights_train_in_fp32_what_the_model_holds_in_bf16():
    """bf16 weights (`pretrain.bf16_weights`): AdamW steps on fp32 copies equal plain fp32 AdamW given the same
    gradients; updates far below a bf16 weight's precision still add up; a checkpoint carries the copies."""
    torch.manual_seed(0)
    model, reference = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        model.bias.fill_(1.0), reference.bias.fill_(1.0)  # bf16 steps by 2**-7 near 1: an lr 1e-4 update vanishes
    opt = mlm.MasterWeightAdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-4, weight_decay=0.01)
    assert all(w.dtype == torch.bfloat16 for w in model.parameters())

    def steps(n):
        for _ in range(n):
            model(torch.randn(16, 8, dtype=torch.bfloat16)).square().sum().backward()
            for w, ref in zip(model.parameters(), reference.parameters()):
                ref.grad = w.grad.float()
            opt.step(), ref_opt.step()
            opt.zero_grad(), ref_opt.zero_grad()

    steps(60)
    for w, master, ref in zip(model.parameters(), opt.masters, reference.parameters(), strict=True):
        assert torch.equal(master, ref) and torch.equal(w, ref.to(torch.bfloat16)) and w.grad is None
    assert (reference.bias - 1).abs().min() > 3e-3  # 60 updates of 1e-4 moved it, and the bf16 weights with it
    with mlm.full_precision(opt):
        assert torch.equal(model.bias, reference.bias) and model.bias.dtype == torch.float32
    assert model.bias.dtype == torch.bfloat16

    # resumed: a fresh model (its bf16 rounding, as a checkpoint holds it) and the optimiser's state
    state = copy.deepcopy(opt.state_dict())
    resumed = torch.nn.Linear(8, 4)
    resumed.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    opt = mlm.MasterWeightAdamW(resumed.parameters(), lr=1e-4, weight_decay=0.01)
    opt.load_state_dict(state)
    model = resumed
    steps(5)
    for master, ref in zip(opt.masters, reference.parameters(), strict=True):
        assert torch.equal(master, ref)
    with mlm.full_precision(ref_opt):  # any other optimiser: nothing changes
        assert reference.bias.dtype == torch.float32


DRIVER = """
import json, sys
from dapt.common import Paths
from stages.pretrain import PretrainParams, run
run(PretrainParams.model_validate_json(sys.argv[1]), Paths(**json.loads(sys.argv[2])), "domain")
"""
LONG = P.model_copy(update={"max_steps": 160, "save_steps": 20, "eval_steps": 40, "patience": 10})


def prepare(root: Path, project, model_dir: Path) -> None:
    """Data and starting model of a stage run under `root` (the project's relative paths)."""
    # training text as clean writes it: Parquet shards (two, so blocks cross a shard boundary)
    write_parquet_shards(root / project.domain_train, [{"id": str(i), "text": t} for i, t in enumerate(CORPUS * 3)],
                         shard_docs=40)
    write_jsonl(root / project.domain_valid, [{"id": "v", "text": " ".join(CORPUS)}])
    write_jsonl(root / project.general_valid, [{"id": "g", "text": " ".join(reversed(CORPUS))}])
    torch.manual_seed(0)  # the tiny BERT has no MLM head: every run must start from the same new one
    AutoModelForMaskedLM.from_pretrained(model_dir).save_pretrained(root / project.init_dir("domain"))
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(root / project.init_dir("domain"))


def stage_command(root: Path, project, p: PretrainParams, launcher: list[str]) -> list[str]:
    (root / "driver.py").write_text(DRIVER)
    paths = json.dumps({k: str(v) for k, v in project.model_dump().items()})
    return [*launcher, str(root / "driver.py"), p.model_dump_json(), paths]


def stage_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.mark.parametrize("bf16_weights", [False, True])
def test_resumes_after_sigkill_and_ends_where_an_uninterrupted_run_ends(project, tiny_bert, tmp_path, bf16_weights):
    p = LONG.model_copy(update={"bf16_weights": bf16_weights})
    prepare(tmp_path, project, tiny_bert)
    run(p, project, "domain")
    expected = json.loads((project.metrics / "pretrain_domain.json").read_text())
    expected_model = AutoModelForMaskedLM.from_pretrained(project.model_dir("domain")).state_dict()

    killed = tmp_path / "killed"
    prepare(killed, project, tiny_bert)
    cmd = stage_command(killed, project, p, [sys.executable])
    proc = subprocess.Popen(cmd, cwd=killed, env=stage_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = killed / project.checkpoints / "domain" / "trainer"
    deadline = time.time() + 300
    while not list(checkpoints.glob("checkpoint-*/stopping.json")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before its first checkpoint: nothing was tested"
    assert not (killed / project.metrics / "pretrain_domain.json").exists()
    subprocess.run(cmd, cwd=killed, env=stage_env(), check=True, capture_output=True)
    resumed = json.loads((killed / project.metrics / "pretrain_domain.json").read_text())
    assert resumed["steps"] == expected["steps"] and resumed["best_step"] == expected["best_step"]
    for key in ("domain_loss_end", "general_loss_end", "domain_loss_best"):
        assert resumed[key] == pytest.approx(expected[key], abs=1e-3), key
    resumed_model = AutoModelForMaskedLM.from_pretrained(killed / project.model_dir("domain")).state_dict()
    # the same weights (bitwise here): a resumed bf16_weights run that lost its fp32 masters ends 6e-3 away,
    # which the losses above do not show
    torch.testing.assert_close(resumed_model, expected_model, rtol=0, atol=1e-5)
    assert not (killed / project.checkpoints / "domain" / "trainer").exists()  # finished: nothing left to resume


def test_a_run_killed_after_its_last_step_is_not_trained_further(project, tiny_bert, tmp_path, monkeypatch):
    prepare(tmp_path, project, tiny_bert)
    run(P, project, "domain")
    expected = json.loads((project.metrics / "pretrain_domain.json").read_text())
    (project.metrics / "pretrain_domain.json").unlink()

    def crash(*args, **kwargs):  # dies after training, before the outputs: the last checkpoint is the end
        raise KeyboardInterrupt

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(pretrain, "write_json", lambda path, obj: crash() if path.name == "pretrain_domain.json"
                  else write_json(path, obj))
        run(P, project, "domain")
    assert pretrain.resumable(project.checkpoints / "domain" / "trainer").endswith(f"checkpoint-{P.max_steps}")
    run(P, project, "domain")
    resumed = json.loads((project.metrics / "pretrain_domain.json").read_text())
    assert resumed["steps"] == P.max_steps and len(resumed) == len(expected)
    assert resumed["domain_loss_end"] == pytest.approx(expected["domain_loss_end"], abs=1e-6)


@pytest.mark.parametrize("bf16_weights", [False, True])  # True: DDP reduces bf16 gradients
def test_two_processes_with_torchrun(project, tiny_bert, tmp_path, bf16_weights):
    prepare(tmp_path, project, tiny_bert)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    p = P.model_copy(update={"bf16_weights": bf16_weights})
    out = subprocess.run(stage_command(tmp_path, project, p, launcher), cwd=tmp_path, env=stage_env(),
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((project.metrics / "pretrain_domain.json").read_text())
    assert metrics["steps"] == P.max_steps
    assert metrics["tokens_seen"] == P.max_steps * P.batch_size * P.max_seq_length * 2  # both processes trained
    assert AutoModelForMaskedLM.from_pretrained(project.model_dir("domain"))


# ---------------------------------------------------------------------------------------------------
# TAPT: the same recipe on the task's own text, from the model `pretrain.tapt` names

TAPT = {"tapt": "domain_novocab_init", "dapt_tapt": "domain"}
TASK_TEXTS = CORPUS[:3] * 5  # not the domain corpus (CORPUS * 3): a different number of blocks


def test_tapt_starts_are_validated(project):
    p = PretrainParams.model_validate({**P.model_dump(), "variants": ["domain", "domain_novocab"], "tapt": TAPT})
    assert p.tapt == TAPT
    # tapt is TAPT alone (from an _init model), dapt_tapt TAPT after DAPT (from a pretrained variant): the report's
    # rows say so
    with pytest.raises(ValueError, match=r"pretrain\.tapt\.tapt: 'domain' is no model it can start from; one of "
                                         r"domain_novocab_init, domain_init \(an _init model"):
        PretrainParams.model_validate({**p.model_dump(), "tapt": {"tapt": "domain"}})
    with pytest.raises(ValueError, match=r"pretrain\.tapt\.dapt_tapt: 'domain_novocab_init'.*one of domain, "
                                         r"domain_novocab \(a model pretrain.variants trains"):
        PretrainParams.model_validate({**p.model_dump(), "tapt": {"dapt_tapt": "domain_novocab_init"}})
    with pytest.raises(ValueError, match=r"pretrain\.tapt\.dapt_tapt: 'domain_novocab'.*one of domain \("):
        PretrainParams.model_validate({**P.model_dump(), "variants": ["domain"],
                                       "tapt": {"dapt_tapt": "domain_novocab"}})
    assert PretrainParams.model_validate({**P.model_dump(), "variants": ["domain"],
                                          "tapt": {"tapt": "domain_novocab_init"}}).tapt == \
        {"tapt": "domain_novocab_init"}
    with pytest.raises(ParamsError, match=r"pretrain\.tapt\.domain\.\[key\]: Input should be 'tapt' or 'dapt_tapt'"):
        validate_section({"pretrain": {**P.model_dump(), "tapt": {"domain": "domain_init"}}}, "pretrain",
                         PretrainParams)  # only the two TAPT runs
    with pytest.raises(ValueError, match=r"pretrain\.tapt: no start for 'dapt_tapt' \(configured: tapt\)"):
        pretrain.start_dir(P.model_copy(update={"tapt": {"tapt": "domain_init"}}), project, "dapt_tapt")
    with pytest.raises(FileNotFoundError, match=r"models/domain: not found \(pretrain.tapt.dapt_tapt starts from it"):
        pretrain.start_dir(p, project, "dapt_tapt")
    # a new TAPT entry leaves the DAPT runs' checkpoints resumable
    assert pretrain.run_fingerprint(P, [], 1) == pretrain.run_fingerprint(p.model_copy(update={"variants": ["domain"]}),
                                                                         [], 1)


def prepare_tapt(root: Path, project, model_dir: Path, start: str, corpus: list[str] | None = None) -> None:
    """`prepare`'s domain data, the start model also at `models/<start>`, and a task (its records have no `id`)."""
    prepare(root, project, model_dir)
    torch.manual_seed(0)
    AutoModelForMaskedLM.from_pretrained(model_dir).save_pretrained(root / project.model_dir(start))
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(root / project.model_dir(start))
    write_jsonl(root / project.task / "train.jsonl", [{"text": t, "label": "Permissive"} for t in TASK_TEXTS])
    write_jsonl(root / project.task / "dev.jsonl", [{"text": t, "label": "Permissive"} for t in CORPUS[3:5]])
    write_jsonl(root / project.task / "test.jsonl", [{"text": "never trained on", "label": "Permissive"}])
    if corpus is not None:  # a retrieval task's collection, BEIR's field names
        write_jsonl(root / project.task / "corpus.jsonl", [{"_id": f"d{i}", "title": "", "text": t}
                                                           for i, t in enumerate(corpus)])


def test_tapt_trains_on_the_task_text_only(project, tiny_bert):
    import mlflow

    prepare_tapt(Path("."), project, tiny_bert, "domain_novocab_init")
    p = P.model_copy(update={"variants": ["domain", "domain_novocab"], "tapt": TAPT, "snapshots": [0, 50]})
    run(p, project, "tapt")
    m = json.loads((project.metrics / "pretrain_tapt.json").read_text())
    tok = AutoTokenizer.from_pretrained(project.model_dir("domain_novocab_init"))
    assert m["train_blocks"] == len(pack(tok, TASK_TEXTS, P.max_seq_length)) != \
        len(pack(tok, CORPUS * 3, P.max_seq_length))
    assert m["steps"] == P.max_steps and m["tokens_seen"] == P.max_steps * P.batch_size * P.max_seq_length
    manifests = [json.loads(f.read_text()) for f in (project.checkpoints / "tapt" / "tokens").glob("*/tokens.json")]
    # never domain_train; validated on the task's dev text (TAPT's own distribution) and general text
    assert sorted(x["source"] for x in manifests) == sorted(
        map(str, [project.task / "train.jsonl", project.task / "dev.jsonl", project.general_valid]))
    assert AutoModelForMaskedLM.from_pretrained(project.model_dir("tapt")) and \
        AutoTokenizer.from_pretrained(project.model_dir("tapt"))
    assert (project.metrics / "pretrain_tapt_run.json").exists() and \
        (project.metrics / "pretrain_tapt_curve.csv").read_text().startswith("step,domain_loss,")
    assert not (project.models / "tapt_snapshots").exists()  # the adaptation curve is domain's alone
    [run_] = mlflow.search_runs(experiment_names=["dapt"], output_format="list",
                                filter_string="tags.stage = 'pretrain'")
    assert run_.info.run_name == "pretrain-tapt" and run_.data.tags["variant"] == "tapt"


def test_tapt_of_a_retrieval_task_reads_its_collection_too(project, tiny_bert, monkeypatch):
    collection = list(reversed(CORPUS))
    prepare_tapt(Path("."), project, tiny_bert, "domain", corpus=collection)
    logged = []
    monkeypatch.setattr(pretrain.registry, "log_stage_model", lambda *a, inputs, **k: logged.append(inputs))
    p = P.model_copy(update={"tapt": {"dapt_tapt": "domain"}, "head_warmup_steps": 0, "max_steps": 3})
    run(p, project, "dapt_tapt")
    m = json.loads((project.metrics / "pretrain_dapt_tapt.json").read_text())
    tok = AutoTokenizer.from_pretrained(project.model_dir("domain"))
    # one stream: the train set's text, then the collection's
    assert m["train_blocks"] == len(pack(tok, TASK_TEXTS + collection, P.max_seq_length))
    assert logged == [[project.model_dir("domain"), project.task, project.task / "train.jsonl",
                       project.task / "corpus.jsonl", project.task / "dev.jsonl", project.general_valid]]
    assert project.model_dir("dapt_tapt").is_dir() and not (project.models / "dapt_tapt_snapshots").exists()
