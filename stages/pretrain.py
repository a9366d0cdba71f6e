"""pretrain: continued masked-language-model training on domain text (DAPT).

Recipe (all in params.yaml `pretrain`): documents packed into full blocks of `max_seq_length` (a separator
between documents, no padding); `mlm_probability` of the tokens (or of the words, with `whole_word_mask`)
selected afresh every time a block is seen (dynamic masking), never special tokens; of those 80% [MASK] /
10% a random real token / 10% unchanged; the MLM head computed at the selected positions only (sparse
prediction: the loss is only defined there, and the vocabulary projection dominates a small model's step).
`general_replay` mixes that share of general-text blocks into training. On a GPU the model computes in bf16
autocast or, with `bf16_weights`, holds bf16 weights that AdamW updates through fp32 master copies
(`MasterWeightAdamW`); either way it is evaluated and saved in fp32.

The demo base model has no MLM head, so the head is first trained alone for `head_warmup_steps` with the
encoder frozen. Then every `eval_steps` the model is scored on held-out domain text and on general text
(masks fixed once, so evaluations are comparable). Training stops when domain loss has not improved by
`min_delta` for `patience` evaluations, or when general loss rises more than `max_general_degradation`
above its best so far (over-specialisation). The best evaluation that respects the general constraint is
saved to `models/<variant>`; the first evaluation (before any DAPT step) always qualifies.

Adaptation curve: the model at each of `snapshots` (percent of `max_steps`) is kept in
`models/<variant>_snapshots/<percent>` with what it cost (step, tokens seen, device-hours), so `finetune --at`
can show whether more DAPT pays. A run that stops early keeps its final model for the snapshots it never reached.

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
from accelerate import PartialState
from pydantic import Field, model_validator
from transformers import AutoModelForMaskedLM, AutoTokenizer, PreTrainedTokenizerBase, Trainer, TrainerCallback, set_seed

from stages import tracking
from stages.common import Paths, Section, atomic_path, load_params, load_paths, log, read_jsonl, \
    setup_logging, write_json, write_text
from stages import mlm
from stages.mlm import Blocks, EpochSetter, MaskingCollator, SparseMLM, compile_regions, evaluate, fixed_eval_batches, \
    full_precision, master_weights, own_head_parameters, pack, training_args

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
    bf16_weights: bool = False
    dataloader_workers: int = Field(0, ge=0)
    snapshots: list[int] = Field(default_factory=list)

    @model_validator(mode="after")
    def _probabilities(self) -> PretrainParams:
        if self.mask_replace_prob + self.random_replace_prob > 1:
            raise ValueError("pretrain.mask_replace_prob + pretrain.random_replace_prob must not exceed 1")
        if any(not 0 <= pct < 100 for pct in self.snapshots) or len(self.snapshot_steps()) != len(self.snapshots):
            raise ValueError(f"pretrain.snapshots: percentages in 0..99 (100% is the final model) that fall on "
                             f"distinct steps of max_steps {self.max_steps}, got {self.snapshots}")
        return self

    def snapshot_steps(self) -> dict[int, int]:
        """DAPT step -> snapshot percent (step 0: after the head warm-up, before any encoder update)."""
        return {round(pct / 100 * self.max_steps): pct for pct in self.snapshots}


# ---------------------------------------------------------------------------------------------------
# data and masking (the recipe itself is in stages/mlm.py)


def cached_blocks(tok: PreTrainedTokenizerBase, path: Path, block: int, cache: Path) -> torch.Tensor:
    """`pack` of a JSONL file, kept in `cache` under a hash of the tokenizer, the file and the block size."""
    key = hashlib.sha1(tok.backend_tokenizer.to_str().encode() + path.read_bytes() + str(block).encode()
                       + Path(mlm.__file__).read_bytes()).hexdigest()  # the packing code too
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


def make_collator(tok: PreTrainedTokenizerBase, p: PretrainParams, seed: int | None = None) -> MaskingCollator:
    """The masking recipe of `p`; with `seed`, the masks are reproducible (validation)."""
    return MaskingCollator(tok, p.mlm_probability, p.mask_replace_prob, p.random_replace_prob, p.whole_word_mask, seed)


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
        self.started = time.time()  # the run's clock; a resumed run restores the time already spent

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
                "bad_evals": self.bad_evals, "stop_reason": self.stop_reason, "elapsed": time.time() - self.started}

    def restore(self, checkpoint: Path) -> None:
        """Continue from the state saved with `checkpoint`; drop best models it does not know."""
        state = json.loads((checkpoint / self.STATE).read_text())
        self.started = time.time() - state.pop("elapsed", 0.0)
        for key, value in state.items():
            setattr(self, key, value)
        self.prune()

    def prune(self) -> None:
        if self.main_process and self.best_root.is_dir():
            for old in self.best_root.glob("step-*"):
                if self.best is None or old != self.best_dir:
                    shutil.rmtree(old)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step % self.p.eval_steps == 0 or state.global_step >= state.max_steps:
            with full_precision(optimizer):  # the model as trained, fp32 even when it trains in bf16
                stop = self.evaluate_and_decide(model, self.step_offset + state.global_step)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                # every process evaluated the same model on the same batches; the first one's verdict binds all,
                # so a rounding difference can never leave one process training alone
                verdict = [stop, self.stop_reason]
                torch.distributed.broadcast_object_list(verdict, src=0)
                stop, self.stop_reason = verdict
            if stop:  # never False: the Trainer's own flow callback has set True at max_steps
                control.should_training_stop = True
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.main_process:
            write_json(Path(args.output_dir) / f"checkpoint-{state.global_step}" / self.STATE, self.state())
            self.prune()
        return control


class Snapshots(TrainerCallback):
    """Keep the model at the steps of `pretrain.snapshots`, with its compute, for the adaptation curve."""

    def __init__(self, p: PretrainParams, root: Path, tok: PreTrainedTokenizerBase, processes: int,
                 clock: DomainGeneralStopping | None = None, main_process: bool = True):
        self.p, self.root, self.tok, self.processes, self.clock = p, root, tok, processes, clock
        self.main_process = main_process
        self.device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"

    def compute(self, step: int) -> dict:
        """What the model at DAPT `step` cost: tokens trained on and device-hours since the stage started
        (head warm-up and evaluations included; a resumed run counts from its restart)."""
        seconds = time.time() - (self.clock.started if self.clock else time.time())
        return {"step": step, "tokens_seen": step * self.p.batch_size * self.p.max_seq_length * self.processes,
                "seconds": round(seconds, 1), "device_hours": seconds * self.processes / 3600,
                "device": self.device, "processes": self.processes}

    def save(self, model: SparseMLM, pct: int, step: int) -> None:
        if self.main_process:
            with atomic_path(self.root / str(pct)) as tmp:
                model.mlm.save_pretrained(tmp)
                self.tok.save_pretrained(tmp)
                write_json(tmp / "snapshot.json", {"percent": pct, "reached": True, **self.compute(step)})

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        pct = self.p.snapshot_steps().get(state.global_step)
        if pct is not None:
            with full_precision(optimizer):
                self.save(model, pct, state.global_step)
        return control

    def finish(self, final: Path, final_step: int) -> None:
        """Snapshots a run that stopped early never reached get its final model, marked `reached: false`."""
        for step, pct in self.p.snapshot_steps().items():
            if self.main_process and not (self.root / str(pct)).exists():
                with atomic_path(self.root / str(pct)) as tmp:
                    shutil.copytree(final, tmp)
                    write_json(tmp / "snapshot.json", {"percent": pct, "reached": False, **self.compute(final_step)})


def curve_csv(history: list[dict]) -> str:
    """The evaluation history as CSV, for `dvc plots`."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    return buf.getvalue()


