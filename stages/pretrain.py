"""pretrain: continued masked-language-model training on domain text (DAPT) or on the task's own text (TAPT).

Recipe (all in params.yaml `pretrain`): documents packed into full blocks of `max_seq_length` (a separator
between documents, no padding); `mlm_probability` of the tokens (or of the words, with `whole_word_mask`)
selected afresh every time a block is seen (dynamic masking), never special tokens; of those 80% [MASK] /
10% a random real token / 10% unchanged; the MLM head computed at the selected positions only (sparse
prediction: the loss is only defined there, and the vocabulary projection dominates a small model's step).
`general_replay` mixes that share of general-text blocks into training. The text is tokenised once, by
`Dataset.map` in parallel, into an Arrow cache that every process memory-maps (`dapt.pretraining.blocks`): memory stays
flat in the corpus size, and each rank reads only the blocks its sampler gives it.

Budgets: `max_steps`, `max_tokens` (tokens through the model, every process counted) and `max_epochs` (passes
over the training blocks); training stops at the first one reached. `eval_tokens` sets the evaluation cadence in
tokens instead of `eval_steps`. The metrics, the report and MLflow say how many tokens and corpus epochs each
model saw. On a GPU the model computes in bf16
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

TAPT (Gururangan et al. 2020, "Don't Stop Pretraining"), `pretrain.tapt`: the same recipe (budget, masking,
early stopping) on the task's unlabelled training text instead of the domain corpus, from the model each entry
names: `tapt` from the general model with its MLM head (`domain_novocab_init`), the paper's TAPT; `dapt_tapt` from
the DAPT model (`domain`), its DAPT + TAPT. Their in-domain validation is the task's dev text (general text as
for DAPT); they keep no adaptation curve (`_snapshots`).

Crash safety: every `save_steps` a checkpoint (model, optimiser, scheduler, RNG states, data position and
the early-stopping state) goes to `checkpoints/<variant>`, which is no DVC output (DVC leaves it alone between runs,
and a clone with `dvc pull` does not miss it), as is the tokenised data (`tokens/`). Rerunning the stage after a
crash resumes from the last checkpoint of a run with the same params and inputs.

Run: `dvc repro pretrain` (every variant) or `python -m stages.pretrain --variant domain` (`--tokenize-only` fills
the token cache and stops: once, before a multi-node launch); TAPT: `dvc repro tapt` or `--variant tapt`
(`dapt_tapt`). Several processes
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
from typing import Literal, get_args

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from pydantic import Field, model_validator
from torch.utils.data import ConcatDataset, Dataset, Subset
from transformers import (
    AutoModelForMaskedLM,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    set_seed,
)

from dapt import registry, tracking
from dapt.common import (
    Paths,
    Section,
    atomic_path,
    file_digest,
    load_params,
    load_paths,
    log,
    setup_stage,
    text_shards,
    write_json,
    write_text,
)
from dapt.pretraining import blocks, mlm
from dapt.pretraining.blocks import TokenBlocks, separator_ids, tokenize_corpus
from dapt.pretraining.mlm import (
    Blocks,
    EpochSetter,
    MaskingCollator,
    SparseMLM,
    compile_regions,
    evaluate,
    fixed_eval_batches,
    full_precision,
    master_weights,
    own_head_parameters,
    training_args,
)

PretrainVariant = Literal["domain", "domain_novocab"]
TaptVariant = Literal["tapt", "dapt_tapt"]


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
    max_steps: int | None = Field(ge=1)
    max_tokens: float | None = Field(None, gt=0)
    max_epochs: float | None = Field(None, gt=0)
    eval_steps: int | None = Field(ge=1)
    eval_tokens: float | None = Field(None, gt=0)
    save_steps: int = Field(ge=1)
    max_eval_blocks: int = Field(ge=1)
    patience: int = Field(ge=1)
    min_delta: float = Field(ge=0)
    max_general_degradation: float = Field(gt=0)
    torch_compile: bool = False
    bf16_weights: bool = False
    dataloader_workers: int = Field(0, ge=0)
    data_processes: int | None = Field(None, ge=1)
    snapshots: list[int] = Field(default_factory=list)
    # TAPT run -> the model under paths.models it starts from: one this stage or adapt_tokenizer makes
    tapt: dict[TaptVariant, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _probabilities(self) -> PretrainParams:
        if self.mask_replace_prob + self.random_replace_prob > 1:
            raise ValueError("pretrain.mask_replace_prob + pretrain.random_replace_prob must not exceed 1")
        if self.max_steps is None and self.max_tokens is None and self.max_epochs is None:
            raise ValueError("pretrain: set a budget: max_steps, max_tokens or max_epochs (the first reached stops)")
        if (self.eval_steps is None) == (self.eval_tokens is None):
            raise ValueError(f"pretrain: set one of eval_steps and eval_tokens, the other null (got eval_steps "
                             f"{self.eval_steps}, eval_tokens {self.eval_tokens})")
        # with a token or epoch budget, the steps are known once the data is (`resolve` checks them then)
        if any(not 0 <= pct < 100 for pct in self.snapshots) or \
                self.max_steps is not None and len(self.snapshot_steps()) != len(self.snapshots):
            raise ValueError(f"pretrain.snapshots: percentages in 0..99 (100% is the final model) that fall on "
                             f"distinct steps of max_steps {self.max_steps}, got {self.snapshots}")
        # what the report calls them: tapt is TAPT alone (from an _init model, which adapt_tokenizer always writes),
        # dapt_tapt is TAPT after DAPT (from a model pretrain.variants trains)
        starts = {"tapt": ["domain_novocab_init", "domain_init"], "dapt_tapt": list(self.variants)}
        for name, start in self.tapt.items():
            if start not in starts[name]:
                what = ("an _init model of adapt_tokenizer: TAPT alone" if name == "tapt"
                        else "a model pretrain.variants trains: TAPT after DAPT")
                raise ValueError(f"pretrain.tapt.{name}: '{start}' is no model it can start from; one of "
                                 f"{', '.join(starts[name])} ({what})")
        return self

    def tokens_per_step(self, processes: int) -> int:
        return self.batch_size * self.max_seq_length * processes

    def resolve(self, train_blocks: int, processes: int) -> tuple[PretrainParams, str]:
        """These params with `max_steps` and `eval_steps` in steps, from whichever budget is reached first on
        `train_blocks` blocks with `processes` processes; and the name of that budget."""
        per_step = self.tokens_per_step(processes)
        budgets = {"max_steps": self.max_steps,
                   "max_tokens": None if self.max_tokens is None else math.ceil(self.max_tokens / per_step),
                   "max_epochs": None if self.max_epochs is None else
                   math.ceil(self.max_epochs * train_blocks / (self.batch_size * processes))}
        bound = min((k for k, v in budgets.items() if v is not None), key=lambda k: budgets[k])
        steps = max(budgets[bound], 1)
        every = self.eval_steps or max(round(self.eval_tokens / per_step), 1)
        resolved = self.model_copy(update={"max_steps": steps, "eval_steps": every})
        if len(resolved.snapshot_steps()) != len(self.snapshots):
            raise ValueError(f"pretrain.snapshots: {self.snapshots} percent of {steps} steps ({bound}) fall on the "
                             f"same step; raise the budget or drop a snapshot")
        return resolved, bound

    def snapshot_steps(self) -> dict[int, int]:
        """DAPT step -> snapshot percent (step 0: after the head warm-up, before any encoder update)."""
        return {round(pct / 100 * self.max_steps): pct for pct in self.snapshots}


# ---------------------------------------------------------------------------------------------------
# data and masking (the recipe itself is in dapt/pretraining/mlm.py)


def with_replay(domain: Dataset, general: Dataset | None, share: float, seed: int) -> Dataset:
    """Domain blocks plus general blocks (drawn with replacement) making up `share` of the result."""
    if not share or general is None:
        return domain
    n = round(share / (1 - share) * len(domain))
    pick = torch.randint(len(general), (n,), generator=torch.Generator().manual_seed(seed))
    return ConcatDataset([domain, Subset(general, pick.tolist())])


def is_tapt(variant: str) -> bool:
    return variant in get_args(TaptVariant)


def start_dir(p: PretrainParams, paths: Paths, variant: str) -> Path:
    """The model `variant` starts from: `models/<variant>_init` (DAPT), or the one `pretrain.tapt` names (TAPT)."""
    if not is_tapt(variant):
        return paths.init_dir(variant)
    if variant not in p.tapt:
        raise ValueError(f"pretrain.tapt: no start for '{variant}' (configured: {', '.join(p.tapt) or 'none'}); "
                         f"add e.g. `{variant}: {'domain' if variant == 'dapt_tapt' else 'domain_novocab_init'}`")
    start = paths.model_dir(p.tapt[variant])
    if not start.is_dir():
        raise FileNotFoundError(f"{start}: not found (pretrain.tapt.{variant} starts from it: run the stage that "
                                f"makes it first, `dvc repro` does)")
    return start


def task_text(task: Path) -> list[Path]:
    """TAPT's training text: the `text` of the task's train set and, for a retrieval task, of its collection (the
    documents searched are unlabelled task text too, and usually most of it)."""
    return [task / "train.jsonl", *([task / "corpus.jsonl"] if (task / "corpus.jsonl").exists() else [])]


def corpora(p: PretrainParams, paths: Paths, variant: str = "domain") -> dict[str, list[Path]]:
    """The texts pretraining reads: training text (the domain corpus, or the task's for TAPT; general too, with
    replay) and the two validation sets. Each is one token stream over its files.

    TAPT's in-domain validation (`domain`, what early stopping and the best model follow) is the task's dev text,
    unlabelled: text of the distribution TAPT adapts to that it does not train on. The domain validation set
    would reward no TAPT step for `dapt_tapt`, whose start was already chosen for the lowest loss there."""
    tapt = is_tapt(variant)
    train = task_text(paths.task) if tapt else [paths.domain_train]
    texts = {"train": train, "domain": [paths.task / "dev.jsonl" if tapt else paths.domain_valid],
             "general": [paths.general_valid]}
    return {**texts, "general_train": [paths.general_train]} if p.general_replay else texts


def shared_blocks(tok: PreTrainedTokenizerBase, corpora: dict[str, Path | list[Path]], p: PretrainParams,
                  cache: Path) -> dict[str, TokenBlocks]:
    """`TokenBlocks` of each corpus: the main process tokenises (with every core) while the others wait, then
    they map the folders it names, without reading the corpus themselves."""
    state = PartialState()
    folders = [None] * len(corpora)
    if state.is_main_process:
        folders = [tokenize_corpus(tok, path, cache, p.data_processes) for path in corpora.values()]
    folders = broadcast_object_list(folders)  # waits for the main process
    return {name: TokenBlocks(folder, p.max_seq_length, separator_ids(tok)[0])
            for name, folder in zip(corpora, folders, strict=True)}


def epochs(p: PretrainParams, steps: int, train_blocks: int, processes: int) -> float:
    """Passes over the training blocks that `steps` steps make."""
    return steps * p.batch_size * processes / train_blocks


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
                 clock: DomainGeneralStopping | None = None, main_process: bool = True, train_blocks: int = 0):
        self.p, self.root, self.tok, self.processes, self.clock = p, root, tok, processes, clock
        self.main_process, self.train_blocks = main_process, train_blocks
        self.device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        self.device_hours: dict[str, float] = {}  # percent -> device-hours when that snapshot was saved

    def compute(self, step: int) -> dict:
        """What the model at DAPT `step` cost in data: tokens trained on, corpus epochs. Deterministic: the snapshot
        folders are fine-tuning's inputs, and a wall-clock value there would rerun every curve point whenever
        pretraining reruns. The time goes to `device_hours` (metrics/pretrain_<variant>.json) instead."""
        return {"step": step, "tokens_seen": step * self.p.tokens_per_step(self.processes),
                "corpus_epochs": epochs(self.p, step, self.train_blocks, self.processes) if self.train_blocks else None,
                "device": self.device, "processes": self.processes}

    def record_time(self, pct: int) -> None:
        """Device-hours since the stage started (head warm-up and evaluations included; a resumed run counts
        from its restart), for the snapshot at `pct`."""
        seconds = time.time() - (self.clock.started if self.clock else time.time())
        self.device_hours[str(pct)] = seconds * self.processes / 3600

    def save(self, model: SparseMLM, pct: int, step: int) -> None:
        if self.main_process:
            with atomic_path(self.root / str(pct)) as tmp:
                model.mlm.save_pretrained(tmp)
                self.tok.save_pretrained(tmp)
                write_json(tmp / "snapshot.json", {"percent": pct, "reached": True, **self.compute(step)})
        self.record_time(pct)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        pct = self.p.snapshot_steps().get(state.global_step)
        if pct is not None:
            with full_precision(optimizer):
                self.save(model, pct, state.global_step)
        return control

    def finish(self, final: Path, final_step: int) -> None:
        """Snapshots a run that stopped early never reached get its final model, marked `reached: false`."""
        for pct in self.p.snapshot_steps().values():
            if self.main_process and not (self.root / str(pct)).exists():
                with atomic_path(self.root / str(pct)) as tmp:
                    shutil.copytree(final, tmp)
                    write_json(tmp / "snapshot.json", {"percent": pct, "reached": False, **self.compute(final_step)})
                self.record_time(pct)


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
    """Forget a run's checkpoints and best models; the token cache (`tokens/`) stays."""
    for part in ("trainer", "best", "warmup", "snapshots"):
        shutil.rmtree(work / part, ignore_errors=True)


def run_fingerprint(p: PretrainParams, files: Sequence[Path], processes: int) -> str:
    """What a checkpoint must match to be resumed: the params, the number of processes (it sets the data each
    one sees), this stage's code and every input file's bytes."""
    # not which runs exist (`variants`, `tapt`: adding one must not restart another; a TAPT run's start is among
    # its files) nor how it is run
    h = hashlib.sha1(p.model_dump_json(exclude={"variants", "tapt", "launcher", "dataloader_workers",
                                                 "data_processes"}).encode())
    h.update(str(processes).encode())
    files = [*files, Path(__file__), Path(mlm.__file__), Path(blocks.__file__)]
    for f in sorted(files):
        h.update(str(f).encode())
        h.update(file_digest(f))  # in chunks, and once: the token cache's key reuses it
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------


def run(p: PretrainParams, paths: Paths, variant: str = "domain") -> None:
    """Continued MLM pretraining of `variant`, from `start_dir` to `models/<variant>`."""
    tracking.check_server()  # before the work below (fingerprint, checkpoint clean-up), not only at stage_run
    start, work, texts = start_dir(p, paths, variant), paths.checkpoints / variant, corpora(p, paths, variant)
    # first: under torchrun/accelerate, TrainingArguments joins the processes (every one trains, one writes);
    # the steps are known once the data is (the budget may be in tokens or epochs), when the Trainer's are made
    args = training_args(p, work / "trainer", p.learning_rate, 1, p.warmup_ratio, p.seed + 1, save=True,
                         autocast=not p.bf16_weights)
    if args.n_gpu > 1:  # the Trainer would split each batch over them with nn.DataParallel, which SparseMLM's
        # batch-wide masked positions do not survive; DDP (one process per GPU) is also the faster way
        raise ValueError(f"pretrain: one process sees {args.n_gpu} GPUs; set pretrain.launcher to 'torchrun "
                         f"--nproc_per_node {args.n_gpu}' (one process per GPU), or CUDA_VISIBLE_DEVICES to one GPU")
    state = PartialState()
    main = state.is_main_process

    # resume: only a checkpoint of this very run (same params, model and data) is picked up
    if main:  # the one process that writes; the others would read the whole corpus for nothing
        inputs = [f for f in start.rglob("*") if f.is_file()] + [f for c in texts.values() for s in c
                                                                 for f in text_shards(s)]
        fingerprint = run_fingerprint(p, inputs, state.num_processes)
        if (work / "run.json").exists() and json.loads((work / "run.json").read_text()) != fingerprint:
            clear_run_state(work)
        write_json(work / "run.json", fingerprint)
    state.wait_for_everyone()
    resume = resumable(work / "trainer")
    if resume:
        log.info("pretrain: resuming %s from %s", variant, resume)

    run_context = tracking.stage_run("pretrain", p, run_name=f"pretrain-{variant}", tags={"variant": variant}) \
        if main else contextlib.nullcontext()
    with run_context as mlflow_run:
        # seed
        set_seed(p.seed)
        started = time.time()

        # data: tokenised once per tokenizer into a memory-mapped cache (dapt.pretraining.blocks), by the first process
        tok = AutoTokenizer.from_pretrained(start)
        data = shared_blocks(tok, texts, p, work / "tokens")
        train_blocks = with_replay(data["train"], data.get("general_train"), p.general_replay, p.seed)
        eval_collator = make_collator(tok, p, seed=p.seed)
        eval_sets = {name: fixed_eval_batches(data[name].head(p.max_eval_blocks), eval_collator, p.batch_size)
                     for name in ("domain", "general")}
        warmup_dataset, train_dataset = Blocks(train_blocks, p.seed), Blocks(train_blocks, p.seed + 1)
        # the adaptation curve is the domain model's (finetune_curve): other variants keep no snapshots
        if variant != "domain":
            p = p.model_copy(update={"snapshots": []})
        p, bound = p.resolve(len(train_blocks), state.num_processes)
        args = training_args(p, work / "trainer", p.learning_rate, p.max_steps, p.warmup_ratio, p.seed + 1, save=True,
                             autocast=not p.bf16_weights)
        log.info("pretrain: %d training blocks of %d tokens (%d general, %s %s tokens); %d steps (%s), "
                 "%.3g tokens, %.3g corpus epochs", len(train_blocks), p.max_seq_length,
                 len(train_blocks) - len(data["train"]), f"{data['train'].tokens:,}",
                 "task" if is_tapt(variant) else "domain", p.max_steps, bound,
                 p.max_steps * p.tokens_per_step(state.num_processes), epochs(p, p.max_steps, len(train_blocks),
                                                                              state.num_processes))

        # model: PyTorch's fused attention (SDPA) where the architecture has it
        model = SparseMLM(AutoModelForMaskedLM.from_pretrained(start, attn_implementation="sdpa"))
        if p.torch_compile:  # region by region: faster, and far quicker to compile, than the whole model
            compile_regions(model)
        collator = make_collator(tok, p)
        loggers = [tracking.MLflowLogger(step_offset=p.head_warmup_steps)] if main else []

        # head warm-up: encoder (and tied embeddings) frozen, only the head's own weights learn. A resumed
        # run skips it: its checkpoint holds the warmed-up head. A start whose head is trained already (dapt_tapt's
        # models/domain) gets it too: a few steps of the head alone, cheap, before the baseline evaluation
        if p.head_warmup_steps > 0 and resume is None:
            head_params = own_head_parameters(model.mlm)
            for w in model.parameters():
                w.requires_grad_(id(w) in head_params)
            Trainer(model=model, args=training_args(p, work / "warmup", p.head_warmup_learning_rate,
                                                    p.head_warmup_steps, 0.0, p.seed, save=False),
                    train_dataset=warmup_dataset, data_collator=collator,
                    callbacks=[EpochSetter(warmup_dataset),
                               *([tracking.MLflowLogger("head_")] if main else [])]).train()
            for w in model.parameters():
                w.requires_grad_(True)

        # train: evaluate first, so the unadapted model is the baseline and the first admissible checkpoint
        stopping = DomainGeneralStopping(p, eval_sets, work / "best", tok, p.head_warmup_steps, main)
        stopping.started = started
        snapshots = Snapshots(p, work / "snapshots", tok, state.num_processes, stopping, main, len(train_blocks))
        if resume:
            stopping.restore(Path(resume))
        else:
            stopping.evaluate_and_decide(model.to(args.device), p.head_warmup_steps)
            if 0 in p.snapshot_steps():
                snapshots.save(model, p.snapshot_steps()[0], 0)
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
        if not is_tapt(variant):  # dvc.yaml's pretrain stage declares the folder of each DAPT variant; tapt's, none
            with atomic_path(paths.snapshot_dir(variant, 0).parent) as tmp:
                shutil.copytree(work / "snapshots", tmp) if p.snapshots else tmp.mkdir()
                # the curve's index, and a file in the folder even without snapshots (DVC tracks the folder)
                write_json(tmp / "snapshots.json", {str(pct): json.loads((tmp / str(pct) / "snapshot.json")
                                                                         .read_text()) for pct in p.snapshots})
        first, best, last = stopping.history[0], stopping.best, stopping.history[-1]
        metrics = {
            "stop_reason": stopping.stop_reason,
            "steps": steps,
            "best_step": best["step"] - p.head_warmup_steps,
            "train_blocks": len(train_blocks),
            "budget": bound,
            "tokens_seen": steps * p.tokens_per_step(state.num_processes),
            "corpus_epochs": epochs(p, steps, len(train_blocks), state.num_processes),
            **{f"{k}_start": v for k, v in first.items() if k != "step"},
            **{f"{k}_best": v for k, v in best.items() if k != "step"},
            **{f"{k}_end": v for k, v in last.items() if k != "step"},
        }
        seconds = time.time() - stopping.started  # a resumed run's earlier time included
        # what differs between two runs with the same result (time, where, the MLflow run) goes beside the metrics
        # compare depends on: a rerun that reproduces the model reruns nothing downstream
        run_info = {"seconds": round(seconds, 1), "device_hours": seconds * state.num_processes / 3600,
                    "device": snapshots.device,
                    "snapshot_device_hours": snapshots.device_hours,  # the adaptation curve's compute axis
                    **tracking.run_record(mlflow_run)}  # compare finds the model's registered version by it
        write_json(paths.metrics / f"pretrain_{variant}.json", metrics)
        write_json(paths.metrics / f"pretrain_{variant}_run.json", run_info)
        write_text(paths.metrics / f"pretrain_{variant}_curve.csv", curve_csv(stopping.history))
        tracking.log_metrics({k: v for k, v in {**metrics, **run_info}.items() if isinstance(v, (int, float))})
        tracking.set_tags({"stop_reason": stopping.stop_reason, "budget": bound})
        tracking.log_artifact(paths.metrics / f"pretrain_{variant}_curve.csv")
        # DVC tracks the task folder, not its files: the folder's md5 (from dvc.lock) is what tags a TAPT model
        tracked = [start, *([paths.task] if is_tapt(variant) else []), *(s for c in texts.values() for s in c)]
        registry.log_stage_model(paths.model_dir(variant), variant, inputs=tracked,
                                 card_dir=paths.base_model)  # the base model's card: its license still applies
        clear_run_state(work)  # finished: nothing left to resume (the tokenised blocks stay cached)
        log.info("pretrain: %s", metrics)


def tokenize_only(p: PretrainParams, paths: Paths, variant: str) -> None:
    """Fill the token cache of `variant` and stop: one process, before a multi-node launch, so no rank waits on
    tokenisation longer than the collective timeout."""
    tok = AutoTokenizer.from_pretrained(start_dir(p, paths, variant))
    for path in corpora(p, paths, variant).values():
        log.info("pretrain: %s tokens in %s", path, tokenize_corpus(tok, path, paths.checkpoints / variant / "tokens",
                                                                    p.data_processes))


def main() -> None:
    setup_stage()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="domain", choices=[*get_args(PretrainVariant), *get_args(TaptVariant)],
                        help="a DAPT variant (pretrain.variants) or a TAPT run (pretrain.tapt)")
    parser.add_argument("--tokenize-only", action="store_true", help="fill the token cache, do not train")
    args = parser.parse_args()
    (tokenize_only if args.tokenize_only else run)(load_params("pretrain", PretrainParams), load_paths(), args.variant)


if __name__ == "__main__":
    main()
