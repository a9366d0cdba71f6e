"""pretrain: continued masked-language-model training on domain text (DAPT).

Recipe: documents packed into full blocks of `max_seq_length` (a separator between documents, no padding);
`mlm_probability` of the tokens selected afresh every time a block is seen (dynamic masking), of those
80% [MASK] / 10% random / 10% unchanged; the MLM head is computed at the selected positions only (sparse
prediction: the loss is only defined there, and the vocabulary projection dominates a small model's step).

The demo base model has no MLM head, so the head is first trained alone for `head_warmup_steps` with the
encoder frozen. Then every `eval_steps` the model is scored on held-out domain text and on general text
(masks fixed once, so evaluations are comparable). Training stops when domain loss has not improved by
`min_delta` for `patience` evaluations, or when general loss rises more than `max_general_degradation`
above its best so far (over-specialisation). The best evaluation that respects the general constraint is
saved to `models/<variant>`; the first evaluation (before any DAPT step) always qualifies.

Variants (`pretrain.variants`): `domain` starts from the adapted tokenizer and embeddings
(`models/domain_init`), `domain_novocab` from the base vocabulary with the same MLM head
(`models/domain_novocab_init`): the same recipe on both separates the gain from new vocabulary from the gain
from continued pretraining.

Run: `dvc repro pretrain` (every variant) or `python -m stages.pretrain --variant domain`.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import mlflow
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from tqdm.auto import tqdm
from transformers import AutoModelForMaskedLM, AutoTokenizer, DataCollatorForLanguageModeling, \
    PreTrainedTokenizerBase, Trainer, TrainerCallback, TrainingArguments, set_seed

from stages import tracking
from stages.common import Paths, Section, atomic_path, load_params, load_paths, log, read_jsonl, \
    setup_logging, write_json, write_text


PretrainVariant = Literal["domain", "domain_novocab"]


class PretrainParams(Section):
    variants: list[PretrainVariant] = Field(min_length=1)
    seed: int = 0
    max_seq_length: int = Field(ge=16, le=8192)
    mlm_probability: float = Field(gt=0, lt=1)
    mask_replace_prob: float = Field(ge=0, le=1)
    random_replace_prob: float = Field(ge=0, le=1)
    batch_size: int = Field(ge=1)
    learning_rate: float = Field(gt=0, lt=1)
    weight_decay: float = Field(ge=0)
    warmup_ratio: float = Field(ge=0, lt=1)
    head_warmup_steps: int = Field(ge=0)
    head_warmup_learning_rate: float = Field(gt=0, lt=1)
    max_steps: int = Field(ge=1)
    eval_steps: int = Field(ge=1)
    max_eval_blocks: int = Field(ge=1)
    patience: int = Field(ge=1)
    min_delta: float = Field(ge=0)
    max_general_degradation: float = Field(gt=0)

    @model_validator(mode="after")
    def _probabilities(self) -> PretrainParams:
        if self.mask_replace_prob + self.random_replace_prob > 1:
            raise ValueError("pretrain.mask_replace_prob + pretrain.random_replace_prob must not exceed 1")
        return self


# ---------------------------------------------------------------------------------------------------
# data: pack documents into full blocks


def pack(tok: PreTrainedTokenizerBase, texts: Sequence[str], block: int) -> torch.Tensor:
    """[CLS] + `block - 1` tokens per row, documents joined by [SEP]; the ragged tail is dropped."""
    cls_id = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
    sep_id = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
    stream: list[int] = []
    chunk = 1000  # documents per tokenizer call: batched for speed, small enough for a live progress bar
    for start in tqdm(range(0, len(texts), chunk), desc="tokenising", unit="kdoc", disable=len(texts) <= chunk):
        for ids in tok(list(texts[start:start + chunk]), add_special_tokens=False)["input_ids"]:
            stream.extend(ids)
            stream.append(sep_id)
    body = block - 1
    n = len(stream) // body
    if n == 0:
        raise ValueError(f"pretrain: {len(stream)} tokens are not enough for one block of {block}")
    rows = torch.tensor(stream[: n * body], dtype=torch.long).view(n, body)
    return torch.cat([torch.full((n, 1), cls_id, dtype=torch.long), rows], dim=1)


def make_collator(tok: PreTrainedTokenizerBase, p: PretrainParams, seed: int | None = None):
    """The masking recipe; with `seed`, the masks are reproducible (validation)."""
    return DataCollatorForLanguageModeling(tok, mlm_probability=p.mlm_probability, mask_replace_prob=p.mask_replace_prob,
                                           random_replace_prob=p.random_replace_prob, seed=seed)


def fixed_eval_batches(blocks: torch.Tensor, collator, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Mask the validation blocks once, so every evaluation scores the same positions."""
    rows = [{"input_ids": b} for b in blocks]
    return [collator(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]


# ---------------------------------------------------------------------------------------------------
# model: the MLM head at masked positions only


def mlm_head(model: torch.nn.Module) -> torch.nn.Module:
    """The module mapping hidden states to vocabulary logits, for the families we support."""
    for attr in ("cls", "lm_head"):  # BERT, RoBERTa
        if hasattr(model, attr):
            return getattr(model, attr)
    if hasattr(model, "head") and hasattr(model, "decoder"):  # ModernBERT: transform, then projection
        return torch.nn.Sequential(model.head, model.decoder)
    raise ValueError(f"pretrain: no MLM head found on {type(model).__name__}")


class SparseMLM(torch.nn.Module):
    """Wraps an `...ForMaskedLM` model; the vocabulary projection runs only where labels are set.

    Being the module the Trainer trains (rather than a `compute_loss` override), it stays correct under
    DDP, where only the wrapped module's forward synchronises gradients.
    """

    def __init__(self, mlm: torch.nn.Module):
        super().__init__()
        self.mlm = mlm

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        hidden = self.mlm.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        selected = labels != -100
        logits = mlm_head(self.mlm)(hidden[selected])
        target = labels[selected]
        loss = F.cross_entropy(logits.float(), target, reduction="sum")
        correct = (logits.argmax(-1) == target).sum()
        n = target.numel()
        return {"loss": loss / max(n, 1), "loss_sum": loss.detach(), "correct": correct, "count": torch.tensor(n)}


@torch.no_grad()
def evaluate(model: SparseMLM, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Token-weighted MLM loss, perplexity and masked-token accuracy on fixed batches."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss = correct = count = 0.0
    for batch in batches:
        out = model(**{k: v.to(device) for k, v in batch.items()})
        loss += out["loss_sum"].item()
        correct += out["correct"].item()
        count += out["count"].item()
    model.train(was_training)
    mean = loss / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50)), "accuracy": correct / max(count, 1)}


