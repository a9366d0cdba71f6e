"""pretrain: continued masked-language-model training on domain text (DAPT).

Recipe (all in params.yaml `pretrain`): documents packed into full blocks of `max_seq_length` (a separator
between documents, no padding); `mlm_probability` of the tokens (or of the words, with `whole_word_mask`)
selected afresh every time a block is seen (dynamic masking), never special tokens; of those 80% [MASK] /
10% a random real token / 10% unchanged; the MLM head computed at the selected positions only (sparse
prediction: the loss is only defined there, and the vocabulary projection dominates a small model's step).
`general_replay` mixes that share of general-text blocks into training.

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

Crash safety: every `save_steps` a checkpoint (model, optimiser, scheduler, RNG states, data position and
the early-stopping state) goes to `checkpoints/<variant>`, which DVC keeps between runs (`persist`), as
does the tokenised data (`blocks/`). Rerunning the stage after a crash resumes from the last checkpoint of a
run with the same params and inputs.

Run: `dvc repro pretrain` (every variant) or `python -m stages.pretrain --variant domain`. Several processes
or GPUs: set `pretrain.launcher` (e.g. `torchrun --nproc_per_node 4`), which dvc.yaml puts before `-m`.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import json
import math
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import mlflow
import torch
import torch.nn.functional as F
from accelerate import PartialState
from pydantic import Field, model_validator
from tqdm.auto import tqdm
from transformers import AutoModelForMaskedLM, AutoTokenizer, PreTrainedTokenizerBase, Trainer, TrainerCallback, \
    TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from stages import tracking
from stages.common import Paths, Section, atomic_path, load_params, load_paths, log, read_jsonl, \
    setup_logging, write_json, write_text

PretrainVariant = Literal["domain", "domain_novocab"]


class PretrainParams(Section):
    variants: list[PretrainVariant] = Field(min_length=1)
    launcher: str = "python"
    seed: int = 0
    max_seq_length: int = Field(ge=16, le=8192)
    mlm_probability: float = Field(gt=0, lt=1)
    mask_replace_prob: float = Field(ge=0, le=1)
    random_replace_prob: float = Field(ge=0, le=1)
    whole_word_mask: bool = False
    general_replay: float = Field(0.0, ge=0, lt=1)
    batch_size: int = Field(ge=1)
    learning_rate: float = Field(gt=0, lt=1)
    weight_decay: float = Field(ge=0)
    warmup_ratio: float = Field(ge=0, lt=1)
    head_warmup_steps: int = Field(ge=0)
    head_warmup_learning_rate: float = Field(gt=0, lt=1)
    max_steps: int = Field(ge=1)
    eval_steps: int = Field(ge=1)
    save_steps: int = Field(ge=1)
    max_eval_blocks: int = Field(ge=1)
    patience: int = Field(ge=1)
    min_delta: float = Field(ge=0)
    max_general_degradation: float = Field(gt=0)
    torch_compile: bool = False
    dataloader_workers: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _probabilities(self) -> PretrainParams:
        if self.mask_replace_prob + self.random_replace_prob > 1:
            raise ValueError("pretrain.mask_replace_prob + pretrain.random_replace_prob must not exceed 1")
        return self


# ---------------------------------------------------------------------------------------------------
# data: pack documents into full blocks, once per tokenizer and text


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


def cached_blocks(tok: PreTrainedTokenizerBase, path: Path, block: int, cache: Path) -> torch.Tensor:
    """`pack` of a JSONL file, kept in `cache` under a hash of the tokenizer, the file and the block size."""
    key = hashlib.sha1(tok.backend_tokenizer.to_str().encode() + path.read_bytes() + str(block).encode()).hexdigest()
    file = cache / f"blocks-{key[:16]}.pt"
    if file.exists():
        return torch.load(file)
    blocks = pack(tok, [d["text"] for d in read_jsonl(path)], block)
    if PartialState().is_main_process:
        cache.mkdir(parents=True, exist_ok=True)
        with atomic_path(file) as tmp:
            torch.save(blocks, tmp)
    return blocks


def with_replay(domain: torch.Tensor, general: torch.Tensor | None, share: float, seed: int) -> torch.Tensor:
    """Domain blocks plus general blocks (drawn with replacement) making up `share` of the result."""
    if not share or general is None:
        return domain
    n = round(share / (1 - share) * len(domain))
    pick = torch.randint(len(general), (n,), generator=torch.Generator().manual_seed(seed))
    return torch.cat([domain, general[pick]])


class Blocks(torch.utils.data.Dataset):
    """Packed blocks, each handed out with a masking seed drawn from (seed, epoch, index).

    Dynamic masking without the global RNG: a block gets new masks every epoch, and a run resumed from a
    checkpoint draws exactly the masks the uninterrupted run would have (the Trainer restores its RNG state
    only after the first resumed batch has been collated). `EpochSetter` keeps `epoch` current.
    """

    def __init__(self, blocks: torch.Tensor, seed: int):
        self.blocks, self.seed, self.epoch = blocks, seed, 0

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.blocks[i], "mask_seed": ((self.seed * 1_000_003 + self.epoch) * 2_147_483_647 + i)
                % 2**63}


class EpochSetter(TrainerCallback):
    def __init__(self, dataset: Blocks):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.epoch = math.floor(state.epoch + 1e-9)  # a resumed run re-enters its epoch mid-way
        return control


# ---------------------------------------------------------------------------------------------------
# masking


def word_starts(tok: PreTrainedTokenizerBase) -> torch.Tensor:
    """Per vocabulary id, whether the token begins a word: WordPiece marks continuations ("##ing"), byte-level
    BPE marks word starts ("Ġword"). Special tokens count as starts, so a word never spans a document edge."""
    vocab = tok.get_vocab()
    table = torch.zeros(max(vocab.values()) + 1, dtype=torch.bool)
    prefix = getattr(tok.backend_tokenizer.model, "continuing_subword_prefix", None)
    for token, i in vocab.items():
        table[i] = not token.startswith(prefix) if prefix else token.startswith("Ġ")
    table[tok.all_special_ids] = True
    return table


class MaskingCollator:
    """BERT's masking recipe on packed blocks, drawn afresh on every call (dynamic masking).

    Each token that is not special (with `whole_word`: each word) is selected with `mlm_probability`; of the
    selected, `mask_replace_prob` become [MASK], `random_replace_prob` a random token, the rest stay. Only the
    selected positions get labels. Written here rather than taken from `DataCollatorForLanguageModeling`, which
    draws random replacements from the whole vocabulary, special tokens included, and whose whole-word option
    needs character offsets that packed blocks no longer have.
    """

    def __init__(self, tok: PreTrainedTokenizerBase, mlm_probability: float, mask_replace_prob: float,
                 random_replace_prob: float, whole_word: bool = False, seed: int | None = None):
        self.p, self.mask_p, self.random_p = mlm_probability, mask_replace_prob, random_replace_prob
        self.mask_id = tok.mask_token_id
        ids = torch.tensor(sorted(set(tok.get_vocab().values())))
        specials = torch.tensor(sorted(set(tok.all_special_ids)))
        self.real_ids = ids[~torch.isin(ids, specials)]  # what a random replacement may be
        self.special = torch.zeros(int(ids.max()) + 1, dtype=torch.bool)
        self.special[specials] = True
        self.starts = word_starts(tok) if whole_word else None
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None  # else torch's own

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        input_ids = torch.stack([r["input_ids"] for r in rows])
        if "mask_seed" in rows[0]:  # per-block seeds (see `Blocks`)
            u = torch.stack([torch.rand((3, input_ids.shape[1]), generator=torch.Generator().manual_seed(r["mask_seed"]))
                             for r in rows], dim=1)
        else:
            u = torch.rand((3, *input_ids.shape), generator=self.generator)
        draw, how, pick = u
        if self.starts is not None:  # every token of a word takes the draw of the word's first token
            position = torch.arange(input_ids.shape[1]).expand_as(input_ids)
            first = torch.where(self.starts[input_ids], position, 0).cummax(-1).values
            draw = draw.gather(-1, first)
        selected = (draw < self.p) & ~self.special[input_ids]
        labels = torch.where(selected, input_ids, -100)
        masked = selected & (how < self.mask_p)
        randomised = selected & (how >= self.mask_p) & (how < self.mask_p + self.random_p)
        random_ids = self.real_ids[(pick * len(self.real_ids)).long().clamp(max=len(self.real_ids) - 1)]
        input_ids = torch.where(masked, self.mask_id, torch.where(randomised, random_ids, input_ids))
        return {"input_ids": input_ids, "labels": labels}


def make_collator(tok: PreTrainedTokenizerBase, p: PretrainParams, seed: int | None = None) -> MaskingCollator:
    """The masking recipe of `p`; with `seed`, the masks are reproducible (validation)."""
    return MaskingCollator(tok, p.mlm_probability, p.mask_replace_prob, p.random_replace_prob, p.whole_word_mask, seed)


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
        # tied tensors (input embeddings = output layer) after their first name: the Trainer's checkpoints
        # (safetensors) refuse shared memory, and on loading it re-ties what these names leave out
        seen, self._keys_to_ignore_on_save = set(), []
        for key, t in super().state_dict().items():
            where = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
            if where in seen:
                self._keys_to_ignore_on_save.append(key)
            seen.add(where)

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

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        state = super().state_dict(*args, **kwargs)
        for key in self._keys_to_ignore_on_save:
            state.pop(key, None)
        return state

    def tie_weights(self) -> None:
        self.mlm.tie_weights()


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
# early stopping on two validation sets, with its state in every checkpoint


class DomainGeneralStopping(TrainerCallback):
    """Evaluate on domain and general text, keep the best admissible model, stop when it stops paying.

    Admissible: general loss within `max_general_degradation` of its best so far. Better: domain loss lower
    than the best admissible one by at least `min_delta`. Each best model is saved as `best/step-<n>`; the
    older ones go once a checkpoint records the newer, so a crash at any moment leaves the one the resumed
    run's state points to.
    """

    STATE = "stopping.json"

    def __init__(self, p: PretrainParams, eval_sets: dict[str, list], best_root: Path,
                 tok: PreTrainedTokenizerBase | None, step_offset: int, main_process: bool = True):
        self.p, self.eval_sets, self.best_root, self.tok = p, eval_sets, best_root, tok
        self.step_offset = step_offset  # head-warmup steps, so curves share one step axis
        self.main_process = main_process  # under several processes, only one writes
        self.history: list[dict] = []
        self.best: dict | None = None
        self.best_general = math.inf
        self.bad_evals = 0
        self.stop_reason = "max_steps"

    @property
    def best_dir(self) -> Path:
        return self.best_root / f"step-{self.best['step']}"

    def evaluate_and_decide(self, model: SparseMLM, step: int) -> bool:
        """Score, maybe save, and return True when training should stop."""
        row: dict = {"step": step}
        for name, batches in self.eval_sets.items():
            for key, value in evaluate(model, batches).items():
                row[f"{name}_{key}"] = value
        self.history.append(row)
        if self.main_process:
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
        """Keep the current model and tokenizer as the best so far."""
        if self.main_process:
            with atomic_path(self.best_dir) as tmp:
                model.mlm.save_pretrained(tmp)
                self.tok.save_pretrained(tmp)

    def state(self) -> dict:
        return {"history": self.history, "best": self.best, "best_general": self.best_general,
                "bad_evals": self.bad_evals, "stop_reason": self.stop_reason}

    def restore(self, checkpoint: Path) -> None:
        """Continue from the state saved with `checkpoint`; drop best models it does not know."""
        for key, value in json.loads((checkpoint / self.STATE).read_text()).items():
            setattr(self, key, value)
        self.prune()

    def prune(self) -> None:
        if self.main_process and self.best_root.is_dir():
            for old in self.best_root.glob("step-*"):
                if self.best is None or old != self.best_dir:
                    shutil.rmtree(old)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.p.eval_steps == 0 or state.global_step >= state.max_steps:
            if self.evaluate_and_decide(model, self.step_offset + state.global_step):
                control.should_training_stop = True
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.main_process:
            write_json(Path(args.output_dir) / f"checkpoint-{state.global_step}" / self.STATE, self.state())
            self.prune()
        return control


def training_args(p: PretrainParams, out: Path, lr: float, steps: int, warmup: float, seed: int,
                  save: bool) -> TrainingArguments:
    """Trainer settings shared by both phases; bf16, fused AdamW and pinned memory where there is a GPU."""
    cuda = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=p.batch_size, learning_rate=lr,
        weight_decay=p.weight_decay, warmup_steps=int(warmup * steps), lr_scheduler_type="linear",
        logging_steps=10, eval_strategy="no", report_to="none", seed=seed,
        save_strategy="steps" if save else "no", save_steps=p.save_steps, save_total_limit=1,
        bf16=cuda and torch.cuda.is_bf16_supported(), tf32=cuda or None,
        use_cpu=not cuda,  # also what makes several CPU processes (gloo) one distributed run
        optim="adamw_torch_fused" if cuda else "adamw_torch", torch_compile=p.torch_compile,
        dataloader_drop_last=True, dataloader_pin_memory=cuda, dataloader_num_workers=p.dataloader_workers,
        remove_unused_columns=False, disable_tqdm=False,
        ddp_find_unused_parameters=False,  # every parameter gets a gradient: skip DDP's search for unused ones
    )


def curve_csv(history: list[dict]) -> str:
    """The evaluation history as CSV, for `dvc plots`."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    return buf.getvalue()


