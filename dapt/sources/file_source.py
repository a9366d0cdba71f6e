"""file_source: read the user's own documents and labelled examples from .txt/.jsonl/.csv/.parquet files, and
tagged sentences (token classification, e.g. NER) from CoNLL (.conll, .bio) or .jsonl files.

`path` is a file or a directory; a directory contributes every supported file under it (recursively, in
sorted order; other files are ignored). Each document gets an `id` of `<file>:<n>`, where `<file>` is the
path relative to the directory given (the bare name for a file) and `<n>` the 1-based line (.txt, .jsonl)
or data row (.csv, .parquet; the header is not a row).

Empty or whitespace-only texts are skipped in every format (a blank .txt line, an empty cell); every other
problem is an error that names the file and, where there is one, the line, row or column. Tagged sentences
are never skipped: an empty one is an error.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pandas as pd
import pyarrow

from dapt.common import log

SUPPORTED = (".txt", ".jsonl", ".csv", ".parquet")
TABULAR = (".jsonl", ".csv", ".parquet")  # formats with named columns, the only ones that can carry labels
LINE_BASED = (".txt", ".jsonl")  # a record is a line, so errors and ids give line numbers; else data rows
CONLL = (".conll", ".bio")  # one token a line, its tag in the last column, a blank line between sentences
TAGGED = CONLL + (".jsonl",)  # formats that carry one tag per token
_MISSING = object()  # a field absent from a record, told apart from an explicit null


def _decoded_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its line end) for a UTF-8 file; a BOM on line 1 is dropped."""
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                # utf-8-sig on line 1: spreadsheet tools start CSV files with a BOM, which would otherwise
                # end up inside the first column's name
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{n}: invalid UTF-8 at byte {e.start} of the line") from e
            yield n, line.rstrip("\r\n")


def _txt_records(path: Path, column: str) -> Iterator[tuple[int, dict]]:
    for n, line in _decoded_lines(path):
        yield n, {column: line}


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict]]:
    for n, line in _decoded_lines(path):
        if not line.strip():
            continue  # a trailing blank line is common and carries no record
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: invalid JSON: {e}") from e
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(record).__name__}")
        yield n, record


def _frame_records(path: Path, frame: pd.DataFrame, columns: list[str]) -> Iterator[tuple[int, dict]]:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: no column {missing[0]!r}; columns: {[str(c) for c in frame.columns]}")
    for n, values in enumerate(frame[columns].itertuples(index=False, name=None), 1):
        yield n, {c: (None if _is_null(v) else v) for c, v in zip(columns, values)}


def _is_null(value: object) -> bool:
    """pandas' missing markers (None, NaN, NA, NaT); arrays and other containers are not missing."""
    return pd.api.types.is_scalar(value) and bool(pd.isna(value))


def _csv_records(path: Path, columns: list[str]) -> Iterator[tuple[int, dict]]:
    # decoded here, not by pandas, so invalid UTF-8 is reported with its line number
    text = "\n".join(line for _, line in _decoded_lines(path))
    try:
        # every cell as a string, empty cells as "": a label "01" stays "01" and a number is never a float
        frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise ValueError(f"{path}: invalid CSV: {e}") from e
    yield from _frame_records(path, frame, columns)


def _parquet_records(path: Path, columns: list[str]) -> Iterator[tuple[int, dict]]:
    try:
        frame = pd.read_parquet(path)
    except (pyarrow.ArrowException, OSError) as e:
        raise ValueError(f"{path}: cannot read as Parquet: {e}") from e
    yield from _frame_records(path, frame, columns)


