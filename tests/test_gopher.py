"""dapt.cleaning.gopher: the fast Gopher filters decide like datatrove's, and the regex tokenizer splits as
documented."""

from __future__ import annotations

import random

import pytest
from datatrove.data import Document
from datatrove.pipeline.filters.gopher_quality_filter import GopherQualityFilter
from datatrove.pipeline.filters.gopher_repetition_filter import GopherRepetitionFilter

from dapt.cleaning.gopher import FastGopherQualityFilter, FastGopherRepetitionFilter, RegexWordTokenizer

WORDS = RegexWordTokenizer()

# --------------------------------------------------------------------------------------------------------------
# Generated documents
# --------------------------------------------------------------------------------------------------------------

_VOCAB = ["the", "be", "to", "of", "and", "that", "have", "with", "a", "in", "it", "for", "on", "as", "at", "by",
          "this", "from", "or", "an", "model", "data", "train", "text", "token", "corpus", "domain", "pretraining",
          "language", "filter", "quality", "document", "sentence", "paragraph", "line", "word", "research", "results",
          "method", "significant", "approximately", "internationalization", "interoperability", "x", "y", "z", "ok"]
# non-ASCII letters, numerics that are not letters, full-width digits (datatrove counts "１" as punctuation),
# underscores, and punctuation-only tokens
_ODD = ["café", "straße", "½", "²", "привет", "мир", "１", "１２", "__", "a_b", "!!!", "--", "»", "…", "§", "42",
        "3.14"]


def _sentence(rng: random.Random, n_words: int, odd: float = 0.0) -> str:
    words = [rng.choice(_ODD) if rng.random() < odd else rng.choice(_VOCAB) for _ in range(n_words)]
    return " ".join(words).capitalize() + rng.choice([".", ".", "!", "?", ",", ""])


def _prose(rng: random.Random, n_sentences: int, odd: float = 0.0) -> str:
    lines = [" ".join(_sentence(rng, rng.randint(3, 15), odd) for _ in range(rng.randint(1, 4)))
             for _ in range(n_sentences)]
    return "\n".join(lines) if rng.random() < 0.7 else "\n\n".join(lines)


def _document(rng: random.Random, kind: str) -> str:
    if kind == "prose":
        return _prose(rng, rng.randint(1, 30))
    if kind == "odd":
        return _prose(rng, rng.randint(1, 20), odd=rng.choice([0.05, 0.3, 0.9]))
    if kind == "short":
        return _sentence(rng, rng.randint(0, 12))
    if kind == "repeated_lines":
        line = _sentence(rng, rng.randint(2, 10))
        return "\n".join([line] * rng.randint(2, 6) + [_prose(rng, rng.randint(1, 12))])
    if kind == "repeated_paragraphs":
        para = _prose(rng, 2)
        return "\n\n".join([para] * rng.randint(2, 4) + [_prose(rng, rng.randint(1, 10))])
    if kind == "repeated_phrase":  # the top 2/3/4-gram and duplicated 5..10-gram rules
        phrase = _sentence(rng, rng.randint(2, 12))
        parts = [phrase if rng.random() < rng.choice([0.1, 0.3, 0.6]) else _sentence(rng, rng.randint(3, 12))
                 for _ in range(rng.randint(5, 40))]
        return " ".join(parts)
    if kind == "bullets":
        return "\n".join(rng.choice(["- ", "• ", "  -", ""]) + _sentence(rng, rng.randint(3, 12))
                         for _ in range(rng.randint(1, 20)))
    if kind == "ellipsis":
        return "\n".join(_sentence(rng, rng.randint(3, 12)) + rng.choice(["...", "…", "", " ..."])
                         for _ in range(rng.randint(1, 20)))
    if kind == "hashes":
        return " ".join(rng.choice(["#", "#tag", "##", ""]) + w for w in _prose(rng, 5).split())
    if kind == "numbers":
        return " ".join(str(rng.randint(0, 10**rng.randint(1, 6))) for _ in range(rng.randint(1, 80)))
    raise ValueError(kind)


_KINDS = ["prose", "odd", "short", "repeated_lines", "repeated_paragraphs", "repeated_phrase", "bullets", "ellipsis",
          "hashes", "numbers"]


