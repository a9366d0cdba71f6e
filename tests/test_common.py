"""Params validation, atomic writes, text shards, and the shipped params.yaml."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from dapt.common import (
    ParamsError,
    TextShardWriter,
    active_profile,
    atomic_path,
    iter_texts,
    load_params,
    load_paths,
    read_params_file,
    text_shards,
    write_json,
    write_text_shards,
)
from stages.adapt_tokenizer import AdaptTokenizerParams
from stages.clean import CleanParams
from stages.compare import CompareParams
from stages.finetune import FinetuneParams
from stages.ingest import IngestParams
from stages.pretrain import PretrainParams

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {"ingest": IngestParams, "clean": CleanParams, "adapt_tokenizer": AdaptTokenizerParams,
            "pretrain": PretrainParams, "finetune": FinetuneParams, "compare": CompareParams}


@pytest.mark.parametrize("profile", [None, "cpu-demo", "gpu-demo"])
@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_shipped_params_validate_under_every_profile(tmp_path, section, profile):
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    path = write(tmp_path, yaml.safe_dump({**data, "profile": profile}))
    load_params(section, SECTIONS[section], path)
    load_paths(path)


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_unknown_key_is_named(tmp_path):
    path = write(tmp_path, "clean: {min_words: 3, max_words: 9, valid_fraction: 0.1, max_valid_docs: 5,"
                           " general_max_docs: 5, min_wrods: 4}\n")
    with pytest.raises(ParamsError, match=r"params.yaml: clean.min_wrods: Extra inputs are not permitted"):
        load_params("clean", CleanParams, path)


def test_bad_value_names_key_and_range(tmp_path):
    path = write(tmp_path, "clean: {min_words: 3, max_words: 9, valid_fraction: 0.9, max_valid_docs: 5,"
                           " general_max_docs: 5}\n")
    with pytest.raises(ParamsError, match=r"clean.valid_fraction: Input should be less than 0.5 \(got 0.9\)"):
        load_params("clean", CleanParams, path)


def test_cross_field_check(tmp_path):
    import yaml

    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["pretrain"]["mask_replace_prob"] = 0.95
    path = write(tmp_path, yaml.safe_dump(data))
    with pytest.raises(ParamsError, match="mask_replace_prob \\+ pretrain.random_replace_prob must not exceed 1"):
        load_params("pretrain", PretrainParams, path)


def test_missing_section_and_bad_yaml(tmp_path):
    with pytest.raises(ParamsError, match="missing section 'clean'"):
        load_params("clean", CleanParams, write(tmp_path, "paths: {}\n"))
    with pytest.raises(ParamsError, match="params.yaml: invalid YAML"):
        load_params("clean", CleanParams, write(tmp_path, "clean: [unclosed\n"))


def test_atomic_path_keeps_old_output_on_failure(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"v": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text('{"v": 2, "trunc')
        raise RuntimeError("crash mid-write")
    assert target.read_text().strip().endswith("}") and '"v": 1' in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temp leftovers


def test_atomic_path_replaces_directory(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.bin").write_text("old")
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "new.bin").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.bin"]


def test_make_run_gpu_only_sets_existing_params():
    """`dvc exp run -S` refuses keys that params.yaml lacks; `make run-gpu` must not hit that."""
    import re

    makefile = (ROOT / "Makefile").read_text()
    keys = re.findall(r"-S '?([\w.-]+)=", makefile)
    assert "profile" in keys
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key in keys:
        node = params
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"make run-gpu sets {key}, which params.yaml lacks"
            node = node[part]


# ---------------------------------------------------------------------------------------------------
# budget profiles

BASE = """profile: {profile}
ingest: {{source: {source}}}
pretrain: {{max_steps: null, max_tokens: 2.0e+9, snapshots: [0]}}
finetune: {{seeds: [0], training: {{epochs: 10}}}}
profiles:
  cpu-demo: {{pretrain: {{max_steps: 150, max_tokens: null}}, finetune: {{training: {{epochs: 2}}}}}}
  {extra}