def clear_run_state(work: Path) -> None:
    """Forget a run's checkpoints and best models; the token cache (`blocks/`) stays."""
    for part in ("trainer", "best", "warmup"):
        shutil.rmtree(work / part, ignore_errors=True)


def run_fingerprint(p: PretrainParams, files: Sequence[Path]) -> str:
    """What a checkpoint must match to be resumed: the params and every input file's bytes."""
    h = hashlib.sha1(p.model_dump_json(exclude={"variants", "launcher", "dataloader_workers"}).encode())
    for f in sorted(files):
        h.update(str(f).encode())
        h.update(hashlib.sha1(f.read_bytes()).digest())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------


def run(p: PretrainParams, paths: Paths, variant: str = "domain") -> None:
    """Continued MLM pretraining of `variant`, from `models/<variant>_init` to `models/<variant>`."""
    start, work = paths.init_dir(variant), paths.checkpoints / variant
    # first: under torchrun/accelerate, TrainingArguments joins the processes (every one trains, one writes)
    args = training_args(p, work / "trainer", p.learning_rate, p.max_steps, p.warmup_ratio, p.seed + 1, save=True)
    state = PartialState()
    main = state.is_main_process

    # resume: only a checkpoint of this very run (same params, model and data) is picked up
    inputs = [f for f in start.rglob("*") if f.is_file()] + [paths.domain_train, paths.domain_valid, paths.general_valid]
    if p.general_replay:
        inputs.append(paths.general_train)
    fingerprint = run_fingerprint(p, inputs)
    if main and (work / "run.json").exists() and json.loads((work / "run.json").read_text()) != fingerprint:
        clear_run_state(work)
    state.wait_for_everyone()
    resume = get_last_checkpoint(str(work / "trainer")) if (work / "trainer").is_dir() else None
    if main:
        write_json(work / "run.json", fingerprint)
    if resume:
        log.info("pretrain: resuming %s from %s", variant, resume)

    run_context = tracking.stage_run("pretrain", p, run_name=f"pretrain-{variant}", tags={"variant": variant}) \
        if main else contextlib.nullcontext()
    with run_context:
        # seed
        set_seed(p.seed)
        started = time.time()

        # data: tokenised and packed once per tokenizer, then read from the cache
        tok = AutoTokenizer.from_pretrained(start)
        cache = work / "blocks"
        domain_blocks = cached_blocks(tok, paths.domain_train, p.max_seq_length, cache)
        general_blocks = cached_blocks(tok, paths.general_train, p.max_seq_length, cache) if p.general_replay else None
        train_blocks = with_replay(domain_blocks, general_blocks, p.general_replay, p.seed)
        eval_collator = make_collator(tok, p, seed=p.seed)
        eval_sets = {
            name: fixed_eval_batches(cached_blocks(tok, path, p.max_seq_length, cache)[: p.max_eval_blocks],
                                     eval_collator, p.batch_size)
            for name, path in (("domain", paths.domain_valid), ("general", paths.general_valid))
        }
        warmup_dataset, train_dataset = Blocks(train_blocks, p.seed), Blocks(train_blocks, p.seed + 1)
        log.info("pretrain: %d training blocks of %d tokens (%d general)", len(train_blocks), p.max_seq_length,
                 len(train_blocks) - len(domain_blocks))

        # model: PyTorch's fused attention (SDPA) where the architecture has it
        model = SparseMLM(AutoModelForMaskedLM.from_pretrained(start, attn_implementation="sdpa"))
        collator = make_collator(tok, p)
        loggers = [tracking.MLflowLogger(step_offset=p.head_warmup_steps)] if main else []

        # head warm-up: encoder (and tied embeddings) frozen, only the head's own weights learn. A resumed
        # run skips it: its checkpoint holds the warmed-up head
        if p.head_warmup_steps > 0 and resume is None:
            head_params = {id(w) for w in mlm_head(model.mlm).parameters()} - \
                {id(w) for w in model.mlm.base_model.parameters()}
            for w in model.parameters():
                w.requires_grad_(id(w) in head_params)
            Trainer(model=model, args=training_args(p, work / "warmup", p.head_warmup_learning_rate,
                                                    p.head_warmup_steps, 0.0, p.seed, save=False),
                    train_dataset=warmup_dataset, data_collator=collator,
                    callbacks=[EpochSetter(warmup_dataset), *([tracking.MLflowLogger("head_")] if main else [])]).train()
            for w in model.parameters():
                w.requires_grad_(True)

        # train: evaluate first, so the unadapted model is the baseline and the first admissible checkpoint
        stopping = DomainGeneralStopping(p, eval_sets, work / "best", tok, p.head_warmup_steps, main)
        if resume:
            stopping.restore(Path(resume))
        else:
            stopping.evaluate_and_decide(model, p.head_warmup_steps)
        # another seed than the warm-up's: the same one would replay its blocks in the same order with the same masks
        trainer = Trainer(model=model, args=args, train_dataset=train_dataset, data_collator=collator,
                          callbacks=[EpochSetter(train_dataset), stopping, *loggers])
        trainer.train(resume_from_checkpoint=resume)
        if not main:
            return

        # save: the best admissible checkpoint becomes the output in one step, so a crash leaves none
        with atomic_path(paths.model_dir(variant)) as tmp:
            shutil.copytree(stopping.best_dir, tmp)
        first, best, last = stopping.history[0], stopping.best, stopping.history[-1]
        steps = trainer.state.global_step
        metrics = {
            "stop_reason": stopping.stop_reason,
            "steps": steps,
            "best_step": best["step"] - p.head_warmup_steps,
            "train_blocks": len(train_blocks),
            "tokens_seen": steps * p.batch_size * p.max_seq_length * state.num_processes,
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
        clear_run_state(work)  # finished: nothing left to resume (the tokenised blocks stay cached)
        log.info("pretrain: %s", metrics)


def main() -> None:
    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="domain", choices=["domain", "domain_novocab"])
    run(load_params("pretrain", PretrainParams), load_paths(), parser.parse_args().variant)


if __name__ == "__main__":
    main()