def _records(path: Path, columns: list[str]) -> Iterator[tuple[int, dict]]:
    """(1-based line or row, record) for each record of one file; `columns[0]` is the text column."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _txt_records(path, columns[0])
    if suffix == ".jsonl":
        return _jsonl_records(path)
    if suffix == ".csv":
        return _csv_records(path, columns)
    if suffix == ".parquet":
        return _parquet_records(path, columns)
    raise ValueError(f"{path}: unsupported file type {path.suffix!r}; supported: {', '.join(SUPPORTED)}")


def input_files(path: Path, suffixes: tuple[str, ...] = SUPPORTED) -> list[Path]:
    """The file itself, or every file with one of `suffixes` under a directory, sorted."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_file():
        return [path]
    # not `is_file()` alone: a broken link must fail loudly below, not vanish from the corpus
    files = sorted(p for p in path.rglob("*") if (p.is_file() or p.is_symlink()) and p.suffix.lower() in suffixes)
    if not files:
        raise ValueError(f"{path}: directory has no {', '.join(suffixes)} files")
    return files


def _field(record: dict, key: str, where: str) -> object:
    """A record's value for `key`; an error naming the keys present when it is absent."""
    value = record.get(key, _MISSING)
    if value is _MISSING:
        raise ValueError(f"{where}: no field {key!r}; fields: {sorted(record)}")
    return value


def text_of(record: dict, column: str, where: str) -> str:
    """A record's text; an error naming `where` when it is absent or not a string."""
    value = _field(record, column, where)
    if not isinstance(value, str):
        shown = "missing (null)" if value is None else f"a {type(value).__name__}, not a string"
        raise ValueError(f"{where}: text {column!r} is {shown}")
    return value


def label_of(record: dict, column: str, where: str) -> str:
    """A record's label as a string (a class name); an error naming `where` when it is missing or not a scalar."""
    value = _field(record, column, where)
    # JSON/Parquet labels may be numbers or booleans; the task treats every label as a class name
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"{where}: label {column!r} is missing")
    if not pd.api.types.is_scalar(value):
        raise ValueError(f"{where}: label {column!r} is a {type(value).__name__}, expected a string or number")
    return str(value)


def _gather(path: Path, files: list[Path], rows: Callable[[Path, str], Iterable[dict]], what: str,
            none: str) -> list[dict]:
    """The rows of every file, `rows(file, name)` naming each by its path under `path`. An unreadable file fails
    naming it, an empty one is skipped with a warning, and no rows at all is an error (`none` says why)."""
    root = path if path.is_dir() else path.parent
    out: list[dict] = []
    for file in files:
        before = len(out)
        try:
            out.extend(rows(file, file.relative_to(root).as_posix()))
        except OSError as e:  # unreadable: permissions, a broken link, an I/O error
            raise ValueError(f"{file}: cannot read: {e.strerror or e}") from e
        if len(out) == before:
            log.warning("%s: no %s (empty file); skipped", file, what)
    if not out:
        raise ValueError(f"{path}: no {what} ({none})")
    return out


def _read(path: Path, text_column: str, label_column: str | None) -> list[dict]:
    """Records of every file under `path` as `{"id", "text"}` (plus `"label"` when label_column is given)."""
    columns = [text_column] + ([label_column] if label_column else [])

    def docs(file: Path, name: str) -> Iterator[dict]:
        if label_column and file.suffix.lower() not in TABULAR:
            raise ValueError(f"{file}: labelled examples need named columns; use one of {', '.join(TABULAR)}")
        line_based = file.suffix.lower() in LINE_BASED
        for n, record in _records(file, columns):
            where = f"{file}:{n}" if line_based else f"{file} row {n}"
            text = text_of(record, text_column, where)
            if not text.strip():
                continue
            doc = {"id": f"{name}:{n}", "text": text.strip()}
            if label_column:
                doc["label"] = label_of(record, label_column, where)
            yield doc

    return _gather(path, input_files(path), docs, "documents", "every text was empty")


def read_documents(path: Path, text_column: str = "text") -> list[dict]:
    """`{"id", "text"}` for every document in a file or directory (`text_column` is ignored for .txt)."""
    return _read(Path(path), text_column, None)


