"""Unit tests for dapt/sources/file_source.py: one tiny file per case, written in tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from dapt.sources import file_source as fs


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def jsonl(*records: object) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


# ---------------------------------------------------------------------------------------------------
# formats


def test_txt_one_document_per_non_empty_line(tmp_path: Path) -> None:
    path = write(tmp_path / "a.txt", "\ufefffirst doc\n\n   \n  second doc  \r\nthird")
    assert fs.read_documents(path) == [
        {"id": "a.txt:1", "text": "first doc"},
        {"id": "a.txt:4", "text": "second doc"},
        {"id": "a.txt:5", "text": "third"},
    ]


def test_jsonl_reads_the_named_column_and_skips_empty_texts(tmp_path: Path) -> None:
    lines = jsonl({"body": "one", "x": 1}, {"body": "  "}) + "\n" + jsonl({"body": "two"})  # line 3 is blank
    path = write(tmp_path / "d.jsonl", lines)
    assert fs.read_documents(path, text_column="body") == [
        {"id": "d.jsonl:1", "text": "one"},
        {"id": "d.jsonl:4", "text": "two"},
    ]


def test_csv_rows_with_quoted_newlines_and_string_labels(tmp_path: Path) -> None:
    path = write(tmp_path / "t.csv", 'text,label\n"multi\nline",01\nplain,2\n,3\n')
    assert fs.read_labelled(path, "text", "label") == [
        {"id": "t.csv:1", "text": "multi\nline", "label": "01"},
        {"id": "t.csv:2", "text": "plain", "label": "2"},
    ]


def test_parquet_labels_become_strings(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    pd.DataFrame({"sentence": ["good", "bad"], "y": [1, 0]}).to_parquet(path)
    assert fs.read_labelled(path, "sentence", "y") == [
        {"id": "t.parquet:1", "text": "good", "label": "1"},
        {"id": "t.parquet:2", "text": "bad", "label": "0"},
    ]


def test_directory_reads_supported_files_recursively_in_order(tmp_path: Path) -> None:
    write(tmp_path / "b.txt", "from b\n")
    write(tmp_path / "a" / "z.jsonl", jsonl({"text": "from a/z"}))
    write(tmp_path / "README.md", "not a document\n")
    assert [d["id"] for d in fs.read_documents(tmp_path)] == ["a/z.jsonl:1", "b.txt:1"]


def test_jsonl_labels_of_any_scalar_type_become_strings(tmp_path: Path) -> None:
    path = write(tmp_path / "l.jsonl", jsonl({"text": "a", "label": 3}, {"text": "b", "label": True}))
    assert [d["label"] for d in fs.read_labelled(path, "text", "label")] == ["3", "True"]


# ---------------------------------------------------------------------------------------------------
# errors name the file and the place


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.jsonl: no such file"):
        fs.read_documents(tmp_path / "nope.jsonl")


def test_unsupported_suffix_lists_supported_ones(tmp_path: Path) -> None:
    path = write(tmp_path / "data.json", "[]")
    supported = r"supported: \.txt, \.jsonl, \.csv, \.parquet"
    with pytest.raises(ValueError, match=rf"data.json: unsupported file type '\.json'; {supported}"):
        fs.read_documents(path)


def test_directory_without_supported_files(tmp_path: Path) -> None:
    write(tmp_path / "notes.md", "hi")
    with pytest.raises(ValueError, match=f"{tmp_path}: directory has no .txt"):
        fs.read_documents(tmp_path)


@pytest.mark.parametrize("name, content", [
    ("a.txt", b"ok\nok\nbad \xff byte\n"),
    ("a.jsonl", b'{"text": "ok"}\n{"text": "ok"}\n{"text": "bad \xff byte"}\n'),
    ("a.csv", b"text\nok\nbad \xff byte\n"),
])
def test_invalid_utf8_names_file_and_line(tmp_path: Path, name: str, content: bytes) -> None:
    path = write(tmp_path / name, content)
    with pytest.raises(ValueError, match=f"{name}:3: invalid UTF-8"):
        fs.read_documents(path)


def test_invalid_json_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", jsonl({"text": "ok"}) + '{"text": "unclosed\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: invalid JSON"):
        fs.read_documents(path)


def test_json_line_that_is_not_an_object(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", '["a list"]\n')
    with pytest.raises(ValueError, match=r"d.jsonl:1: expected a JSON object, got list"):
        fs.read_documents(path)


def test_missing_key_in_jsonl_names_line_and_keys(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", jsonl({"text": "ok"}, {"body": "x", "id": 2}))
    with pytest.raises(ValueError, match=r"d.jsonl:2: no field 'text'; fields: \['body', 'id'\]"):
        fs.read_documents(path)


def test_missing_csv_column_names_the_columns_there(tmp_path: Path) -> None:
    path = write(tmp_path / "t.csv", "sentence,label\nhello,1\n")
    with pytest.raises(ValueError, match=r"t.csv: no column 'text'; columns: \['sentence', 'label'\]"):
        fs.read_labelled(path, "text", "label")


def test_missing_parquet_label_column(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    pd.DataFrame({"text": ["a"]}).to_parquet(path)
    with pytest.raises(ValueError, match=r"t.parquet: no column 'label'; columns: \['text'\]"):
        fs.read_labelled(path, "text", "label")


def test_non_string_text_in_jsonl(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", jsonl({"text": "ok"}, {"text": 42}, {"text": None}))
    with pytest.raises(ValueError, match=r"d.jsonl:2: text 'text' is a int, not a string"):
        fs.read_documents(path)


def test_null_text_in_parquet_names_the_row(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    pd.DataFrame({"text": ["a", None]}).to_parquet(path)
    with pytest.raises(ValueError, match=r"t.parquet row 2: text 'text' is missing"):
        fs.read_documents(path)


def test_missing_label_names_the_row(tmp_path: Path) -> None:
    path = write(tmp_path / "t.csv", "text,label\na,x\nb,\n")
    with pytest.raises(ValueError, match=r"t.csv row 2: label 'label' is missing"):
        fs.read_labelled(path, "text", "label")


def test_labelled_examples_need_a_tabular_format(tmp_path: Path) -> None:
    path = write(tmp_path / "a.txt", "some text\n")
    with pytest.raises(ValueError, match=r"a.txt: labelled examples need named columns"):
        fs.read_labelled(path, "text", "label")


def test_file_without_documents(tmp_path: Path) -> None:
    path = write(tmp_path / "blank.txt", "\n  \n")
    with pytest.raises(ValueError, match=r"blank.txt: no documents"):
        fs.read_documents(path)


def test_invalid_csv(tmp_path: Path) -> None:
    path = write(tmp_path / "t.csv", 'text\n"never closed\n')
    with pytest.raises(ValueError, match=r"t.csv: invalid CSV"):
        fs.read_documents(path)


def test_file_that_is_not_parquet(tmp_path: Path) -> None:
    path = write(tmp_path / "t.parquet", "plain text")
    with pytest.raises(ValueError, match=r"t.parquet: cannot read as Parquet"):
        fs.read_documents(path)


def test_unreadable_and_empty_files(tmp_path, caplog):
    from dapt.sources.file_source import read_documents

    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "good.txt").write_text("a domain line\n")
    (tmp_path / "corpus" / "empty.txt").write_text("")
    with caplog.at_level("WARNING"):
        assert [d["text"] for d in read_documents(tmp_path / "corpus")] == ["a domain line"]
    assert "empty.txt: no documents (empty file); skipped" in caplog.text
    (tmp_path / "corpus" / "broken.txt").symlink_to(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="broken.txt: cannot read: No such file or directory"):
        read_documents(tmp_path / "corpus")


# ---------------------------------------------------------------------------------------------------
# tagged sentences (token classification)

CONLL = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC

Peter B-PER
Blackburn I-PER
"""


