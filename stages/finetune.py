"""finetune: fine-tune one variant (general, domain, domain_novocab, tapt, dapt_tapt) with one seed on the task.

Every variant gets identical settings; only the starting model differs. Model selection on the dev set
(macro-F1 or nDCG@10, evaluated each epoch), the test set scored once at the end. Writes metrics and
predictions to `paths.finetune/<variant>-<seed>/`. DVC runs one process per (variant, seed): `finetune@general-0`.

The task is read from the data: sequence classification (a label per text) or token classification (a tag per
word, e.g. NER: entity-level F1 by seqeval), with the Trainer (`dapt/finetuning/tasks.py` holds what differs between
the two); or retrieval (queries searched in a corpus): a bi-encoder trained with in-batch negatives by
sentence-transformers, selected on dev nDCG@10, scored on test with ir-measures, beside the untuned model's
zero-shot scores (`dapt/finetuning/retrieval.py`).

Pooler: a checkpoint saved from an MLM model has no pooler, so a classifier built from it would start with
a random pooler while the base model has a trained one. Every variant therefore gets the base model's
pooler, so the comparison measures the encoder, not the pooler's initialisation.

Adaptation curve: `--at P` fine-tunes the snapshot pretrain kept at P% of its steps
(`models/<variant>_snapshots/P`, `pretrain.snapshots`) instead of the final model, into
`paths.finetune/<variant>-atP-<seed>/`, with the compute that snapshot cost in its metrics.

Run: `dvc repro finetune` (all runs) or `python -m stages.finetune --variant domain --seed 0 [--at 50]`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch
from datasets import Dataset, load_dataset
from pydantic import Field
from sklearn.utils.class_weight import compute_class_weight
from transformers import AutoModel, EarlyStoppingCallback, Trainer, TrainingArguments, set_seed

from dapt import tracking
from dapt.common import (
    Paths,
    Section,
    atomic_path,
    load_params,
    load_paths,
    log,
    read_jsonl,
    setup_stage,
    write_json,
    write_jsonl,
)
from dapt.finetuning import retrieval
from dapt.finetuning.tasks import IGNORE, TASKS, gold_labels, label_names, load_tokenizer, task_type

Variant = Literal["general", "domain", "domain_novocab", "tapt", "dapt_tapt"]
SPLITS = ("train", "dev", "test")


class TrainingParams(Section):
    learning_rate: float = Field(gt=0, lt=1)
    epochs: int = Field(ge=1)
    patience: int | None = Field(None, ge=1)  # epochs without a better dev score before stopping; None: all run
    batch_size: int = Field(ge=1)
    max_seq_length: int = Field(ge=8, le=8192)
    warmup_ratio: float = Field(ge=0, lt=1)
    weight_decay: float = Field(ge=0)
    class_weighted: bool = True


class FinetuneParams(Section):
    variants: list[Variant] = Field(min_length=1)
    seeds: list[int] = Field(min_length=1)
    training: TrainingParams


# ---------------------------------------------------------------------------------------------------
# pure helpers


def read_task(folder: Path) -> dict[str, Dataset]:
    """The task's train/dev/test.jsonl as 🤗 datasets, held in memory (a task is small); the Arrow files the
    JSON loader builds go to a temporary folder, not the shared ~/.cache, and are gone when this returns."""
    with tempfile.TemporaryDirectory(prefix="finetune-data-") as cache:
        return {s: load_dataset("json", data_files=str(folder / f"{s}.jsonl"), split="train", cache_dir=cache,
                                keep_in_memory=True) for s in SPLITS}


def class_weights(labels: list[int], n_classes: int) -> torch.Tensor:
    """scikit-learn's "balanced" weights, n / (k * count); every class must occur in `labels`."""
    weights = compute_class_weight("balanced", classes=np.arange(n_classes), y=np.asarray(labels))
    return torch.tensor(weights, dtype=torch.float)


class WeightedLoss:
    """Class-weighted cross-entropy for the Trainer's `compute_loss_func` (None: unweighted).

    Logits of a text (batch, classes) or of its tokens (batch, length, classes) alike; IGNORE targets
    (sub-tokens after a word's first, special tokens, padding) count for nothing.
    """

    def __init__(self, weights: torch.Tensor | None):
        self.weights = weights

    def __call__(self, outputs, targets, num_items_in_batch=None) -> torch.Tensor:
        w = self.weights.to(outputs.logits.device) if self.weights is not None else None
        logits = outputs.logits.float()
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), weight=w,
                                                 ignore_index=IGNORE)


