"""Unit tests for dapt/sources/hf_source.py: datasets built in the test and saved to tmp_path; the Hub is never
reached (its loader is replaced, or offline mode is on)."""

from __future__ import annotations

from pathlib import Path

import datasets
import huggingface_hub.constants
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, List, Value
from pydantic import ValidationError

from dapt.sources import hf_source as hf
from dapt.sources.hf_source import HFDataset


def saved(path: Path, data: Dataset | DatasetDict) -> Path:
    data.save_to_disk(str(path))
    return path


@pytest.fixture
def fake_hub(monkeypatch):
    """`datasets.load_dataset` answering from local datasets; records each call's arguments."""
    calls, hub = [], {}

    def load_dataset(path, name=None, split=None, streaming=False):
        calls.append((path, name, split, streaming))
        data = hub[(path, name)][split]
        return data.to_iterable_dataset() if streaming and isinstance(data, Dataset) else data

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return hub, calls


# ---------------------------------------------------------------------------------------------------
# params


def test_hub_needs_a_split_and_one_source():
    with pytest.raises(ValidationError, match="hub dataset 'imdb' needs a split"):
        HFDataset(hub="imdb")
    with pytest.raises(ValidationError, match="exactly one of hub"):
        HFDataset(hub="imdb", disk="x", split="train")
    with pytest.raises(ValidationError, match="exactly one of hub"):
        HFDataset(split="train")
    with pytest.raises(ValidationError, match="config is for hub datasets"):
        HFDataset(disk="x", config="en")


def test_saved_folders_are_told_from_file_folders(tmp_path):
    assert hf.is_saved_dataset(saved(tmp_path / "ds", Dataset.from_dict({"text": ["a"]})))
    assert hf.is_saved_dataset(saved(tmp_path / "dd", DatasetDict(train=Dataset.from_dict({"text": ["a"]}))))
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "a.jsonl").write_text('{"text": "a"}\n')
    assert not hf.is_dataset(tmp_path / "files") and hf.is_dataset(HFDataset(hub="x", split="train"))


# ---------------------------------------------------------------------------------------------------
# saved datasets


def test_saved_dataset_documents_are_streamed_with_row_ids(tmp_path):
    path = saved(tmp_path / "corpus", Dataset.from_dict({"body": [" first ", "", "second"], "n": [1, 2, 3]}))
    docs = hf.read_documents(path, "ingest.files.domain", "body")
    assert not isinstance(docs, list)  # a stream: ingest writes its shards as it reads
    assert list(docs) == [{"id": "corpus:1", "text": "first"}, {"id": "corpus:3", "text": "second"}]


def test_dataset_dict_needs_a_split(tmp_path):
    path = saved(tmp_path / "task", DatasetDict(train=Dataset.from_dict({"text": ["a"], "label": ["x"]}),
                                                validation=Dataset.from_dict({"text": ["b"], "label": ["y"]})))
    with pytest.raises(ValueError, match=r"ingest.files.dev: .*task is a DatasetDict; name a split.*"
                                         r"splits: \['train', 'validation'\]"):
        hf.read_labelled(path, "ingest.files.dev", "text", "label")
    with pytest.raises(ValueError, match=r"ingest.files.dev: .*task has no split 'dev'; splits: \['train', 'valid"):
        hf.read_labelled(HFDataset(disk=path, split="dev"), "ingest.files.dev", "text", "label")
    assert hf.read_labelled(HFDataset(disk=path, split="validation"), "ingest.files.dev", "text", "label") == \
        [{"id": "task/validation:1", "text": "b", "label": "y"}]


def test_class_label_ids_become_names(tmp_path):
    features = Features({"sentence": Value("string"), "y": ClassLabel(names=["neg", "pos"])})
    path = saved(tmp_path / "sst", Dataset.from_dict({"sentence": ["good", "bad"], "y": [1, 0]}, features=features))
    assert [ex["label"] for ex in hf.read_labelled(path, "ingest.files.train", "sentence", "y")] == ["pos", "neg"]


def test_unlabelled_rows_are_errors(tmp_path):
    # GLUE-style test splits mark "no label" with -1
    features = Features({"text": Value("string"), "label": ClassLabel(names=["neg", "pos"])})
    path = saved(tmp_path / "glue", Dataset.from_dict({"text": ["a", "b"], "label": [0, -1]}, features=features))
    with pytest.raises(ValueError, match=r"ingest.files.test \(glue\) row 2: label 'label' is missing"):
        hf.read_labelled(path, "ingest.files.test", "text", "label")