def test_conll_sentences_token_first_tag_last(tmp_path: Path) -> None:
    path = write(tmp_path / "train.conll", CONLL)
    assert fs.read_tagged(path) == [
        {"id": "train.conll:3", "tokens": ["EU", "rejects", "German"], "tags": ["B-ORG", "O", "B-MISC"],
         "text": "EU rejects German"},
        {"id": "train.conll:7", "tokens": ["Peter", "Blackburn"], "tags": ["B-PER", "I-PER"],
         "text": "Peter Blackburn"},  # the last sentence needs no blank line after it
    ]


def test_docstart_ends_a_sentence_and_blank_lines_repeat(tmp_path: Path) -> None:
    path = write(tmp_path / "a.bio", "a\tO\n-DOCSTART- O\nb\tB-X\n\n\n\nc\tO\n")
    assert [(s["id"], s["tokens"]) for s in fs.read_tagged(path)] == [
        ("a.bio:1", ["a"]), ("a.bio:3", ["b"]), ("a.bio:7", ["c"])]


def test_jsonl_sentences_with_named_columns(tmp_path: Path) -> None:
    path = write(tmp_path / "t.jsonl", jsonl({"words": ["New", "York"], "ner": ["B-LOC", "I-LOC"]}) + "\n")
    assert fs.read_tagged(path, tokens_column="words", tags_column="ner") == [
        {"id": "t.jsonl:1", "tokens": ["New", "York"], "tags": ["B-LOC", "I-LOC"], "text": "New York"}]