def share_pooler(model: torch.nn.Module, missing_keys: list[str], reference: Path) -> bool:
    """Give `model` the reference model's trained pooler when its checkpoint had none; True if copied."""
    pooler = getattr(model.base_model, "pooler", None)
    if pooler is None or not any(".pooler." in k or k.startswith("pooler.") for k in missing_keys):
        return False
    ref = AutoModel.from_pretrained(reference)
    if getattr(ref, "pooler", None) is None:
        return False
    pooler.load_state_dict(ref.pooler.state_dict())
    return True


@torch.no_grad()
def init_classifier(model: torch.nn.Module, seed: int) -> None:
    """Re-draw the classification head (`model.classifier`, for texts and tokens alike) from `seed` alone.

    Loading draws random numbers for every missing weight (the domain checkpoint also misses a pooler), so
    without this the same seed would give the two variants different heads and unpaired runs.
    """
    generator = torch.Generator().manual_seed(seed)
    std = model.config.initializer_range
    for module in model.classifier.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
            if module.bias is not None:
                module.bias.zero_()


# ---------------------------------------------------------------------------------------------------


def run_name(variant: str, seed: int, at: int | None = None) -> str:
    """`<variant>-<seed>`, or `<variant>-at<P>-<seed>` for the snapshot at P% of pretraining: the output folder
    under `paths.finetune` and (prefixed `finetune-` or `finetune_curve-`) the MLflow run."""
    return f"{variant}-{seed}" if at is None else f"{variant}-at{at}-{seed}"


def run(p: FinetuneParams, paths: Paths, variant: str, seed: int, at: int | None = None) -> None:
    """Fine-tune `variant` (its snapshot at `at`% of pretraining, if given) with `seed`; write test metrics
    and predictions."""
    t = p.training
    name = run_name(variant, seed, at)
    out_dir = paths.finetune / name
    model_dir = paths.model_dir(variant) if at is None else paths.snapshot_dir(variant, at)
    tags = {"variant": variant, "seed": str(seed), **({"dapt_percent": str(at)} if at is not None else {})}
    stage = "finetune" if at is None else "finetune_curve"  # the dvc.yaml stage (and Prefect task) that runs it
    with tracking.stage_run(stage, p.training, run_name=f"{stage}-{name}", tags=tags) as mlflow_run:
        tracking.log_params({"variant": variant, "seed": seed, **({"dapt_percent": at} if at is not None else {})})
        started = time.time()
        # seed
        set_seed(seed)

        # task: classification of texts or words (the Trainer), or retrieval (a sentence-transformers bi-encoder)
        train = read_jsonl(paths.task / "train.jsonl")
        kind = task_type(train)
        with tempfile.TemporaryDirectory(prefix="finetune-") as scratch:
            if kind == "retrieval":
                splits = {"train": train, **{s: read_jsonl(paths.task / f"{s}.jsonl") for s in ("dev", "test")}}
                metrics, rows = retrieval.fit_and_score(model_dir, splits, read_jsonl(paths.task / "corpus.jsonl"), t,
                                                        seed, Path(scratch), callbacks=[tracking.MLflowLogger()])
            else:
                metrics, rows = classify(t, paths, model_dir, variant, seed, kind, Path(scratch))
        # the snapshot's pretraining compute (step, tokens seen, corpus epochs): the adaptation curve's x-axis
        snapshot = json.loads((model_dir / "snapshot.json").read_text()) if at is not None else {}

        # save
        with atomic_path(out_dir) as tmp:
            tmp.mkdir()
            write_json(tmp / "metrics.json", {
                "variant": variant, "seed": seed, "task": kind, **metrics, "max_seq_length": t.max_seq_length,
                **({"dapt_percent": at, "snapshot": snapshot} if at is not None else {})})
            write_jsonl(tmp / "predictions.jsonl", rows)
        # what differs between two runs with the same result (time, MLflow run) stays out of the folder compare
        # depends on: a rerun that reproduces the scores reruns nothing downstream
        seconds = round(time.time() - started, 1)
        write_json(run_info_path(paths, name), {"seconds": seconds, **tracking.run_record(mlflow_run)})
        tracking.log_metrics({k: v for k, v in {**metrics, "seconds": seconds}.items() if k != "labels"})
        log.info("finetune %s seed %d: %s", variant, seed, {k: v for k, v in metrics.items() if k != "labels"})