# ---------------------------------------------------------------------------------------------------
# early stopping on two validation sets


class DomainGeneralStopping(TrainerCallback):
    """Evaluate on domain and general text, keep the best admissible model, stop when it stops paying.

    Admissible: general loss within `max_general_degradation` of its best so far. Better: domain loss lower
    than the best admissible one by at least `min_delta`.
    """

    def __init__(self, p: PretrainParams, eval_sets: dict[str, list], best_dir: Path, tok: PreTrainedTokenizerBase | None,
                 step_offset: int):
        self.p, self.eval_sets, self.best_dir, self.tok = p, eval_sets, best_dir, tok
        self.step_offset = step_offset  # head-warmup steps, so curves share one step axis
        self.history: list[dict] = []
        self.best: dict | None = None
        self.best_general = math.inf
        self.bad_evals = 0
        self.stop_reason = "max_steps"

    def evaluate_and_decide(self, model: SparseMLM, step: int) -> bool:
        """Score, maybe save, and return True when training should stop."""
        row: dict = {"step": step}
        for name, batches in self.eval_sets.items():
            for key, value in evaluate(model, batches).items():
                row[f"{name}_{key}"] = value
        self.history.append(row)
        tracking.log_metrics({f"eval_{k}": v for k, v in row.items() if k != "step"}, step=step)
        log.info("eval step %d: %s", step, {k: round(v, 4) for k, v in row.items() if k != "step"})

        self.best_general = min(self.best_general, row["general_loss"])
        degraded = row["general_loss"] > self.best_general * (1 + self.p.max_general_degradation)
        improved = self.best is None or row["domain_loss"] < self.best["domain_loss"] - self.p.min_delta
        if improved and not degraded:
            self.best, self.bad_evals = row, 0
            self.save(model)
        else:
            self.bad_evals += 1
        if degraded:
            self.stop_reason = "general_degradation"
        elif self.bad_evals >= self.p.patience:
            self.stop_reason = "patience"
        return self.stop_reason != "max_steps"

    def save(self, model: SparseMLM) -> None:
        """Keep the current model and tokenizer as the best so far (in scratch; moved into place at the end)."""
        with atomic_path(self.best_dir) as tmp:
            model.mlm.save_pretrained(tmp)
            self.tok.save_pretrained(tmp)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.p.eval_steps == 0 or state.global_step >= state.max_steps:
            if self.evaluate_and_decide(model, self.step_offset + state.global_step):
                control.should_training_stop = True
        return control


def training_args(p: PretrainParams, out: Path, lr: float, steps: int, warmup: float, seed: int) -> TrainingArguments:
    """Trainer settings shared by both phases; bf16 and fused AdamW where the hardware has them."""
    cuda = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=p.batch_size, learning_rate=lr,
        weight_decay=p.weight_decay, warmup_steps=int(warmup * steps), lr_scheduler_type="linear",
        logging_steps=10, save_strategy="no", eval_strategy="no", report_to="none", seed=seed,
        bf16=cuda and torch.cuda.is_bf16_supported(), optim="adamw_torch_fused" if cuda else "adamw_torch",
        dataloader_drop_last=True, dataloader_pin_memory=cuda, remove_unused_columns=False, disable_tqdm=False,
    )


