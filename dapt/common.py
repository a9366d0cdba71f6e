"""Shared plumbing for every stage: validated params, declared paths, atomic writes, JSONL and Parquet text I/O.

Nothing here knows about a particular stage; a stage module declares its own params model and calls
`load_params("<stage>", Model)`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import glob
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

PARAMS_FILE = Path("params.yaml")

log = logging.getLogger("dapt")


class Section(BaseModel):
    """Base of every params section: unknown keys are errors, values are immutable once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Paths(Section):
    """Every file the pipeline passes between stages, declared once; `dvc.yaml` reads the same keys."""

    raw_domain: Path
    raw_general: Path
    task: Path
    domain_train: Path
    domain_valid: Path
    general_valid: Path
    general_train: Path
    models: Path
    checkpoints: Path
    finetune: Path
    reports: Path
    metrics: Path

    # one convention, shared with dvc.yaml: a model variant lives at `<models>/<variant>`
    def model_dir(self, variant: str) -> Path:
        """The model folder of a variant: general (the base snapshot), domain, domain_novocab."""
        return self.models / variant

    def init_dir(self, variant: str) -> Path:
        """Where a pretrained variant starts: `<models>/<variant>_init`, written by adapt_tokenizer."""
        return self.models / f"{variant}_init"

    def snapshot_dir(self, variant: str, percent: int) -> Path:
        """The model pretrain kept at `percent`% of its steps: `<models>/<variant>_snapshots/<percent>`."""
        return self.models / f"{variant}_snapshots" / str(percent)

    @property
    def base_model(self) -> Path:
        return self.model_dir("general")


class ParamsError(ValueError):
    """A params file that is missing, unreadable or fails validation; the message names file and key."""


T = TypeVar("T", bound=BaseModel)