def classify(t: TrainingParams, paths: Paths, model_dir: Path, variant: str, seed: int, kind: str,
             scratch: Path) -> tuple[dict, list[dict]]:
    """Fine-tune a text or token classifier from `model_dir` with the Trainer: the dev-selected model's test and
    dev scores, the classes (`labels`), epochs run and truncated shares, and the test predictions' rows."""
    # data: the task's splits as 🤗 datasets
    task = read_task(paths.task)
    spec = TASKS[kind]
    labels = label_names(task["train"])
    label2id = {label: i for i, label in enumerate(labels)}

    # tokenizer
    tok = load_tokenizer(model_dir, kind)
    encode = partial(spec.encode, tok, label2id=label2id, max_len=t.max_seq_length)
    data = {s: task[s].map(encode, batched=True, remove_columns=task[s].column_names) for s in task}
    # the share of each split the model sees only the start of: the report states it beside the scores
    cut = {s: round(float(np.mean(data[s]["truncated"])), 4) for s in data}
    log.info("finetune: truncated at %d tokens: %s", t.max_seq_length, cut)

    # model (a token classifier has no pooler: share_pooler then leaves it alone)
    model, info = spec.model.from_pretrained(
        model_dir, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=label2id,
        output_loading_info=True)
    if share_pooler(model, info["missing_keys"], paths.base_model):
        log.info("finetune: %s checkpoint has no pooler; using the base model's", variant)
    init_classifier(model, seed)

    # loss: class-weighted cross-entropy, or rare categories (tags) are never predicted
    train_ids = [label2id[label] for label in gold_labels(task["train"])]
    weights = class_weights(train_ids, len(labels)) if t.class_weighted else None

    # trainer
    cuda = torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(scratch), num_train_epochs=t.epochs, per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=2 * t.batch_size, learning_rate=t.learning_rate,
        weight_decay=t.weight_decay, warmup_steps=int(t.warmup_ratio * t.epochs * len(data["train"]) / t.batch_size),
        eval_strategy="epoch", save_strategy="epoch", save_total_limit=1, load_best_model_at_end=True,
        save_only_model=True,  # the best epoch's weights; no run resumes, so no optimiser state
        metric_for_best_model="macro_f1", logging_steps=10, report_to="none", seed=seed,
        # similar lengths in a batch: far less padding on CPU, same examples per epoch
        train_sampling_strategy="group_by_length",
        bf16=cuda and torch.cuda.is_bf16_supported(), optim="adamw_torch_fused" if cuda else "adamw_torch",
        dataloader_pin_memory=cuda,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data["train"], eval_dataset=data["dev"],
                      data_collator=spec.collator(tok), compute_metrics=partial(spec.dev_metrics, labels=labels),
                      compute_loss_func=WeightedLoss(weights), callbacks=[tracking.MLflowLogger()])
    if t.patience is not None:  # the best epoch is kept either way (load_best_model_at_end)
        trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=t.patience))

    # train
    trainer.train()

    # evaluate: the dev-selected model, scored once on test
    dev = trainer.evaluate()
    # in dataset order: transformers 5 length-groups evaluation batches too, which would pair each prediction in
    # predictions.jsonl with another text
    trainer.args.train_sampling_strategy = "random"
    pred = trainer.predict(data["test"])
    test, rows = spec.results(task["test"], pred.label_ids, pred.predictions, labels)
    metrics = {"labels": labels, **{f"test_{k}": v for k, v in test.items()}}
    metrics.update({f"dev_{k}": dev[f"eval_{k}"] for k in test})
    metrics["epochs_run"] = round(trainer.state.epoch or 0.0, 2)
    metrics["truncated"] = cut
    return metrics, rows


def run_info_path(paths: Paths, name: str) -> Path:
    """The run's time and MLflow run (`mlflow_run_id`, `mlflow_tracking_uri`): metrics/finetune/<name>.json."""
    return paths.metrics / "finetune" / f"{name}.json"


def main() -> None:
    setup_stage()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", required=True, choices=list(get_args(Variant)))
    parser.add_argument("--seed", required=True, type=int)
    parser.add_argument("--at", type=int, help="the pretraining snapshot at this percent of the steps")
    args = parser.parse_args()
    run(load_params("finetune", FinetuneParams), load_paths(), args.variant, args.seed, args.at)


if __name__ == "__main__":
    main()