def _documents(n: int = 300) -> list[Document]:
    rng = random.Random(0)
    return [Document(text=_document(rng, _KINDS[i % len(_KINDS)]), id=str(i)) for i in range(n)]


def _reason(result: bool | tuple[bool, str]) -> str:
    return "kept" if result is True else result[1]


# --------------------------------------------------------------------------------------------------------------
# Same decisions and reasons as datatrove
# --------------------------------------------------------------------------------------------------------------

_QUALITY_PARAMS = [{}, {"min_doc_words": 5}, {"min_doc_words": 5, "max_avg_word_length": 20, "min_stop_words": 1}]


@pytest.mark.parametrize("params", _QUALITY_PARAMS)
def test_quality_matches_datatrove(params: dict) -> None:
    parent = GopherQualityFilter(language=WORDS, **params)
    fast = FastGopherQualityFilter(language=WORDS, **params)
    docs = [d for d in _documents() if d.text.strip()]  # datatrove divides by zero on an empty text
    expected = [parent.filter(d) for d in docs]
    assert [fast.filter(d) for d in docs] == expected
    if params:  # the loose settings reach the later rules
        assert len({_reason(r) for r in expected}) >= 6, {_reason(r) for r in expected}


_REPETITION_PARAMS = [{}, {"dup_line_frac": None, "dup_para_frac": None, "dup_line_char_frac": None,
                           "dup_para_char_frac": None, "top_n_grams": ((2, 0.5), (3, 0.5), (4, 0.5))}]


@pytest.mark.parametrize("params", _REPETITION_PARAMS)
def test_repetition_matches_datatrove(params: dict) -> None:
    parent = GopherRepetitionFilter(language=WORDS, **params)
    fast = FastGopherRepetitionFilter(language=WORDS, **params)
    docs = _documents()
    expected = [parent.filter(d) for d in docs]
    assert [fast.filter(d) for d in docs] == expected
    assert fast.filter_batch(docs) == expected  # documents batched together share no n-grams
    reasons = {_reason(r) for r in expected}
    assert len(reasons) >= 5, reasons
    assert any(r.startswith("duplicated_") for r in reasons), reasons


def test_repetition_matches_datatrove_on_long_documents() -> None:
    """Long documents, with ties and overlapping repeats."""
    rng = random.Random(1)
    docs = [Document(text=" ".join(_document(rng, rng.choice(_KINDS)) for _ in range(rng.randint(20, 60))), id=str(i))
            for i in range(40)]
    loose = {"top_n_grams": ((2, 0.9), (3, 0.9), (4, 0.9)), "dup_line_frac": None, "dup_para_frac": None}
    for params in ({}, loose):
        parent = GopherRepetitionFilter(language=WORDS, **params)
        fast = FastGopherRepetitionFilter(language=WORDS, **params)
        expected = [parent.filter(d) for d in docs]
        assert [fast.filter(d) for d in docs] == expected
        assert fast.filter_batch(docs) == expected


def test_defaults_use_the_regex_tokenizer() -> None:
    assert FastGopherQualityFilter().language == WORDS
    assert FastGopherRepetitionFilter(dup_line_frac=0.5).dup_line_frac == 0.5


# --------------------------------------------------------------------------------------------------------------
# Reasons on one-line inputs
# --------------------------------------------------------------------------------------------------------------

_PROSE = "The model was trained on the data and it reached a good score with that recipe for the task. " * 5


def _q(text: str, **params) -> bool | tuple[bool, str]:
    return FastGopherQualityFilter(**params).filter(Document(text=text, id="0"))


def _r(text: str, **params) -> bool | tuple[bool, str]:
    return FastGopherRepetitionFilter(**params).filter(Document(text=text, id="0"))


def test_quality_short_doc() -> None:
    assert _q("Hello world.", min_doc_words=50) == (False, "gopher_short_doc")


def test_quality_hashes() -> None:
    assert _q("#the quick brown fox " * 20) == (False, "gopher_too_many_hashes")


