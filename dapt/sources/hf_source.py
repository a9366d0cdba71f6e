"""hf_source: read the user's documents and labelled examples from 🤗 datasets, one saved with `save_to_disk` or
one on the Hugging Face Hub, for the `files` source of `ingest` (beside the plain files of `file_source`).

An input is a `save_to_disk` folder (a path, detected by the files `save_to_disk` writes) or an `HFDataset`
mapping in params.yaml: `{hub: <id>, config: <name>, split: <split>}` or `{disk: <folder>, split: <split>}`.
Columns are the ones `ingest.files` names (text_column, label_column, ...). Class ids of a `ClassLabel` column
(labels, or tags of a token sequence such as the Hub's conll2003 `ner_tags`) become their names.

Corpora (domain, general) are streamed: a Hub corpus is read as it downloads and never held whole, so ingest
can write its shards as it goes. Records match `file_source`'s: `{"id", "text"}` plus `"label"`, or
`{"id", "tokens", "tags", "text"}`; the id is `<dataset>/<split>:<n>` (`name`), n the 1-based row. Empty texts are
skipped, every other problem is an error naming the params key, the dataset and the row.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import datasets
from datasets import ClassLabel, Dataset, DatasetDict, IterableDataset
from datasets.exceptions import DatasetNotFoundError
from pydantic import Discriminator, Field, Tag, model_validator

from dapt.common import Section
from dapt.sources.file_source import label_of, strings_of, text_of

BATCH = 1000  # rows decoded from Arrow at a time: row-by-row access costs more than the rest of the reading


class HFDataset(Section):
    """A 🤗 dataset as `load_dataset` (hub) or `load_from_disk` (disk) takes it."""

    hub: str | None = Field(default=None, min_length=1)  # a Hub dataset id, e.g. ccdv/pubmed-summarization
    disk: Path | None = None  # a folder written by Dataset.save_to_disk or DatasetDict.save_to_disk
    config: str | None = Field(default=None, min_length=1)  # the Hub dataset's configuration (`name`)
    split: str | None = Field(default=None, min_length=1)  # e.g. train, validation, train[:10%] (hub)

    @model_validator(mode="after")
    def _one_source(self) -> HFDataset:
        if (self.hub is None) == (self.disk is None):
            raise ValueError("give exactly one of hub (a Hub dataset id) and disk (a save_to_disk folder)")
        if self.hub is not None and self.split is None:
            raise ValueError(f"hub dataset {self.hub!r} needs a split, e.g. split: train")
        if self.disk is not None and self.config is not None:
            raise ValueError("config is for hub datasets; a save_to_disk folder has none")
        return self


# a params value: a path (files, or a save_to_disk folder) or a dataset mapping; tagged so that a bad mapping is
# reported against HFDataset alone, not against both halves of the union
Input = Annotated[Annotated[Path, Tag("path")] | Annotated[HFDataset, Tag("dataset")],
                  Discriminator(lambda v: "dataset" if isinstance(v, dict | HFDataset) else "path")]


def is_saved_dataset(path: Path) -> bool:
    """True for a folder written by `save_to_disk`: a Dataset (state.json and dataset_info.json) or a DatasetDict."""
    path = Path(path)
    return (path / "dataset_dict.json").is_file() or \
        ((path / "state.json").is_file() and (path / "dataset_info.json").is_file())


def is_dataset(source: Path | HFDataset) -> bool:
    """True when `source` is read by this module rather than by `file_source`."""
    return isinstance(source, HFDataset) or is_saved_dataset(source)


def name(source: HFDataset) -> str:
    """How ids and errors name the dataset: `<hub id or folder name>[/<config>][/<split>]`."""
    base = source.hub if source.hub is not None else Path(source.disk).name
    return "/".join(part for part in (base, source.config, source.split) if part)


def hub_offline() -> bool:
    """Offline mode as the environment says now (the hub libraries read it once, at import)."""
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _from_hub(source: HFDataset, key: str, streaming: bool) -> Dataset | IterableDataset:
    try:
        return datasets.load_dataset(source.hub, source.config, split=source.split, streaming=streaming)
    except ConnectionError as e:
        why = "offline mode is on (HF_HUB_OFFLINE)" if hub_offline() else f"{e}"
        args = ", ".join(repr(a) for a in (source.hub, source.config) if a)
        raise ConnectionError(
            f"{key}: cannot reach the Hugging Face Hub for dataset {source.hub!r}: {why}. On a machine with "
            f"internet, run `datasets.load_dataset({args}, split={source.split!r}).save_to_disk('<folder>')`, "
            f"copy the folder here and set {key}: {{disk: <folder>}}") from e
    except DatasetNotFoundError as e:
        raise ValueError(f"{key}: no dataset {source.hub!r} on the Hub, or it is gated or private "
                         f"(log in with `hf auth login`): {e}") from e
    except ValueError as e:  # an unknown config or split
        raise ValueError(f"{key}: {source.hub}: {e}") from e


def _from_disk(source: HFDataset, key: str) -> Dataset:
    folder = Path(source.disk)
    if not is_saved_dataset(folder):
        raise ValueError(f"{key}: {folder} is not a folder written by save_to_disk")
    data = datasets.load_from_disk(str(folder))
    if isinstance(data, DatasetDict):
        if source.split is None:
            raise ValueError(f"{key}: {folder} is a DatasetDict; name a split: {{disk: {folder}, split: ...}}; "
                             f"splits: {sorted(data)}")
        if source.split not in data:
            raise ValueError(f"{key}: {folder} has no split {source.split!r}; splits: {sorted(data)}")
        return data[source.split]
    if source.split is not None:
        raise ValueError(f"{key}: {folder} holds a single Dataset, not a DatasetDict; remove split")
    return data


def open_dataset(source: Path | HFDataset, key: str,
                 streaming: bool = False) -> tuple[HFDataset, Dataset | IterableDataset]:
    """The dataset `source` names (a plain path is a save_to_disk folder); `key` is its params key, for errors.

    `streaming` reads a Hub dataset as it downloads (an IterableDataset); a saved one is memory-mapped anyway.
    """
    source = source if isinstance(source, HFDataset) else HFDataset(disk=source)
    data = _from_hub(source, key, streaming) if source.hub is not None else _from_disk(source, key)
    return source, data


def _check_columns(columns: list[str], available: list[str], where: str) -> None:
    missing = [c for c in columns if c not in available]
    if missing:
        raise ValueError(f"{where} has no column {missing[0]!r}; columns: {available}")


def _rows(data: Dataset | IterableDataset, columns: list[str], where: str) -> Iterator[tuple[int, dict]]:
    """(1-based row, {column: value}) for the named columns; ClassLabel ids become their names."""
    if data.column_names is not None:  # None for a stream whose features are unknown until read
        _check_columns(columns, data.column_names, where)
        data = data.select_columns(columns)
    features = data.features or {}
    names = {c: _class_label(features.get(c)) for c in columns}
    n = 0
    for batch in data.iter(batch_size=BATCH):
        _check_columns(columns, list(batch), where)
        for values in zip(*(batch[c] for c in columns), strict=True):
            n += 1
            yield n, {c: _named(v, names[c]) for c, v in zip(columns, values, strict=True)}


def _class_label(feature: object) -> ClassLabel | None:
    """The ClassLabel of a label column or of a sequence of tags, if it is one."""
    inner = getattr(feature, "feature", feature)  # List(ClassLabel) / Sequence(ClassLabel): tags
    return inner if isinstance(inner, ClassLabel) else None


def _named(value: object, names: ClassLabel | None) -> object:
    if names is None:
        return value
    if isinstance(value, list):
        return [_named(v, names) for v in value]
    # -1 is the datasets convention for "no label" (e.g. GLUE test sets): reported as missing
    return None if value is None or value < 0 else names.int2str(value)


def read_documents(source: Path | HFDataset, key: str, text_column: str = "text") -> Iterator[dict]:
    """`{"id", "text"}` for every non-empty text, streamed: the dataset is opened now (so an unreachable Hub
    fails at once) and read as the caller iterates."""
    source, data = open_dataset(source, key, streaming=True)
    where = f"{key} ({name(source)})"

    def docs() -> Iterator[dict]:
        n_docs = 0
        for n, record in _rows(data, [text_column], where):
            text = text_of(record, text_column, f"{where} row {n}")
            if text.strip():
                n_docs += 1
                yield {"id": f"{name(source)}:{n}", "text": text.strip()}
        if not n_docs:
            raise ValueError(f"{where}: no documents (every text was empty)")

    return docs()


def read_labelled(source: Path | HFDataset, key: str, text_column: str, label_column: str) -> list[dict]:
    """`{"id", "text", "label"}` for every example with a non-empty text; labels as strings (class names)."""
    source, data = open_dataset(source, key)
    where = f"{key} ({name(source)})"
    out = []
    for n, record in _rows(data, [text_column, label_column], where):
        text = text_of(record, text_column, f"{where} row {n}")
        if text.strip():
            label = label_of(record, label_column, f"{where} row {n}")
            out.append({"id": f"{name(source)}:{n}", "text": text.strip(), "label": label})
    if not out:
        raise ValueError(f"{where}: no examples (every text was empty)")
    return out


def read_tagged(source: Path | HFDataset, key: str, tokens_column: str = "tokens",
                tags_column: str = "tags") -> list[dict]:
    """`{"id", "tokens", "tags", "text"}` for every sentence: a list of words and a tag (name) per word."""
    source, data = open_dataset(source, key)
    where = f"{key} ({name(source)})"
    out = []
    for n, record in _rows(data, [tokens_column, tags_column], where):
        row = f"{where} row {n}"
        tokens = strings_of(record, tokens_column, "tokens", row)
        tags = strings_of(record, tags_column, "tags", row)
        if len(tokens) != len(tags):
            raise ValueError(f"{row}: {len(tokens)} tokens but {len(tags)} tags; need one tag per token")
        out.append({"id": f"{name(source)}:{n}", "tokens": tokens, "tags": tags, "text": " ".join(tokens)})
    if not out:
        raise ValueError(f"{where}: no sentences (the split is empty)")
    return out