"""


def params_with(tmp_path, profile: str = "auto", source: str = "demo", extra: str = "") -> dict:
    return read_params_file(write(tmp_path, BASE.format(profile=profile, source=source, extra=extra)))


@pytest.mark.parametrize(("profile", "source", "name"), [("auto", "demo", "cpu-demo"), ("auto", "files", None),
                                                         ("null", "demo", None), ("cpu-demo", "files", "cpu-demo")])
def test_profile_auto_is_the_cpu_demo_only_with_the_demo(tmp_path, profile, source, name):
    data = params_with(tmp_path, profile, source)
    assert active_profile(tmp_path / "params.yaml") == name
    assert (data["pretrain"]["max_steps"], data["finetune"]["training"]["epochs"]) == \
        ((150, 2) if name else (None, 10))
    assert data["pretrain"]["max_tokens"] is (None if name else data["pretrain"]["max_tokens"])
    assert data["finetune"]["seeds"] == [0]  # what the profile does not set stays


def test_file_values_without_the_profile(tmp_path):
    params_with(tmp_path)
    assert read_params_file(tmp_path / "params.yaml", profile=False)["pretrain"]["max_steps"] is None


@pytest.mark.parametrize(("profile", "extra", "error"), [
    ("gpu", "", r"profile: 'gpu' is not defined under profiles: \(defined: cpu-demo"),
    ("typo", "typo: {pretrain: {max_stepz: 1}}",
     r"profiles.typo.pretrain.max_stepz: 'max_stepz' is not a key of 'pretrain'"),
    ("seeds", "seeds: {finetune: {seeds: [0, 1]}}", r"profiles.seeds.finetune.seeds: dvc.yaml expands"),
    ("curve", "curve: {pretrain: {snapshots: [0, 50]}}", r"profiles.curve.pretrain.snapshots: dvc.yaml expands"),
    ("top", "top: {runtime: {threads: 1}}", r"profiles.top.runtime: 'runtime' is not a key of 'the top level'"),
])
def test_bad_profile_is_named(tmp_path, profile, extra, error):
    with pytest.raises(ParamsError, match=error):
        params_with(tmp_path, profile, extra=extra)


# ---------------------------------------------------------------------------------------------------
# training text: Parquet shards (or a JSONL file), streamed


def docs(n: int) -> list[dict]:
    return [{"id": f"d{i}", "text": f"document number {i} ünïcode"} for i in range(n)]


def test_text_shards_split_every_shard_docs_rows_in_row_groups(tmp_path, monkeypatch):
    monkeypatch.setattr("dapt.common.ROW_GROUP_DOCS", 2)
    assert write_text_shards(tmp_path / "train", docs(7), shard_docs=3) == 7
    shards = text_shards(tmp_path / "train")
    assert [s.name for s in shards] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    files = [pq.ParquetFile(s) for s in shards]
    assert [f.metadata.num_rows for f in files] == [3, 3, 1]
    assert [f.metadata.num_row_groups for f in files] == [2, 2, 1]  # 2 + 1, 2 + 1, 1
    assert files[0].schema_arrow == pa.schema([("id", pa.string()), ("text", pa.string())])
    assert files[0].metadata.row_group(0).column(1).compression == "ZSTD"
    assert [r for s in shards for r in pq.read_table(s).to_pylist()] == docs(7)
    assert [p.name for p in tmp_path.iterdir()] == ["train"]  # no temp leftovers


def test_iter_texts_streams_shards_in_order_in_batches(tmp_path):
    write_text_shards(tmp_path / "train", docs(7), shard_docs=3)
    batches = list(iter_texts(tmp_path / "train", batch_size=2))
    assert all(1 <= len(b) <= 2 for b in batches)
    assert [t for b in batches for t in b] == [d["text"] for d in docs(7)]


def test_iter_texts_reads_a_jsonl_file(tmp_path):
    path = tmp_path / "valid.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs(5)) + "\n", encoding="utf-8")  # a blank line too
    assert text_shards(path) == [path]
    assert list(iter_texts(path, batch_size=2)) == [[d["text"] for d in docs(5)][i:i + 2] for i in (0, 2, 4)]


def test_empty_corpus_is_one_empty_shard(tmp_path):
    write_text_shards(tmp_path / "train", [], shard_docs=3)
    assert [s.name for s in text_shards(tmp_path / "train")] == ["part-00000.parquet"]
    assert list(iter_texts(tmp_path / "train")) == []


def test_shard_order_is_by_name_and_other_files_are_ignored(tmp_path):
    folder = tmp_path / "train"
    folder.mkdir()
    for name, text in (("part-00001.parquet", "second"), ("part-00000.parquet", "first")):
        pq.write_table(pa.table({"id": [name], "text": [text]}), folder / name)
    (folder / ".gitignore").write_text("x\n")
    assert [s.name for s in text_shards(folder)] == ["part-00000.parquet", "part-00001.parquet"]
    assert list(iter_texts(folder)) == [["first"], ["second"]]


def test_text_shards_errors_name_the_path(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty: a folder with no \*\.parquet shards"):
        text_shards(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="missing.jsonl: not found"):
        text_shards(tmp_path / "missing.jsonl")


def test_iter_texts_errors_name_the_file(tmp_path):
    pq.write_table(pa.table({"id": ["a"], "body": ["x"]}), tmp_path / "part-00000.parquet")
    with pytest.raises(ValueError, match=r"part-00000.parquet: no 'text' column \(columns: id, body\)"):
        list(iter_texts(tmp_path))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"id": "no text"}\n')
    with pytest.raises(ValueError, match="bad.jsonl: document 2 has no 'text' string"):
        list(iter_texts(tmp_path / "bad.jsonl"))
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ValueError, match="broken.jsonl:2: invalid JSON"):
        list(iter_texts(tmp_path / "broken.jsonl"))
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        list(iter_texts(tmp_path / "bad.jsonl", batch_size=0))


def test_failed_shard_write_keeps_the_old_folder(tmp_path):
    write_text_shards(tmp_path / "train", docs(2), shard_docs=3)

    def rows():
        yield from docs(5)
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        write_text_shards(tmp_path / "train", rows(), shard_docs=3)
    assert [t for b in iter_texts(tmp_path / "train") for t in b] == [d["text"] for d in docs(2)]
    assert [p.name for p in tmp_path.iterdir()] == ["train"]
    with pytest.raises(ValueError, match="shard_docs must be >= 1"):
        TextShardWriter(tmp_path / "x", 0)


def test_datasets_reads_the_shards(tmp_path):
    datasets = pytest.importorskip("datasets")
    write_text_shards(tmp_path / "train", docs(7), shard_docs=3)
    ds = datasets.load_dataset("parquet", data_files=[str(s) for s in text_shards(tmp_path / "train")],
                               split="train", cache_dir=str(tmp_path / "cache"))
    assert ds.column_names == ["id", "text"] and ds["text"] == [d["text"] for d in docs(7)]


def test_file_digest_reads_a_file_once_until_it_changes(tmp_path, monkeypatch):
    import hashlib
    import os

    from dapt import common

    path = tmp_path / "shard.parquet"
    path.write_bytes(b"first")
    reads = []
    real = hashlib.file_digest
    monkeypatch.setattr(hashlib, "file_digest", lambda f, name: reads.append(name) or real(f, name))
    first = common.file_digest(path)
    assert first == hashlib.sha1(b"first").digest() and common.file_digest(path) == first and len(reads) == 1
    path.write_bytes(b"other")  # same size: the new modification time tells it apart
    os.utime(path, ns=(1, 1))
    assert common.file_digest(path) == hashlib.sha1(b"other").digest() and len(reads) == 2
