"""beir_source: read a retrieval task from a folder in the BEIR layout, the one retrieval users already have
(every BEIR dataset, and what `beir`'s GenericDataLoader reads):

    corpus.jsonl      one document a line: {"_id", "title" (optional), "text"}; the whole search space
    queries.jsonl     one query a line: {"_id", "text"}
    qrels/train.tsv   one judgement a line: query-id <TAB> corpus-id <TAB> integer score, BEIR's header line
    qrels/dev.tsv       `query-id  corpus-id  score` optional; dev.tsv itself is optional
    qrels/test.tsv

`read_beir` returns the corpus as `{"id", "title", "text"}` in file order and the splits as lists of queries
`{"id", "text", "qrels": {doc_id: score}}`, each split in queries.jsonl order. Choices:

- Ids are strings: a JSON number id becomes its decimal string, so `"_id": 12` matches `12` in a qrels file.
- Scores are kept as given, graded and zero alike (nDCG uses the grades); but a query needs at least one score
  above 0 in its split, since a query without a relevant document cannot be scored.
- A query judged in two split files is an error: it would leak between them.
- Queries judged in no split are skipped and counted (msmarco's queries.jsonl holds many of those); corpus
  documents are all kept, judged or not: the unjudged ones are the distractors a retriever must rank below.
- Without qrels/dev.tsv (scifact, nfcorpus... have train and test only) a seeded `dev_fraction` of the
  train queries becomes dev. Train is required: fine-tuning needs train judgements.
- Every other problem is a ValueError naming the file, the line and the id. The files are read line by line;
  besides the returned records only the id sets survive, and the first line of a repeated id is found by
  reading the file again, on that error only (a corpus can hold millions of documents).

Not `beir`'s own loader: it checks nothing (a typo'd id or a query in two splits passes silently) and pulls
in sentence-transformers. UTF-8 and JSON errors are reported as file_source reports them.
"""

from __future__ import annotations

import random
from collections.abc import Container
from pathlib import Path

from dapt.common import log
from dapt.sources.file_source import _decoded_lines, _field, _jsonl_records, text_of

CORPUS_FILE = "corpus.jsonl"
QUERIES_FILE = "queries.jsonl"
SPLITS = ("train", "dev", "test")
REQUIRED = {  # file -> why it cannot be missing
    CORPUS_FILE: "the documents to search",
    QUERIES_FILE: "the query texts",
    "qrels/train.tsv": "fine-tuning needs train judgements",
    "qrels/test.tsv": "the test judgements the model is scored on",
}
QRELS_HEADER = ["query-id", "corpus-id", "score"]  # BEIR's; accepted on line 1, not required


def _qrels_file(split: str) -> str:
    return f"qrels/{split}.tsv"


def _id_of(record: dict, where: str) -> str:
    """A record's `_id` as a string; an error when it is missing, empty or not a string or an integer."""
    value = _field(record, "_id", where)
    # bool is an int to Python, and a float id (1.0) has no single spelling that a qrels file would use
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"{where}: '_id' is a {type(value).__name__}, expected a string or an integer")
    if not str(value).strip():
        raise ValueError(f"{where}: '_id' is empty")
    return str(value)


def _line_of(path: Path, record_id: str) -> int:
    """The first line of `path` with `_id` `record_id`; read again only to report a duplicate."""
    return next(n for n, record in _jsonl_records(path) if _id_of(record, f"{path}:{n}") == record_id)


def _duplicate(path: Path, n: int, record_id: str) -> ValueError:
    return ValueError(f"{path}:{n}: duplicate _id {record_id!r}, first on line {_line_of(path, record_id)}")


def _title_of(record: dict, where: str) -> str:
    title = record.get("title")  # optional in BEIR; null or absent both mean no title
    if title is None:
        return ""
    if not isinstance(title, str):
        raise ValueError(f"{where}: title is a {type(title).__name__}, not a string")
    return title


def read_corpus(path: Path) -> tuple[list[dict], set[str]]:
    """`{"id", "title", "text"}` for every line of a BEIR corpus.jsonl, in file order, and the set of ids."""
    docs: list[dict] = []
    ids: set[str] = set()
    for n, record in _jsonl_records(path):
        doc_id = _id_of(record, f"{path}:{n}")
        if doc_id in ids:
            raise _duplicate(path, n, doc_id)
        ids.add(doc_id)
        where = f"{path}:{n}: _id {doc_id!r}"
        docs.append({"id": doc_id, "title": _title_of(record, where), "text": text_of(record, "text", where)})
    if not docs:
        raise ValueError(f"{path}: no documents")
    return docs, ids


def read_queries(path: Path) -> dict[str, str]:
    """Query id -> text for every line of a BEIR queries.jsonl, in file order."""
    queries: dict[str, str] = {}
    for n, record in _jsonl_records(path):
        query_id = _id_of(record, f"{path}:{n}")
        if query_id in queries:
            raise _duplicate(path, n, query_id)
        queries[query_id] = text_of(record, "text", f"{path}:{n}: _id {query_id!r}")
    if not queries:
        raise ValueError(f"{path}: no queries")
    return queries