def read_labelled(path: Path, text_column: str, label_column: str) -> list[dict]:
    """`{"id", "text", "label"}` for every example in a .jsonl/.csv/.parquet file or directory.

    Labels are returned as strings (`1` and `"1"` are the same class).
    """
    return _read(Path(path), text_column, label_column)


# ---------------------------------------------------------------------------------------------------
# tagged sentences: one tag per token


def _conll_sentences(path: Path) -> Iterator[tuple[int, dict]]:
    """(line of the first token, {"tokens", "tags"}) per sentence: token in the first column, tag in the last
    (CoNLL-2003 puts POS and chunk tags in between), a blank line between sentences."""
    start, tokens, tags = 0, [], []
    for n, line in _decoded_lines(path):
        columns = line.split()
        if not columns or columns[0] == "-DOCSTART-":  # a document marker ends a sentence like a blank line
            if tokens:
                yield start, {"tokens": tokens, "tags": tags}
            start, tokens, tags = 0, [], []
            continue
        if len(columns) < 2:
            raise ValueError(f"{path}:{n}: expected a token and its tag separated by whitespace, got {line!r}")
        start = start or n
        tokens.append(columns[0])
        tags.append(columns[-1])
    if tokens:
        yield start, {"tokens": tokens, "tags": tags}


def strings_of(record: dict, column: str, what: str, where: str) -> list[str]:
    """A record's list of non-empty strings in `column` (tokens or tags); an error naming the offending item."""
    value = _field(record, column, where)
    if not isinstance(value, list):
        shown = "missing (null)" if value is None else f"a {type(value).__name__}, not a list"
        raise ValueError(f"{where}: {what} {column!r} is {shown}")
    if not value:
        raise ValueError(f"{where}: {what} {column!r} is empty")
    for i, item in enumerate(value, 1):
        if not isinstance(item, str):
            # integer tags (class ids, as in the Hub's conll2003) have lost their names: the task needs them
            raise ValueError(f"{where}: {what} {column!r} item {i} is a {type(item).__name__}, not a string")
        if not item.strip():
            raise ValueError(f"{where}: {what} {column!r} item {i} is empty")
    return value


def _jsonl_sentences(path: Path, tokens_column: str, tags_column: str) -> Iterator[tuple[int, dict]]:
    for n, record in _jsonl_records(path):
        where = f"{path}:{n}"
        tokens = strings_of(record, tokens_column, "tokens", where)
        tags = strings_of(record, tags_column, "tags", where)
        if len(tokens) != len(tags):
            raise ValueError(f"{where}: {len(tokens)} tokens but {len(tags)} tags; need one tag per token")
        yield n, {"tokens": tokens, "tags": tags}


def read_tagged(path: Path, tokens_column: str = "tokens", tags_column: str = "tags") -> list[dict]:
    """`{"id", "tokens", "tags", "text"}` for every sentence in a CoNLL (.conll, .bio) or .jsonl file or directory.

    CoNLL: one token a line, whitespace-separated columns, the token first and its tag last, a blank line
    between sentences, `-DOCSTART-` lines skipped. JSONL: one sentence a line, a list of tokens and a list of
    tags of the same length (`tokens_column`, `tags_column`). `text` is the tokens joined by spaces: what
    `clean` decontaminates the domain corpus against. The id's line is the sentence's first line.
    """
    path = Path(path)

    def sentences(file: Path, name: str) -> Iterator[dict]:
        suffix = file.suffix.lower()
        if suffix not in TAGGED:
            raise ValueError(f"{file}: unsupported file type {file.suffix!r} for tagged sentences; "
                             f"supported: {', '.join(TAGGED)}")
        records = _conll_sentences(file) if suffix in CONLL else _jsonl_sentences(file, tokens_column, tags_column)
        for n, rec in records:
            yield {"id": f"{name}:{n}", **rec, "text": " ".join(rec["tokens"])}

    return _gather(path, input_files(path, TAGGED), sentences, "sentences", "every file was empty")