def curve_csv(history: list[dict]) -> str:
    """The evaluation history as CSV, for `dvc plots`."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------


def run(p: PretrainParams, paths: Paths, variant: str = "domain") -> None:
    """Continued MLM pretraining of `variant`, from `models/<variant>_init` to `models/<variant>`."""
    start = paths.init_dir(variant)
    with tracking.stage_run("pretrain", p, run_name=f"pretrain-{variant}", tags={"variant": variant}):
        # seed
        set_seed(p.seed)
        started = time.time()

        # data
        tok = AutoTokenizer.from_pretrained(start)
        train_blocks = pack(tok, [d["text"] for d in read_jsonl(paths.domain_train)], p.max_seq_length)
        eval_collator = make_collator(tok, p, seed=p.seed)
        eval_sets = {
            name: fixed_eval_batches(pack(tok, [d["text"] for d in read_jsonl(path)], p.max_seq_length)
                                     [: p.max_eval_blocks], eval_collator, p.batch_size)
            for name, path in (("domain", paths.domain_valid), ("general", paths.general_valid))
        }
        train_dataset = [{"input_ids": b} for b in train_blocks]
        log.info("pretrain: %d training blocks of %d tokens", len(train_blocks), p.max_seq_length)

        # model
        model = SparseMLM(AutoModelForMaskedLM.from_pretrained(start))
        collator = make_collator(tok, p)
        scratch = Path(tempfile.mkdtemp(prefix="pretrain-"))

        # head warm-up: encoder (and tied embeddings) frozen, only the head's own weights learn
        if p.head_warmup_steps > 0:
            head_params = {id(w) for w in mlm_head(model.mlm).parameters()} - \
                {id(w) for w in model.mlm.base_model.parameters()}
            for w in model.parameters():
                w.requires_grad_(id(w) in head_params)
            Trainer(model=model, args=training_args(p, scratch, p.head_warmup_learning_rate, p.head_warmup_steps, 0.0,
                                                    p.seed),
                    train_dataset=train_dataset, data_collator=collator,
                    callbacks=[tracking.MLflowLogger("head_")]).train()
            for w in model.parameters():
                w.requires_grad_(True)

        # train: evaluate first, so the unadapted model is the baseline and the first admissible checkpoint
        stopping = DomainGeneralStopping(p, eval_sets, scratch / "best", tok, step_offset=p.head_warmup_steps)
        stopping.evaluate_and_decide(model, p.head_warmup_steps)
        # another seed than the warm-up's: the same one would replay its blocks in the same order with the same masks
        trainer = Trainer(model=model, args=training_args(p, scratch, p.learning_rate, p.max_steps, p.warmup_ratio,
                                                          p.seed + 1),
                          train_dataset=train_dataset, data_collator=collator,
                          callbacks=[stopping, tracking.MLflowLogger(step_offset=p.head_warmup_steps)])
        trainer.train()

        # save: the best admissible checkpoint becomes the output in one step, so a crash leaves none
        with atomic_path(paths.model_dir(variant)) as tmp:
            shutil.move(scratch / "best", tmp)
        shutil.rmtree(scratch, ignore_errors=True)
        first, best, last = stopping.history[0], stopping.best, stopping.history[-1]
        metrics = {
            "stop_reason": stopping.stop_reason,
            "steps": trainer.state.global_step,
            "best_step": best["step"] - p.head_warmup_steps,
            "train_blocks": len(train_blocks),
            "tokens_seen": trainer.state.global_step * p.batch_size * p.max_seq_length,
            "seconds": round(time.time() - started, 1),
            **{f"{k}_start": v for k, v in first.items() if k != "step"},
            **{f"{k}_best": v for k, v in best.items() if k != "step"},
            **{f"{k}_end": v for k, v in last.items() if k != "step"},
        }
        write_json(paths.metrics / f"pretrain_{variant}.json", metrics)
        write_text(paths.metrics / f"pretrain_{variant}_curve.csv", curve_csv(stopping.history))
        tracking.log_metrics({k: v for k, v in metrics.items() if k != "stop_reason"})
        mlflow.set_tag("stop_reason", stopping.stop_reason)
        mlflow.log_artifact(str(paths.metrics / f"pretrain_{variant}_curve.csv"))
        log.info("pretrain: %s", metrics)


def main() -> None:
    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="domain", choices=["domain", "domain_novocab"])
    run(load_params("pretrain", PretrainParams), load_paths(), parser.parse_args().variant)


if __name__ == "__main__":
    main()