def read_qrels(path: Path, query_ids: Container[str],
               doc_ids: Container[str]) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """Judgements of one BEIR qrels file: query id -> {doc id: score} in file order, and the line of each
    query's first judgement. Every id must be in `query_ids` / `doc_ids`."""
    qrels: dict[str, dict[str, int]] = {}
    first_line: dict[str, int] = {}
    for n, line in _decoded_lines(path):
        if not line.strip():
            continue  # a trailing blank line carries no judgement
        columns = [c.strip() for c in line.split("\t")]
        if n == 1 and columns == QRELS_HEADER:
            continue
        where = f"{path}:{n}"
        if len(columns) != 3:
            raise ValueError(f"{where}: expected 3 tab-separated columns (query-id, corpus-id, score), "
                             f"got {len(columns)}: {line!r}")
        query_id, doc_id, score_text = columns
        try:
            score = int(score_text)
        except ValueError:
            raise ValueError(f"{where}: query {query_id!r}: score {score_text!r} is not an integer") from None
        if query_id not in query_ids:
            raise ValueError(f"{where}: unknown query id {query_id!r} (not in {QUERIES_FILE})")
        if doc_id not in doc_ids:
            raise ValueError(f"{where}: query {query_id!r}: unknown corpus id {doc_id!r} (not in {CORPUS_FILE})")
        judged = qrels.setdefault(query_id, {})
        if judged.get(doc_id, score) != score:
            raise ValueError(f"{where}: query {query_id!r} judges {doc_id!r} {score}; an earlier line judged it "
                             f"{judged[doc_id]}")
        judged[doc_id] = score
        first_line.setdefault(query_id, n)
    return qrels, first_line


def carve_dev(train: dict[str, dict[str, int]], dev_fraction: float,
              seed: int) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]]]:
    """(train, dev): a seeded `dev_fraction` of the train queries (at least one) moved to dev.

    The draw is from the sorted ids, so it depends on the seed and the set of queries, not on file order.
    """
    ids = sorted(train)
    n_dev = max(1, round(dev_fraction * len(ids)))
    if n_dev >= len(ids):
        raise ValueError(f"cannot hold out {n_dev} dev queries from {len(ids)} train queries; add a "
                         f"{_qrels_file('dev')} or more train queries")
    dev = set(random.Random(seed).sample(ids, n_dev))
    return ({q: j for q, j in train.items() if q not in dev}, {q: j for q, j in train.items() if q in dev})


def _check_files(folder: Path) -> None:
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder; a BEIR folder holds {', '.join(REQUIRED)}")
    for name, why in REQUIRED.items():
        if not (folder / name).is_file():
            raise ValueError(f"{folder / name}: missing ({why}); a BEIR folder holds {', '.join(REQUIRED)} "
                             f"and optionally {_qrels_file('dev')}")


def read_beir(folder: Path, dev_fraction: float = 0.1, seed: int = 0) -> tuple[list[dict], dict[str, list[dict]]]:
    """(corpus, splits) from a BEIR folder: `{"id", "title", "text"}` documents and, for train/dev/test,
    `{"id", "text", "qrels"}` queries in queries.jsonl order. Without qrels/dev.tsv, `dev_fraction` of the
    train queries (a draw seeded by `seed`) become dev."""
    folder = Path(folder)
    if not 0 < dev_fraction < 1:
        raise ValueError(f"dev_fraction={dev_fraction} must be in (0, 1)")
    _check_files(folder)  # before reading a corpus that may take minutes
    corpus, doc_ids = read_corpus(folder / CORPUS_FILE)
    queries = read_queries(folder / QUERIES_FILE)

    judged: dict[str, dict[str, dict[str, int]]] = {}
    file_of: dict[str, Path] = {}  # query id -> the qrels file that judges it
    for split in SPLITS:
        path = folder / _qrels_file(split)
        if split == "dev" and not path.exists():
            continue
        qrels, first_line = read_qrels(path, queries, doc_ids)
        if not qrels:
            why = REQUIRED.get(_qrels_file(split), "remove the file to hold out dev queries from train instead")
            raise ValueError(f"{path}: no judgements ({why})")
        for query_id, judgements in qrels.items():
            where = f"{path}:{first_line[query_id]}: query {query_id!r}"
            if query_id in file_of:
                raise ValueError(f"{where} is also judged in {file_of[query_id]}; a query in two splits leaks "
                                 "between them")
            if max(judgements.values()) <= 0:
                raise ValueError(f"{where} has no judgement above 0, so no relevant document to score it by")
            file_of[query_id] = path
        judged[split] = qrels
    if "dev" not in judged:
        judged["train"], judged["dev"] = carve_dev(judged["train"], dev_fraction, seed)
        log.info("%s: no %s; %d of %d train queries held out as dev (dev_fraction=%s, seed=%d)", folder,
                 _qrels_file("dev"), len(judged["dev"]), len(judged["train"]) + len(judged["dev"]), dev_fraction,
                 seed)

    split_of = {q: split for split in SPLITS for q in judged[split]}
    splits: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for query_id, text in queries.items():
        if query_id in split_of:
            split = split_of[query_id]
            splits[split].append({"id": query_id, "text": text, "qrels": judged[split][query_id]})
    if len(split_of) < len(queries):
        log.info("%s: %d of %d queries are judged in no split; skipped", folder / QUERIES_FILE,
                 len(queries) - len(split_of), len(queries))
    return corpus, splits