def resumable(folder: Path) -> str | None:
    """The newest checkpoint that is complete: its early-stopping state is the last thing written into it."""
    done = [c for c in folder.glob("checkpoint-*") if (c / DomainGeneralStopping.STATE).exists()]
    return str(max(done, key=lambda c: int(c.name.split("-")[1]))) if done else None


def clear_run_state(work: Path) -> None:
    """Forget a run's checkpoints and best models; the token cache (`blocks/`) stays."""
    for part in ("trainer", "best", "warmup", "snapshots"):
        shutil.rmtree(work / part, ignore_errors=True)


def run_fingerprint(p: PretrainParams, files: Sequence[Path], processes: int) -> str:
    """What a checkpoint must match to be resumed: the params, the number of processes (it sets the data each
    one sees), this stage's code and every input file's bytes."""
    h = hashlib.sha1(p.model_dump_json(exclude={"variants", "launcher", "dataloader_workers"}).encode())
    h.update(str(processes).encode())
    files = [*files, Path(__file__), Path(mlm.__file__)]
    for f in sorted(files):
        h.update(str(f).encode())
        h.update(hashlib.sha1(f.read_bytes()).digest())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------


def run(p: PretrainParams, paths: Paths, variant: str = "domain") -> None:
    """Continued MLM pretraining of `variant`, from `models/<variant>_init` to `models/<variant>`."""
    start, work = paths.init_dir(variant), paths.checkpoints / variant
    # first: under torchrun/accelerate, TrainingArguments joins the processes (every one trains, one writes)
    args = training_args(p, work / "trainer", p.learning_rate, p.max_steps, p.warmup_ratio, p.seed + 1, save=True,
                         autocast=not p.bf16_weights)
    if args.n_gpu > 1:  # the Trainer would split each batch over them with nn.DataParallel, which SparseMLM's
        # batch-wide masked positions do not survive; DDP (one process per GPU) is also the faster way
        raise ValueError(f"pretrain: one process sees {args.n_gpu} GPUs; set pretrain.launcher to 'torchrun "
                         f"--nproc_per_node {args.n_gpu}' (one process per GPU), or CUDA_VISIBLE_DEVICES to one GPU")
    state = PartialState()
    main = state.is_main_process

    # resume: only a checkpoint of this very run (same params, model and data) is picked up
    inputs = [f for f in start.rglob("*") if f.is_file()] + [paths.domain_train, paths.domain_valid, paths.general_valid]
    if p.general_replay:
        inputs.append(paths.general_train)
    fingerprint = run_fingerprint(p, inputs, state.num_processes)
    if main and (work / "run.json").exists() and json.loads((work / "run.json").read_text()) != fingerprint:
        clear_run_state(work)
    state.wait_for_everyone()
    resume = resumable(work / "trainer")
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
        if p.torch_compile:  # region by region: faster, and far quicker to compile, than the whole model
            compile_regions(model)
        collator = make_collator(tok, p)
        loggers = [tracking.MLflowLogger(step_offset=p.head_warmup_steps)] if main else []

        # head warm-up: encoder (and tied embeddings) frozen, only the head's own weights learn. A resumed
        # run skips it: its checkpoint holds the warmed-up head
        if p.head_warmup_steps > 0 and resume is None:
            head_params = own_head_parameters(model.mlm)
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
        stopping.started = started
        # the adaptation curve is the domain model's (finetune_curve): other variants keep no snapshots
        curve = p if variant == "domain" else p.model_copy(update={"snapshots": []})
        snapshots = Snapshots(curve, work / "snapshots", tok, state.num_processes, stopping, main)
        if resume:
            stopping.restore(Path(resume))
        else:
            stopping.evaluate_and_decide(model.to(args.device), p.head_warmup_steps)
            if 0 in curve.snapshot_steps():
                snapshots.save(model, curve.snapshot_steps()[0], 0)
        # another seed than the warm-up's: the same one would replay its blocks in the same order with the same masks
        trainer = Trainer(model=model, args=args, train_dataset=train_dataset, data_collator=collator,
                          callbacks=[EpochSetter(train_dataset), stopping, snapshots, *loggers],
                          optimizer_cls_and_kwargs=master_weights(args) if p.bf16_weights else None)
        steps = json.loads((Path(resume) / "trainer_state.json").read_text())["global_step"] if resume else 0
        # a run killed after its last step (or its stop) is done: training on would add a step the
        # uninterrupted run never took
        if stopping.stop_reason == "max_steps" and steps < p.max_steps:
            trainer.train(resume_from_checkpoint=resume)
            steps = trainer.state.global_step
        if not main:
            return

        # save: the best admissible checkpoint becomes the output in one step, so a crash leaves none
        with atomic_path(paths.model_dir(variant)) as tmp:
            shutil.copytree(stopping.best_dir, tmp)
        snapshots.finish(stopping.best_dir, stopping.best["step"] - p.head_warmup_steps)
        with atomic_path(paths.snapshot_dir(variant, 0).parent) as tmp:
            shutil.copytree(work / "snapshots", tmp) if curve.snapshots else tmp.mkdir()
            # the curve's index, and a file in the folder even without snapshots (DVC tracks the folder)
            write_json(tmp / "snapshots.json", {str(pct): json.loads((tmp / str(pct) / "snapshot.json").read_text())
                                                for pct in curve.snapshots})
        first, best, last = stopping.history[0], stopping.best, stopping.history[-1]
        metrics = {
            "stop_reason": stopping.stop_reason,
            "steps": steps,
            "best_step": best["step"] - p.head_warmup_steps,
            "train_blocks": len(train_blocks),
            "tokens_seen": steps * p.batch_size * p.max_seq_length * state.num_processes,
            "seconds": round(time.time() - stopping.started, 1),  # a resumed run's earlier time included
            "device_hours": (time.time() - stopping.started) * state.num_processes / 3600,
            "device": snapshots.device,
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
