"""tasks: what differs between the downstream task types `finetune` supports, in small module-level functions.

sequence_classification  records `{"id", "text", "label"}`: one label per text (the demo task).
token_classification     records `{"id", "tokens", "tags", "text"}`: one tag per word, e.g. NER with BIO tags;
                         scored per entity with seqeval.
retrieval                queries `{"id", "text", "qrels": {doc_id: score}}` searched in `corpus.jsonl`; a
                         bi-encoder trained with sentence-transformers (`dapt/finetuning/retrieval.py`, not the Trainer
                         pieces below).

The type is read from the data (`task_type`), and `TASKS` maps each classification type to its model class,
collator, encoder, metrics and test results, so `finetune.run` reads the same for both.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from seqeval.metrics import accuracy_score as word_accuracy
from seqeval.metrics import f1_score as entity_f1
from sklearn.metrics import accuracy_score, f1_score
from tokenizers import pre_tokenizers
from transformers import (
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
    PreTrainedTokenizerBase,
)

from dapt.common import log

TaskType = Literal["sequence_classification", "token_classification", "retrieval"]
IGNORE = -100  # the label of positions the loss and the scores skip (PyTorch's and transformers' convention)


def task_type(examples: Iterable[dict]) -> TaskType:
    """retrieval when the records are queries with `qrels`, token_classification when they carry word-level
    `tags`, else sequence_classification."""
    kinds = {"retrieval" if "qrels" in ex else "token_classification" if "tags" in ex else "sequence_classification"
             for ex in examples}
    if len(kinds) > 1:
        raise ValueError(f"task: records of several task types ({', '.join(sorted(kinds))}); expected one")
    return kinds.pop() if kinds else "sequence_classification"


def gold_labels(examples: Iterable[dict]) -> list[str]:
    """Every gold label, in order: one per text, or one per word of tagged sentences."""
    return [label for ex in examples for label in (ex["tags"] if "tags" in ex else [ex["label"]])]


def label_names(examples: Iterable[dict]) -> list[str]:
    """The classes, sorted: the model's label ids index this list."""
    return sorted(set(gold_labels(examples)))


def load_tokenizer(model_dir: Path, task: TaskType) -> PreTrainedTokenizerBase:
    """The model's tokenizer, set up for pre-split words when the task tags words."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    if task == "token_classification" and prefix_space_for_words(tok):
        log.info("finetune: byte-level tokenizer; a space is put before every word")
    return tok


# ---------------------------------------------------------------------------------------------------
# sequence classification


def encode_texts(tok, batch: dict[str, list], label2id: dict[str, int], max_len: int) -> dict[str, list]:
    """A batch of examples (columns, as `Dataset.map(batched=True)` hands them) tokenised for the Trainer;
    padding is left to the collator (dynamic, per batch)."""
    enc = tok(batch["text"], truncation=True, max_length=max_len)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "labels": [label2id[label] for label in batch["label"]], "truncated": truncated(enc, max_len)}


def truncated(enc, max_len: int) -> list[bool]:
    """Which examples of a batch the tokenizer cut at `max_len` tokens (the Trainer drops this column: the
    model has no such input). A fast tokenizer keeps the cut-off part; for a slow one, a full-length example
    counts as cut."""
    if enc.encodings is None:
        return [len(ids) >= max_len for ids in enc["input_ids"]]
    return [bool(e.overflowing) for e in enc.encodings]


def scores(y_true: list[int], y_pred: list[int]) -> dict[str, float]:
    """The task metrics every variant is judged by."""
    return {"accuracy": float(accuracy_score(y_true, y_pred)),
            "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0))}


def dev_metrics(pred, labels: list[str] | None = None) -> dict[str, float]:
    """The Trainer's `compute_metrics`: dev scores from logits (`labels` unused: the same call as for tags)."""
    return scores(pred.label_ids.tolist(), np.argmax(pred.predictions, -1).tolist())