def test_quality_bullets() -> None:
    assert _q("\n".join(["- the quick brown fox and the lazy dog"] * 12)) == (False, "gopher_too_many_bullets")


def test_quality_end_ellipsis() -> None:
    assert _q("\n".join(["the quick brown fox and the lazy dog ran"] * 5 + ["and then it ended..."] * 4)) == (
        False, "gopher_too_many_end_ellipsis")


def test_quality_numbers_only() -> None:
    assert _q(" ".join(["12345"] * 60)) == (False, "gopher_below_alpha_threshold")


def test_quality_no_stop_words() -> None:
    assert _q(" ".join(["alpha beta gamma delta"] * 15)) == (False, "gopher_enough_stop_words")


def test_quality_keeps_prose() -> None:
    assert _q(_PROSE) is True


def test_repetition_empty() -> None:
    assert _r("") == (False, "empty")


def test_repetition_line_repeated_10_times() -> None:
    assert _r("\n".join(["the same line is here again"] * 10)) == (False, "dup_line_frac")


def test_repetition_paragraph_repeated() -> None:
    assert _r("\n\n".join(["a paragraph that repeats\nover two lines"] * 4)) == (False, "dup_para_frac")


def test_repetition_top_2_gram() -> None:
    assert _r("hello world hello world hello world") == (False, "top_2_gram")


def test_repetition_duplicated_5_grams() -> None:
    unique, phrase = " ".join(f"w{i}" for i in range(40)), " ".join(f"p{i}x" for i in range(20))
    assert _r(f"{unique} {phrase} {phrase}") == (False, "duplicated_5_n_grams")


def test_repetition_keeps_prose() -> None:
    rng = random.Random(2)
    assert _r(" ".join(rng.sample(_VOCAB, len(_VOCAB)))) is True


# --------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------


def test_word_tokenize_splits_words_and_punctuation_runs() -> None:
    assert WORDS.word_tokenize("Hello, world! It's 3.5km... café_1 ½") == [
        "Hello", ",", "world", "!", "It", "'", "s", "3", ".", "5km", "...", "café_1", "½"]


def test_sent_tokenize_splits_on_terminal_punctuation_and_newlines() -> None:
    text = "  One two. Three? Four\nFive!  Six 3.5 seven.\n\n"
    assert WORDS.sent_tokenize(text) == ["One two.", "Three?", "Four", "Five!", "Six 3.5 seven."]
    assert [text[a:b] for a, b in WORDS.span_tokenize(text)] == WORDS.sent_tokenize(text)
    assert WORDS.sent_tokenize(" \n ") == []


def test_whitespace_words_keep_punctuation_attached() -> None:
    from dapt.cleaning.gopher import WhitespaceWordTokenizer

    assert WhitespaceWordTokenizer().word_tokenize("(1) the above notice;\nis kept.") == [
        "(1)", "the", "above", "notice;", "is", "kept."]


def test_min_top_count_two_keeps_short_texts_without_repeats() -> None:
    text = "This component is licensed under a commercial contract from the supplier."

    def doc() -> Document:
        return Document(text=text, id="x")

    assert FastGopherRepetitionFilter(language=WORDS).filter(doc()) == (False, "top_3_gram")
    assert FastGopherRepetitionFilter(language=WORDS, min_top_count=2).filter(doc()) is True


def test_paragraph_and_line_splits_are_datatroves_regexes() -> None:
    import itertools
    import re

    from dapt.cleaning.gopher import _lines, _paragraphs

    for size in range(9):  # every text of up to 8 characters from a letter, a space and a newline
        for chars in itertools.product("a \n", repeat=size):
            text = "".join(chars)
            assert _paragraphs(text) == re.split(r"\n{2,}", text), repr(text)
            assert _lines(text) == re.split("\n+", text), repr(text)


def test_repetition_batch_keeps_documents_apart() -> None:
    """An n-gram never runs from one document of a batch into the next: "a" + "b" across the boundary would make
    "a b" occur twice in the first document."""
    docs = [Document(text="a b a", id="0"), Document(text="b c", id="1")]
    assert FastGopherRepetitionFilter(language=WORDS, min_top_count=2).filter_batch(docs) == [True, True]