def test_tagged_directory_reads_conll_and_jsonl_only(tmp_path: Path) -> None:
    write(tmp_path / "b.conll", "x O\n")
    write(tmp_path / "a" / "c.jsonl", jsonl({"tokens": ["y"], "tags": ["O"]}))
    write(tmp_path / "notes.txt", "not tagged\n")
    assert [s["id"] for s in fs.read_tagged(tmp_path)] == ["a/c.jsonl:1", "b.conll:1"]


@pytest.mark.parametrize("record, message", [
    ({"tokens": ["a", "b"], "tags": ["O"]}, r"t.jsonl:2: 2 tokens but 1 tags"),
    ({"tokens": [], "tags": []}, r"t.jsonl:2: tokens 'tokens' is empty"),
    ({"tokens": ["a", " "], "tags": ["O", "O"]}, r"t.jsonl:2: tokens 'tokens' item 2 is empty"),
    ({"tokens": "a b", "tags": ["O", "O"]}, r"t.jsonl:2: tokens 'tokens' is a str, not a list"),
    ({"tokens": ["a", "b"], "tags": ["O", 3]}, r"t.jsonl:2: tags 'tags' item 2 is a int, not a string"),
    ({"tokens": ["a"], "tags": None}, r"t.jsonl:2: tags 'tags' is missing \(null\)"),
    ({"tokens": ["a"]}, r"t.jsonl:2: no field 'tags'; fields: \['tokens'\]"),
])
def test_bad_tagged_jsonl_names_file_and_line(tmp_path: Path, record: dict, message: str) -> None:
    path = write(tmp_path / "t.jsonl", jsonl({"tokens": ["ok"], "tags": ["O"]}, record))
    with pytest.raises(ValueError, match=message):
        fs.read_tagged(path)


def test_conll_line_without_a_tag_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path / "t.conll", "EU B-ORG\nrejects\n")
    with pytest.raises(ValueError, match=r"t.conll:2: expected a token and its tag separated by whitespace, "
                                         r"got 'rejects'"):
        fs.read_tagged(path)


def test_tagged_file_of_another_type(tmp_path: Path) -> None:
    path = write(tmp_path / "train.txt", "EU B-ORG\n")
    with pytest.raises(ValueError, match=r"train.txt: unsupported file type '\.txt' for tagged sentences; "
                                         r"supported: \.conll, \.bio, \.jsonl"):
        fs.read_tagged(path)


def test_tagged_input_without_sentences(tmp_path: Path) -> None:
    path = write(tmp_path / "t.conll", "-DOCSTART- O\n\n")
    with pytest.raises(ValueError, match=r"t.conll: no sentences"):
        fs.read_tagged(path)