def sequence_results(examples: Iterable[dict], label_ids: np.ndarray, logits: np.ndarray,
                     labels: list[str]) -> tuple[dict[str, float], list[dict]]:
    """Test scores and predictions.jsonl rows `{"id", "label", "pred"}`, in test order."""
    label2id = {label: i for i, label in enumerate(labels)}
    y_pred = np.argmax(logits, -1).tolist()
    y_true = label_ids.tolist()
    if y_true != [label2id[ex["label"]] for ex in examples]:
        raise RuntimeError("finetune: test predictions came back in another order than the test set")
    rows = [{"id": ex.get("id", i), "label": ex["label"], "pred": labels[y]}
            for i, (ex, y) in enumerate(zip(examples, y_pred, strict=True))]
    return scores(y_true, y_pred), rows


# ---------------------------------------------------------------------------------------------------
# token classification: the standard `run_ner.py` recipe, a word's tag on its first sub-token


def prefix_space_for_words(tok: PreTrainedTokenizerBase) -> bool:
    """Make a byte-level BPE tokenizer (RoBERTa, ModernBERT) put a space before every pre-split word; True if
    it is byte-level.

    Without the space a word is encoded as if it started the text ("word", not "Ġword"), unlike anything seen
    in pretraining. Not `from_pretrained(add_prefix_space=True)`: transformers 5 honours that only in classes
    that rebuild their pre-tokenizer (RobertaTokenizer); a tokenizer loaded from a plain tokenizer.json
    (TokenizersBackend, as ModernBERT's and our own adapted ones are) ignores it silently.
    """
    pre = tok.backend_tokenizer.pre_tokenizer
    parts = []
    if isinstance(pre, pre_tokenizers.Sequence):
        for i in range(64):  # a Sequence can be indexed but has no len()
            try:
                parts.append(pre[i])
            except IndexError:
                break
    elif pre is not None:
        parts.append(pre)
    byte_level = [part for part in parts if isinstance(part, pre_tokenizers.ByteLevel)]
    for part in byte_level:  # the backend's own objects: changed in place
        part.add_prefix_space = True
    return bool(byte_level)


def fill_empty_words(tok: PreTrainedTokenizerBase, sentences: list[list[str]]) -> list[list[str]]:
    """`sentences` with each word the tokenizer turns into nothing replaced by its unknown token.

    BERT's normaliser deletes control and zero-width characters, so a word of only those has no sub-token to
    carry its tag, and every later word's prediction would be read one position early.
    """
    vocab = sorted({w for s in sentences for w in s})
    empty = {w for w, ids in zip(vocab, tok(vocab, add_special_tokens=False)["input_ids"], strict=True) if not ids}
    if not empty:
        return sentences
    if tok.unk_token is None:
        raise ValueError(f"task: words {sorted(empty)[:5]} have no tokens and the tokenizer has no unknown token")
    log.warning("finetune: %d distinct word(s) have no tokens, e.g. %r; encoded as %s",
                len(empty), min(empty), tok.unk_token)
    return [[tok.unk_token if w in empty else w for w in s] for s in sentences]


def align_labels(word_ids: list[int | None], word_labels: list[int]) -> list[int]:
    """A label per token: the word's label on its first sub-token, IGNORE on the others and on special tokens."""
    out, previous = [], None
    for w in word_ids:
        out.append(IGNORE if w is None or w == previous else word_labels[w])
        previous = w
    return out


def encode_words(tok, batch: dict[str, list], label2id: dict[str, int], max_len: int) -> dict[str, list]:
    """A batch of tagged sentences (columns, as `Dataset.map(batched=True)` hands them) tokenised for the
    Trainer: pre-split words, truncated to `max_len` tokens."""
    words = fill_empty_words(tok, batch["tokens"])
    enc = tok(words, is_split_into_words=True, truncation=True, max_length=max_len)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "labels": [align_labels(enc.word_ids(i), [label2id[t] for t in tags])
                       for i, tags in enumerate(batch["tags"])],
            "truncated": truncated(enc, max_len)}


