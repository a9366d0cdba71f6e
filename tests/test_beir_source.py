"""Unit tests for dapt/sources/beir_source.py: a tiny BEIR folder per case, written in tmp_path."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from dapt.sources import beir_source as bs

HEADER = "query-id\tcorpus-id\tscore\n"
CORPUS = [
    {"_id": "d1", "title": "MIT", "text": "Permission is hereby granted."},
    {"_id": 2, "text": "Redistribution and use in source and binary forms."},  # number id, no title
    {"_id": "d3", "title": None, "text": "GNU General Public License."},
]
QUERIES = [
    {"_id": "q1", "text": "mit licence"},
    {"_id": 7, "text": "bsd"},
    {"_id": "q3", "text": "gpl"},
    {"_id": "q4", "text": "judged nowhere"},
]


def jsonl(records: list) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


def make(folder: Path, corpus: list = CORPUS, queries: list = QUERIES, header: bool = True,
         **qrels: str | None) -> Path:
    """A BEIR folder; `qrels` maps split -> rows (header added when `header`), None to leave the file out."""
    qrels = {"train": "q1\td1\t1\nq1\t2\t0\n", "dev": "7\t2\t2\n", "test": "q3\td3\t1\n"} | qrels
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text(jsonl(corpus), encoding="utf-8")
    (folder / "queries.jsonl").write_text(jsonl(queries), encoding="utf-8")
    for split, rows in qrels.items():
        if rows is not None:
            (folder / "qrels" / f"{split}.tsv").write_text((HEADER if header else "") + rows, encoding="utf-8")
    return folder


def fails(folder: Path, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        bs.read_beir(folder)


# ---------------------------------------------------------------------------------------------------
# a good folder


@pytest.mark.parametrize("header", [True, False])
def test_good_folder_round_trips(tmp_path: Path, header: bool) -> None:
    corpus, splits = bs.read_beir(make(tmp_path, header=header))
    assert corpus == [
        {"id": "d1", "title": "MIT", "text": "Permission is hereby granted."},
        {"id": "2", "title": "", "text": "Redistribution and use in source and binary forms."},
        {"id": "d3", "title": "", "text": "GNU General Public License."},
    ]
    assert splits == {
        "train": [{"id": "q1", "text": "mit licence", "qrels": {"d1": 1, "2": 0}}],  # zeros kept
        "dev": [{"id": "7", "text": "bsd", "qrels": {"2": 2}}],  # graded scores kept
        "test": [{"id": "q3", "text": "gpl", "qrels": {"d3": 1}}],
    }


def test_queries_keep_queries_file_order_and_blank_lines_are_skipped(tmp_path: Path) -> None:
    queries = [{"_id": f"q{i}", "text": f"query {i}"} for i in (4, 0, 3, 1, 2)]
    folder = make(tmp_path, queries=queries, train="q3\td1\t1\n\nq0\td1\t1\nq4\td3\t1\n\n", dev="q1\td1\t1\n",
                  test="q2\td3\t1\n")
    _, splits = bs.read_beir(folder)
    assert [q["id"] for q in splits["train"]] == ["q4", "q0", "q3"]


def test_unjudged_queries_are_skipped_and_logged(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="dapt"):
        _, splits = bs.read_beir(make(tmp_path))
    assert "q4" not in {q["id"] for s in splits.values() for q in s}
    assert [r.getMessage() for r in caplog.records if "judged in no split" in r.getMessage()] == [
        f"{tmp_path / 'queries.jsonl'}: 1 of 4 queries are judged in no split; skipped"]


# ---------------------------------------------------------------------------------------------------
# dev carved from train


def carve_folder(folder: Path, n: int = 20) -> Path:
    queries = [{"_id": f"q{i:02d}", "text": f"query {i}"} for i in range(n + 1)]
    train = "".join(f"q{i:02d}\td1\t1\n" for i in range(n))
    return make(folder, queries=queries, train=train, dev=None, test=f"q{n:02d}\td3\t1\n")


def test_missing_dev_is_carved_from_train_deterministically(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="dapt"):
        _, splits = bs.read_beir(carve_folder(tmp_path / "a"), dev_fraction=0.2, seed=1)
    train, dev = ([q["id"] for q in splits[s]] for s in ("train", "dev"))
    assert len(dev) == 4 and len(train) == 16 and not set(dev) & set(train)
    assert dev == sorted(dev) and train == sorted(train)  # queries.jsonl order kept
    assert "no qrels/dev.tsv; 4 of 20 train queries held out as dev (dev_fraction=0.2, seed=1)" in caplog.text
    # the same draw for the same seed whatever the order of the train qrels; another draw for another seed
    folder = carve_folder(tmp_path / "b")
    rows = (folder / "qrels" / "train.tsv").read_text().splitlines()
    (folder / "qrels" / "train.tsv").write_text("\n".join([rows[0]] + rows[:0:-1]) + "\n")
    assert bs.read_beir(folder, dev_fraction=0.2, seed=1)[1]["dev"] == splits["dev"]
    assert bs.read_beir(folder, dev_fraction=0.2, seed=2)[1]["dev"] != splits["dev"]


def test_carved_dev_has_at_least_one_query_and_train_keeps_one(tmp_path: Path) -> None:
    _, splits = bs.read_beir(carve_folder(tmp_path / "a", n=3), dev_fraction=0.01)
    assert (len(splits["train"]), len(splits["dev"])) == (2, 1)
    with pytest.raises(ValueError, match="cannot hold out 1 dev queries from 1 train queries"):
        bs.read_beir(carve_folder(tmp_path / "b", n=1))


# ---------------------------------------------------------------------------------------------------
# errors name the file and the line


@pytest.mark.parametrize("name, why", [
    ("corpus.jsonl", "the documents to search"),
    ("queries.jsonl", "the query texts"),
    ("qrels/train.tsv", "fine-tuning needs train judgements"),
    ("qrels/test.tsv", "the test judgements"),
])
def test_missing_required_file(tmp_path: Path, name: str, why: str) -> None:
    (make(tmp_path) / name).unlink()
    fails(tmp_path, f"{re.escape(str(tmp_path / name))}: missing \\({why}")


@pytest.mark.parametrize("line, message", [
    ('{"_id": "d9", "text": "x"', r"corpus.jsonl:2: invalid JSON"),
    ('{"title": "t", "text": "x"}', r"corpus.jsonl:2: no field '_id'"),
    ('{"_id": "", "text": "x"}', r"corpus.jsonl:2: '_id' is empty"),
    ('{"_id": 1.5, "text": "x"}', r"corpus.jsonl:2: '_id' is a float"),
    ('{"_id": "d9", "title": "t"}', r"corpus.jsonl:2: _id 'd9': no field 'text'"),
    ('{"_id": "d9", "text": 5}', r"corpus.jsonl:2: _id 'd9': text 'text' is a int, not a string"),
    ('{"_id": "d9", "text": null}', r"corpus.jsonl:2: _id 'd9': text 'text' is missing \(null\)"),
    ('{"_id": "d9", "title": 3, "text": "x"}', r"corpus.jsonl:2: _id 'd9': title is a int"),
    ('{"_id": "d1", "text": "again"}', r"corpus.jsonl:2: duplicate _id 'd1', first on line 1"),
])
def test_bad_corpus_line(tmp_path: Path, line: str, message: str) -> None:
    fails(make(tmp_path, corpus=[CORPUS[0], line] + CORPUS[1:]), message)


@pytest.mark.parametrize("line, message", [
    ("not json", r"queries.jsonl:3: invalid JSON"),
    ('{"text": "x"}', r"queries.jsonl:3: no field '_id'"),
    ('{"_id": "  ", "text": "x"}', r"queries.jsonl:3: '_id' is empty"),
    ('{"_id": "q9"}', r"queries.jsonl:3: _id 'q9': no field 'text'"),
    ('{"_id": "q9", "text": ["a"]}', r"queries.jsonl:3: _id 'q9': text 'text' is a list, not a string"),
    ('{"_id": "7", "text": "again"}', r"queries.jsonl:3: duplicate _id '7', first on line 2"),  # 7 == "7"
])
def test_bad_queries_line(tmp_path: Path, line: str, message: str) -> None:
    fails(make(tmp_path, queries=QUERIES[:2] + [line] + QUERIES[2:]), message)


def test_invalid_utf8_names_the_line(tmp_path: Path) -> None:
    folder = make(tmp_path)
    (folder / "queries.jsonl").write_bytes(b'{"_id": "q1", "text": "a"}\n{"_id": "q2", "text": "\xff"}\n')
    fails(folder, r"queries.jsonl:2: invalid UTF-8")


@pytest.mark.parametrize("rows, message", [
    ("q1\td1\n", r"train.tsv:3: expected 3 tab-separated columns .* got 2"),
    ("q1\td1\t1\t0\n", r"train.tsv:3: expected 3 tab-separated columns .* got 4"),
    ("q1 d1 1\n", r"train.tsv:3: expected 3 tab-separated columns .* got 1"),
    ("q1\td3\t1.0\n", r"train.tsv:3: query 'q1': score '1.0' is not an integer"),
    ("q1\td3\thigh\n", r"train.tsv:3: query 'q1': score 'high' is not an integer"),
    ("q9\td1\t1\n", r"train.tsv:3: unknown query id 'q9' \(not in queries.jsonl\)"),
    ("q1\td9\t1\n", r"train.tsv:3: query 'q1': unknown corpus id 'd9' \(not in corpus.jsonl\)"),
    ("q1\td1\t2\n", r"train.tsv:3: query 'q1' judges 'd1' 2; an earlier line judged it 1"),
])
def test_bad_qrels_row(tmp_path: Path, rows: str, message: str) -> None:
    fails(make(tmp_path, train="q1\td1\t1\n" + rows), message)


def test_a_repeated_identical_judgement_is_accepted(tmp_path: Path) -> None:
    _, splits = bs.read_beir(make(tmp_path, train="q1\td1\t1\nq1\td1\t1\n"))
    assert splits["train"][0]["qrels"] == {"d1": 1}


def test_a_header_is_only_accepted_on_line_1(tmp_path: Path) -> None:
    fails(make(tmp_path, train="q1\td1\t1\n" + HEADER), r"train.tsv:3: query 'query-id': score 'score'")


def test_query_in_two_splits_names_both_files(tmp_path: Path) -> None:
    folder = make(tmp_path, test="q3\td3\t1\n7\td1\t1\n")
    fails(folder, f"{re.escape(str(folder / 'qrels' / 'test.tsv'))}:3: query '7' is also judged in "
                  f"{re.escape(str(folder / 'qrels' / 'dev.tsv'))}")


def test_query_without_a_relevant_document_names_its_first_judgement(tmp_path: Path) -> None:
    fails(make(tmp_path, test="q3\td3\t1\nq4\td1\t0\nq4\td3\t0\n"), r"test.tsv:3: query 'q4' has no judgement above 0")
    fails(make(tmp_path / "b", train="q1\td1\t-1\n"), r"train.tsv:2: query 'q1' has no judgement above 0")


def test_qrels_without_judgements(tmp_path: Path) -> None:
    fails(make(tmp_path, train=""), r"train.tsv: no judgements \(fine-tuning needs train judgements\)")
    fails(make(tmp_path / "b", dev="\n"), r"dev.tsv: no judgements \(remove the file")


def test_empty_corpus_or_queries(tmp_path: Path) -> None:
    fails(make(tmp_path, corpus=[]), r"corpus.jsonl: no documents")
    fails(make(tmp_path / "b", queries=[]), r"queries.jsonl: no queries")


def test_bad_folder_and_fraction(tmp_path: Path) -> None:
    fails(tmp_path / "nowhere", "nowhere: not a folder")
    with pytest.raises(ValueError, match="dev_fraction=1.0 must be in"):
        bs.read_beir(make(tmp_path), dev_fraction=1.0)
