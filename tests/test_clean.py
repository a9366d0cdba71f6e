"""clean: each drop reason on one-line inputs, the hash split, and the stage on tiny files."""

import json
from collections import Counter

from tests.conftest import write_jsonl
from stages.clean import CleanParams, Contamination, MaxWords, MinWords, clean_docs, fingerprint, normalise, run, \
    split_domain


def test_normalise():
    assert normalise("  a\u00a0 b\t\tc \x07\r\n\r\n\r\n\r\nd  ") == "a b c\n\nd"
    assert normalise("cafe\u0301") == "caf\u00e9"  # NFC


def test_fingerprint_ignores_case_and_spacing():
    assert fingerprint("The  Licensor\nshall") == fingerprint("the licensor shall")
    assert fingerprint("the licensor") != fingerprint("the licensee")


def reasons(texts, held_out=()):
    counts = Counter()
    kept = clean_docs(({"id": str(i), "text": t} for i, t in enumerate(texts)), [MinWords(3), MaxWords(6)],
                      Contamination.of(held_out, 4), counts)
    return [d["text"] for d in kept], counts


def test_each_drop_reason_is_named_and_counted():
    kept, counts = reasons(["one two", "one two three", "ONE  two three", "a b c d e f g", "Secret test  text",
                            "x the hidden test notice y", "the hidden test"],
                           held_out=["secret test text", "The hidden test notice"])
    assert kept == ["one two three", "the hidden test"]  # 3 shared words are not a 4-gram
    assert counts == Counter(kept=2, too_short=1, duplicate=1, too_long=1, contaminated=1, ngram_overlap=1)


def test_split_is_stable_under_reordering_and_capped():
    docs = [{"id": str(i), "text": f"doc {i}", "fp": fingerprint(f"doc {i}")} for i in range(400)]
    train, valid = split_domain(docs, 0.1, 15)
    train2, valid2 = split_domain(list(reversed(docs)), 0.1, 15)
    assert len(valid) == 15 and {d["id"] for d in valid} == {d["id"] for d in valid2}
    assert len(train) + len(valid) == 400 and not {d["id"] for d in train} & {d["id"] for d in valid}


def test_stage_decontaminates_and_reports(project):
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    domain = [{"id": f"d{i}", "text": " ".join(words[i % 10:] + words[: i % 10]) + f" n{i}"} for i in range(200)]
    domain += [{"id": "leak", "text": "this exact sentence is in the test split"},
               {"id": "embeds", "text": "a licence that embeds this exact sentence is in the test split verbatim"},
               {"id": "short", "text": "too short"}]
    write_jsonl(project.raw_domain, domain)
    write_jsonl(project.raw_general, [{"id": f"g{i}", "text": f"general text number {i} about the world"}
                                      for i in range(30)])
    write_jsonl(project.task / "train.jsonl", [{"text": "x y z", "label": "a"}])
    write_jsonl(project.task / "dev.jsonl", [{"text": "x", "label": "a"}])
    write_jsonl(project.task / "test.jsonl", [{"text": "This exact sentence is  in the test split", "label": "a"}])
    run(CleanParams(min_words=3, max_words=100, valid_fraction=0.2, max_valid_docs=10, general_max_docs=20,
                    decontaminate_ngram=5), project)

    metrics = json.loads((project.metrics / "clean.json").read_text())
    assert metrics["domain"] == {"kept": 200, "contaminated": 1, "ngram_overlap": 1, "too_short": 1}
    assert metrics["domain_valid_docs"] == 10 and metrics["domain_train_docs"] == 190
    assert metrics["general_valid_docs"] == 20
    train = project.domain_train.read_text()
    assert "leak" not in train and "test split" not in train and "embeds" not in train


def test_boilerplate_ngrams_do_not_count_as_contamination():
    boiler = "provided as is without warranty of any kind"
    corpus = [f"{boiler} doc {i}" for i in range(5)] + ["rare words only the test has here"]
    c = Contamination.of([f"{boiler} and rare words only the test has"], 4, corpus, max_df=2)
    assert c.reason("x provided as is without warranty y", "fp") is None
    assert c.reason("z rare words only the", "fp") == "ngram_overlap"
    assert Contamination.of([boiler], 4).reason("x provided as is without warranty y", "fp") == "ngram_overlap"


def test_min_words_above_max_words_is_an_error():
    import pytest
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="clean.min_words \\(9\\) exceeds clean.max_words \\(3\\)"):
        CleanParams(min_words=9, max_words=3, valid_fraction=0.1, max_valid_docs=1, general_max_docs=1,
                    decontaminate_ngram=0)