def word_predictions(label_ids: np.ndarray, pred_ids: np.ndarray, n_words: list[int],
                     labels: list[str]) -> list[list[str]]:
    """Each word's predicted tag: the prediction at its first sub-token (the positions labelled in `label_ids`).

    Words cut off by truncation get "O" (outside any entity): the model never saw them, so their entities
    count as missed rather than vanishing from the test set.
    """
    out = []
    for row, pred, n in zip(label_ids, pred_ids, n_words, strict=True):
        seen = [labels[i] for i in pred[row != IGNORE]]
        out.append(seen + ["O"] * (n - len(seen)))
    return out


def tag_scores(y_true: list[list[str]], y_pred: list[list[str]]) -> dict[str, float]:
    """Entity-level macro and micro F1 (seqeval, IOB2 read leniently as conlleval does) and word accuracy."""
    def f1(average: str) -> float:
        # NaN when neither side has an entity: 0 keeps model selection and metrics.json well defined
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # numpy's "mean of empty slice" on that NaN
            return float(np.nan_to_num(entity_f1(y_true, y_pred, average=average, zero_division=0)))

    return {"accuracy": float(word_accuracy(y_true, y_pred)), "macro_f1": f1("macro"), "micro_f1": f1("micro")}


def tag_dev_metrics(pred, labels: list[str]) -> dict[str, float]:
    """The Trainer's `compute_metrics` for tags: over the words the window kept (the labelled positions).

    Unlike the test scores, truncated words are left out: the Trainer may hand sentences back length-grouped,
    so their word counts are unknown here. Per-sentence scores do not mind the order.
    """
    pred_ids = np.argmax(pred.predictions, -1)
    gold = [[labels[i] for i in row[row != IGNORE]] for row in pred.label_ids]
    predicted = [[labels[i] for i in p[row != IGNORE]] for row, p in zip(pred.label_ids, pred_ids, strict=True)]
    return tag_scores(gold, predicted)


def token_results(examples: Iterable[dict], label_ids: np.ndarray, logits: np.ndarray,
                  labels: list[str]) -> tuple[dict[str, float], list[dict]]:
    """Test scores and predictions.jsonl rows `{"id", "tags", "pred"}` (word-level tag lists), in test order."""
    gold = [ex["tags"] for ex in examples]
    kept = [[labels[i] for i in row[row != IGNORE]] for row in label_ids]
    if any(k != g[:len(k)] for k, g in zip(kept, gold, strict=True)):
        raise RuntimeError("finetune: test predictions came back in another order than the test set")
    pred = word_predictions(label_ids, np.argmax(logits, -1), [len(g) for g in gold], labels)
    rows = [{"id": ex.get("id", i), "tags": g, "pred": p} for i, (ex, g, p) in enumerate(zip(examples, gold, pred))]
    return tag_scores(gold, pred), rows


# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """The pieces of one task type that `finetune.run` plugs into the Trainer."""

    model: type  # an AutoModelFor... class
    collator: Callable[[PreTrainedTokenizerBase], Any]
    encode: Callable[[Any, dict[str, list], dict[str, int], int], dict[str, list]]  # for Dataset.map(batched=True)
    dev_metrics: Callable[[Any, list[str]], dict[str, float]]
    results: Callable[[Iterable[dict], np.ndarray, np.ndarray, list[str]], tuple[dict[str, float], list[dict]]]


TASKS: dict[TaskType, Task] = {
    "sequence_classification": Task(AutoModelForSequenceClassification, DataCollatorWithPadding, encode_texts,
                                    dev_metrics, sequence_results),
    # the collator pads labels with IGNORE, so padding is neither trained on nor scored
    "token_classification": Task(AutoModelForTokenClassification, DataCollatorForTokenClassification,
                                 encode_words, tag_dev_metrics, token_results),
}