def test_tag_sequences_with_class_labels(tmp_path):
    features = Features({"words": List(Value("string")), "ner": List(ClassLabel(names=["O", "B-PER", "I-PER"]))})
    path = saved(tmp_path / "ner", Dataset.from_dict({"words": [["Ada", "Lovelace", "wrote"]], "ner": [[1, 2, 0]]},
                                                     features=features))
    assert hf.read_tagged(path, "ingest.files.train", "words", "ner") == [
        {"id": "ner:1", "tokens": ["Ada", "Lovelace", "wrote"], "tags": ["B-PER", "I-PER", "O"],
         "text": "Ada Lovelace wrote"}]


def test_missing_column_names_key_dataset_and_columns(tmp_path):
    path = saved(tmp_path / "corpus", Dataset.from_dict({"body": ["a"], "title": ["t"]}))
    with pytest.raises(ValueError, match=r"ingest.files.domain \(corpus\) has no column 'text'; "
                                         r"columns: \['body', 'title'\]"):
        list(hf.read_documents(path, "ingest.files.domain", "text"))


def test_non_string_text_names_dataset_and_row(tmp_path):
    path = saved(tmp_path / "t", Dataset.from_dict({"text": ["a", None], "label": ["x", "y"]}))
    with pytest.raises(ValueError, match=r"ingest.files.train \(t\) row 2: text 'text' is missing \(null\)"):
        hf.read_labelled(path, "ingest.files.train", "text", "label")
    path = saved(tmp_path / "n", Dataset.from_dict({"text": [1, 2]}))
    with pytest.raises(ValueError, match=r"ingest.files.domain \(n\) row 1: text 'text' is a int, not a string"):
        list(hf.read_documents(path, "ingest.files.domain"))


def test_tags_without_names_are_errors(tmp_path):
    path = saved(tmp_path / "ids", Dataset.from_dict({"tokens": [["a"]], "tags": [[3]]}))
    with pytest.raises(ValueError, match=r"\(ids\) row 1: tags 'tags' item 1 is a int, not a string"):
        hf.read_tagged(path, "ingest.files.train")


def test_an_all_empty_corpus_is_an_error(tmp_path):
    path = saved(tmp_path / "e", Dataset.from_dict({"text": ["", "  "]}))
    with pytest.raises(ValueError, match=r"ingest.files.general \(e\): no documents"):
        list(hf.read_documents(path, "ingest.files.general"))


# ---------------------------------------------------------------------------------------------------
# the Hub


def test_hub_dataset_with_config_split_and_columns(fake_hub):
    hub, calls = fake_hub
    hub[("org/legal", "contracts")] = {
        "train": Dataset.from_dict({"clause": ["pay on time", "  ", "terminate"], "kind": ["pay", "x", "end"]})}
    src = HFDataset(hub="org/legal", config="contracts", split="train")
    assert hf.read_labelled(src, "ingest.files.train", "clause", "kind") == [
        {"id": "org/legal/contracts/train:1", "text": "pay on time", "label": "pay"},
        {"id": "org/legal/contracts/train:3", "text": "terminate", "label": "end"}]
    assert [d["text"] for d in hf.read_documents(src, "ingest.files.domain", "clause")] == ["pay on time", "terminate"]
    # the task split is loaded whole; a corpus is streamed
    assert calls == [("org/legal", "contracts", "train", False), ("org/legal", "contracts", "train", True)]


def test_unreachable_hub_names_key_and_dataset_and_suggests_save_to_disk(monkeypatch):
    # the hub libraries read HF_HUB_OFFLINE once, at import: set their copies too, so no request is ever made
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    src = HFDataset(hub="nobody/no-such-corpus", config="en", split="train")
    with pytest.raises(ConnectionError, match=r"ingest.files.domain: cannot reach the Hugging Face Hub for dataset "
                                              r"'nobody/no-such-corpus': offline mode is on \(HF_HUB_OFFLINE\)\. .*"
                                              r"load_dataset\('nobody/no-such-corpus', 'en', split='train'\)"
                                              r"\.save_to_disk"):
        hf.read_documents(src, "ingest.files.domain")  # fails on opening, before anything is read


def test_a_stream_without_features_checks_columns_as_it_reads(fake_hub):
    hub, _ = fake_hub
    # a map without declared features: columns unknown until the first rows arrive, as for some Hub corpora
    stream = Dataset.from_dict({"x": [1]}).to_iterable_dataset().map(lambda r: {"body": "a"}, remove_columns=["x"])
    assert stream.column_names is None
    hub[("org/raw", None)] = {"train": stream}
    docs = hf.read_documents(HFDataset(hub="org/raw", split="train"), "ingest.files.domain")
    with pytest.raises(ValueError, match=r"\(org/raw/train\) has no column 'text'; columns: \['body'\]"):
        list(docs)