def read_params_file(path: Path = PARAMS_FILE, profile: bool = True) -> dict[str, Any]:
    """The params mapping, with YAML errors reported by file and line; `profile`: with the active profile's
    values applied over the sections (False: the file's own values, the recipe)."""
    if not path.exists():
        raise ParamsError(f"{path}: not found (run from the project root)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: invalid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    return apply_profile(data, path) if profile else data


# ---------------------------------------------------------------------------------------------------
# budget profiles: a named set of values (`profiles.<name>` in params.yaml) applied over the sections, so the
# sections themselves hold the published recipe and the CPU demo's cut budget is one explicit name

AUTO_PROFILE = "cpu-demo"  # what `profile: auto` means with the built-in demo; with your own data: none
# dvc.yaml expands these into stage names before any code runs: a profile cannot change them
TEMPLATED = ("paths", "pretrain.variants", "pretrain.launcher", "pretrain.snapshots", "pretrain.tapt",
             "finetune.variants", "finetune.seeds")


def profile_name(data: dict[str, Any]) -> str | None:
    """The profile `data` selects: `profile:` as written, `auto` resolved by `ingest.source`, None for none."""
    name = data.get("profile")
    if name == "auto":
        return AUTO_PROFILE if (data.get("ingest") or {}).get("source", "demo") == "demo" else None
    return name


def profile_overrides(data: dict[str, Any], source: Path = PARAMS_FILE) -> dict[str, Any]:
    """`section.key` -> value of every key the selected profile sets (empty without a profile); a profile that
    is not defined, sets a key the sections do not have, or sets a key dvc.yaml expands is an error."""
    name = profile_name(data)
    if name is None:
        return {}
    profiles = data.get("profiles") or {}
    if name not in profiles:
        raise ParamsError(f"{source}: profile: '{name}' is not defined under profiles: (defined: "
                          f"{', '.join(sorted(profiles)) or 'none'}; null or auto also work)")
    out: dict[str, Any] = {}

    def walk(values: Any, base: Any, key: str) -> None:
        if isinstance(values, dict) and isinstance(base, dict):
            for k, v in values.items():
                if k not in base:
                    raise ParamsError(f"{source}: profiles.{name}.{key}{k}: '{k}' is not a key of "
                                      f"'{key.rstrip('.') or 'the top level'}' in {source}")
                walk(v, base[k], f"{key}{k}.")
            return
        dotted = key.rstrip(".")
        if any(dotted == t or dotted.startswith(f"{t}.") or t.startswith(f"{dotted}.") for t in TEMPLATED):
            raise ParamsError(f"{source}: profiles.{name}.{dotted}: dvc.yaml expands {dotted} into its stages before "
                              f"a profile applies; set it in the '{dotted.split('.')[0]}' section instead")
        out[dotted] = values

    walk(profiles[name], {k: v for k, v in data.items() if k not in ("profile", "profiles")}, "")
    return out


def apply_profile(data: dict[str, Any], source: Path = PARAMS_FILE) -> dict[str, Any]:
    """A copy of `data` with the selected profile's values in place of the sections' own."""
    overrides = profile_overrides(data, source)
    if not overrides:
        return data
    out = copy.deepcopy(data)
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = out
        for k in parents:
            node = node[k]
        node[leaf] = copy.deepcopy(value)
    return out


def active_profile(path: Path = PARAMS_FILE) -> str | None:
    """The budget profile the stages run with (`profile:` in params.yaml, `auto` resolved), None for the recipe."""
    return profile_name(read_params_file(path, profile=False))


def validate_section(data: dict[str, Any], section: str, model: type[T], source: Path = PARAMS_FILE) -> T:
    """Validate one section, turning pydantic's report into `file: section.key: problem` lines."""
    if section not in data:
        raise ParamsError(f"{source}: missing section '{section}'")
    try:
        return model.model_validate(data[section])
    except ValidationError as err:
        lines = []
        for e in err.errors():
            key = ".".join(str(p) for p in (section, *e["loc"]))
            lines.append(f"{source}: {key}: {e['msg']} (got {e.get('input')!r})")
        raise ParamsError("\n".join(lines)) from None


def load_params(section: str, model: type[T], path: Path = PARAMS_FILE) -> T:
    """Load and validate one stage's section of `params.yaml`."""
    return validate_section(read_params_file(path), section, model, path)


def load_paths(path: Path = PARAMS_FILE) -> Paths:
    """The shared `paths:` section."""
    return load_params("paths", Paths, path)


def setup_logging() -> None:
    """One log format for every stage process; DVC and Prefect stream it as is."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # transformers and mlflow are chatty at INFO about things the user cannot act on
    for name in ("mlflow", "alembic", "urllib3", "filelock", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)


class RuntimeParams(Section):
    """`runtime:` in params.yaml: how the stages use this machine; results do not depend on it."""

    threads: int | None = Field(None, ge=1)


def setup_stage(path: Path = PARAMS_FILE) -> None:
    """The first call of every stage's main(): logging, the thread count (`runtime.threads`), the profile logged."""
    setup_logging()
    data = read_params_file(path, profile=False)
    overrides = profile_overrides(data, path)
    if overrides:
        log.info("profile %s: %s", profile_name(data), ", ".join(f"{k}={v}" for k, v in overrides.items()))
    runtime = validate_section(apply_profile(data, path), "runtime", RuntimeParams, path) \
        if "runtime" in data else RuntimeParams()
    if runtime.threads is not None:
        set_threads(runtime.threads)


def set_threads(n: int) -> None:
    """Use `n` threads in this process (torch's intra-op pool) and in the processes it starts (OpenMP, MKL, the
    tokenizers' Rust pool): on a busy machine, threads that wait for a core cost more than they give."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"):
        os.environ[var] = str(n)
    # torch and numpy's BLAS (scikit-learn's fits) read the variables when loaded, which is usually before this
    # runs: resize the pools of those already loaded. Not an import: clean and ingest never load torch
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)
    from threadpoolctl import threadpool_limits

    threadpool_limits(n)


# ---------------------------------------------------------------------------------------------------
# atomic output: DVC must never cache a half-written file or directory


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling path; on success it replaces `target` in one rename, on error it is removed.

    Works for files and directories alike: the caller decides what to create at the yielded path.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # leftovers of a writer killed before its cleanup ran (each path has one writer at a time)
    for stale in target.parent.glob(f".{glob.escape(target.name)}.*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    work = tmp / target.name
    try:
        yield work
        if not work.exists():
            raise FileNotFoundError(f"{target}: nothing was written")
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        os.replace(work, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> int:
    """Write records atomically, one JSON object a line; returns how many were written."""
    n = 0
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    return n


def iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Stream a JSONL file written by a previous stage; a bad line is reported as file:line."""
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: invalid JSON: {err.msg}") from err


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a JSONL file written by a previous stage; a bad line is reported as file:line."""
    return list(iter_jsonl(path))


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (metrics files, manifests)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically (reports)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


# ---------------------------------------------------------------------------------------------------
# training text: a folder of Parquet shards (what `datasets` reads in parallel) or, for small sets, a JSONL file

TEXT_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string())])
# rows per row group: the unit a reader holds in memory (a few MB of typical documents, 1 GB at worst with
# clean's 1M-character cap); 1,000 is what datatrove's and datasets' Parquet writers use
ROW_GROUP_DOCS = 1000


class TextShardWriter:
    """Streams {"id", "text"} rows to `<folder>/part-00000.parquet`, `part-00001.parquet`, ...: a new shard
    every `shard_docs` rows, zstd-compressed, written a row group at a time, so no corpus is ever held in memory.

    Always leaves at least one shard, empty if need be, so that an empty split is still a readable dataset.
    Write into a folder from `atomic_path`: a half-written folder is then never seen.
    """

    def __init__(self, folder: Path, shard_docs: int):
        if shard_docs < 1:
            raise ValueError(f"shard_docs must be >= 1, got {shard_docs}")
        self.folder, self.shard_docs = Path(folder), shard_docs
        self.folder.mkdir(parents=True, exist_ok=True)
        self.rows = 0  # written so far, the buffer included
        self._shards = 0
        self._writer: pq.ParquetWriter | None = None
        self._ids: list[str] = []
        self._texts: list[str] = []

    def write(self, doc_id: str, text: str) -> None:
        if self.rows % self.shard_docs == 0:
            self._next_shard()
        self._ids.append(doc_id)
        self._texts.append(text)
        self.rows += 1
        if len(self._ids) >= ROW_GROUP_DOCS:
            self._flush()

    def _flush(self) -> None:
        if self._ids:
            assert self._writer is not None
            self._writer.write_table(pa.table([self._ids, self._texts], schema=TEXT_SCHEMA))
            self._ids, self._texts = [], []

    def _next_shard(self) -> None:
        self._flush()
        if self._writer is not None:
            self._writer.close()
        self._writer = pq.ParquetWriter(self.folder / f"part-{self._shards:05d}.parquet", TEXT_SCHEMA,
                                        compression="zstd")
        self._shards += 1

    def close(self) -> None:
        """Writes what is buffered and closes the last shard (the first one, empty, if nothing was written)."""
        if self._writer is None:
            self._next_shard()
        self._flush()
        self._writer.close()

    def __enter__(self) -> TextShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._writer is not None:
            self._writer.close()  # the folder is thrown away: release the file, write nothing more


def write_text_shards(path: Path, rows: Iterable[dict[str, Any]], shard_docs: int) -> int:
    """Write {"id", "text"} rows atomically as a folder of Parquet shards; returns how many were written."""
    with atomic_path(path) as tmp, TextShardWriter(tmp, shard_docs) as writer:
        for row in rows:
            writer.write(row["id"], row["text"])
    return writer.rows


def text_shards(path: Path) -> list[Path]:
    """The files holding a text corpus: a folder's `*.parquet` shards in name order, or a file itself."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.parquet"))
        if not files:
            raise FileNotFoundError(f"{path}: a folder with no *.parquet shards")
        return files
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found")
    return [path]


def text_parquet(shard: Path) -> pq.ParquetFile:
    """A Parquet shard of a text corpus, opened; an error naming it when it has no `text` column."""
    file = pq.ParquetFile(shard)
    if "text" not in file.schema_arrow.names:
        raise ValueError(f"{shard}: no 'text' column (columns: {', '.join(file.schema_arrow.names)})")
    return file


def file_digest(path: Path) -> bytes:
    """The sha1 of a file's bytes, read in chunks (a shard can be gigabytes). Remembered in this process while the
    file keeps its size and modification time: pretrain's resume fingerprint and its token cache key then read a
    corpus once, not twice."""
    stat = Path(path).stat()
    return _file_digest(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.cache
def _file_digest(path: str, size: int, mtime_ns: int) -> bytes:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha1").digest()


def iter_texts(path: Path, batch_size: int = ROW_GROUP_DOCS) -> Iterator[list[str]]:
    """The `text` of every document of a corpus (`text_shards`: Parquet shards or a JSONL file), in order, in
    lists of at most `batch_size`: a reader never holds more than one batch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for shard in text_shards(path):
        if shard.suffix == ".parquet":
            for record_batch in text_parquet(shard).iter_batches(batch_size=batch_size, columns=["text"]):
                if record_batch.num_rows:
                    yield record_batch.column("text").to_pylist()
            continue
        batch: list[str] = []
        for lineno, row in enumerate(iter_jsonl(shard), 1):
            if not isinstance(row.get("text"), str):
                raise ValueError(f"{shard}: document {lineno} has no 'text' string")
            batch.append(row["text"])
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch
