"""retrieval: ir-measures metrics on hand-checked rankings, BM25 and exact dense search, and fit_and_score on a
toy task with tiny local models (BERT saved from an MLM, RoBERTa with byte-level BPE)."""

import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, TrainerCallback

from dapt.finetuning.retrieval import (
    MEASURES,
    bi_encoder,
    bm25_run,
    dense_run,
    doc_text,
    evaluate,
    fit_and_score,
    mean_scores,
    training_pairs,
    truncated_share,
)
from tests.conftest import TINY, wordpiece_tokenizer

# 32 tokens hold every toy text; at this rate, with seed 4 below, the tiny BERT's dev nDCG@10 peaks at epoch 1 of 2,
# so keeping the last epoch instead of the best would show
T = SimpleNamespace(learning_rate=5e-3, epochs=2, patience=None, batch_size=4, max_seq_length=32, warmup_ratio=0.1,
                    weight_decay=0.0)

CORPUS = [
    {"id": "licence", "title": "Licence", "text": "The licensor grants the licensee a perpetual licence."},
    {"id": "redistribution", "title": "", "text": "Redistribution and use in source and binary forms are permitted."},
    {"id": "warranty", "title": "Warranty", "text": "The software is provided as is, without warranty of any kind."},
    {"id": "liability", "title": "", "text": "In no event shall the licensor be liable for any claim or damages."},
    {"id": "cat", "title": "Cat", "text": "The cat sat on the mat."},
    {"id": "dog", "title": "Dog", "text": "The dog slept by the fire while it rained outside."},
    {"id": "permission", "title": "", "text": "Permission is hereby granted, free of charge, to any person."},
    {"id": "copy", "title": "Copy", "text": "Obtaining a copy of this software and documentation."},
]
QUESTIONS = {
    "licence": ["who grants the licence", "is the licence perpetual"],
    "redistribution": ["may i redistribute it", "binary forms permitted"],
    "warranty": ["is there a warranty", "provided as is"],
    "liability": ["is the licensor liable", "claim for damages"],
    "cat": ["where did the cat sit", "what sat on the mat"],
    "dog": ["where did the dog sleep", "was it raining"],
    "permission": ["is permission granted", "free of charge"],
    "copy": ["obtaining a copy", "copy of the documentation"],
}


def toy_task() -> dict[str, list[dict]]:
    """16 train queries (two per document), 4 dev, 4 test; binary judgements, so the dev evaluator's nDCG and
    ir-measures' agree."""
    qs = [(doc, q) for doc, questions in QUESTIONS.items() for q in questions]
    rows = [{"id": f"q{i}", "text": q, "qrels": {doc: 1}} for i, (doc, q) in enumerate(qs)]
    dev = [{**r, "id": f"dev-{r['id']}", "text": r["text"] + " then"} for r in rows[0:16:4]]
    test = [{**r, "id": f"test-{r['id']}", "text": r["text"] + " now"} for r in rows[2:16:4]]
    return {"train": rows, "dev": dev, "test": test}


def test_metrics_match_hand_computed_values():
    qrels = {"q1": {"a": 2, "b": 1, "c": 0}, "q2": {"d": 1}, "q3": {"e": 1}}
    run = {"q1": {"x": 0.9, "b": 0.8, "a": 0.7, "c": 0.6},  # x unjudged, then b (grade 1), a (grade 2)
           "q2": {"x": 0.5, "y": 0.4},  # its relevant document is not retrieved
           "q9": {"a": 1.0}}  # not judged: ignored; q3 is absent from the run
    per_query = evaluate(qrels, run)
    # q1, trec_eval's linear gains: DCG@10 = 1/log2(3) + 2/log2(4); ideal = 2/log2(2) + 1/log2(3)
    # RR@10 = 1/2 (first relevant at rank 2); R@100 = 2 of 2 relevant retrieved
    ndcg = (1 / math.log2(3) + 2 / math.log2(4)) / (2 / math.log2(2) + 1 / math.log2(3))
    assert per_query["q1"] == pytest.approx({"ndcg_at_10": ndcg, "mrr_at_10": 0.5, "recall_at_100": 1.0})
    zero = dict.fromkeys(MEASURES, 0.0)
    assert per_query["q2"] == zero and per_query["q3"] == zero and set(per_query) == {"q1", "q2", "q3"}
    assert mean_scores(per_query) == pytest.approx({"ndcg_at_10": ndcg / 3, "mrr_at_10": 0.5 / 3,
                                                    "recall_at_100": 1 / 3})


def test_cutoffs_apply():
    # the only relevant document at rank 11: outside nDCG@10 and RR@10, inside R@100
    run = {"q": {f"x{i}": 1 - i / 100 for i in range(10)} | {"a": 0.5}}
    assert evaluate({"q": {"a": 1}}, run)["q"] == {"ndcg_at_10": 0.0, "mrr_at_10": 0.0, "recall_at_100": 1.0}


def test_doc_text_prefixes_a_title():
    assert doc_text({"id": "1", "title": "Cat", "text": "It sat."}) == "Cat It sat."
    assert doc_text({"id": "2", "title": "", "text": "It sat."}) == "It sat."


def test_bm25_ranks_the_matching_document_first():
    queries = [{"id": "a", "text": "where did the cat sit"}, {"id": "b", "text": "warranty"},
               {"id": "c", "text": "the of and"}]  # stopwords only: nothing is retrieved
    run = bm25_run(CORPUS, queries, k=100)
    assert next(iter(run["a"])) == "cat" and next(iter(run["b"])) == "warranty"  # "Warranty" only in a title
    assert list(run["a"].values()) == sorted(run["a"].values(), reverse=True)
    assert run["c"] == {} and all(len(r) <= len(CORPUS) for r in run.values())


def test_query_ids_must_be_unique():
    with pytest.raises(ValueError, match="unique"):
        bm25_run(CORPUS, [{"id": "a", "text": "cat"}, {"id": "a", "text": "dog"}])


def test_dense_run_is_exact_cosine_top_k(tiny_bert):
    model = bi_encoder(tiny_bert, max_seq_length=32)
    queries = [{"id": "a", "text": "the cat sat"}, {"id": "b", "text": "licence to redistribute"}]
    run = dense_run(model, CORPUS, queries, k=3)
    docs = model.encode([doc_text(d) for d in CORPUS])
    qs = model.encode([q["text"] for q in queries])
    cos = (qs / np.linalg.norm(qs, axis=1, keepdims=True)) @ (docs / np.linalg.norm(docs, axis=1, keepdims=True)).T
    for row, q in zip(cos, queries):
        top = np.argsort(-row)[:3]
        assert list(run[q["id"]]) == [CORPUS[i]["id"] for i in top]
        assert list(run[q["id"]].values()) == pytest.approx(row[top].tolist(), abs=1e-5)
    assert all(len(r) == len(CORPUS) for r in dense_run(model, CORPUS, queries, k=100).values())  # k capped


def test_training_pairs_keep_relevant_judgements_only():
    docs = {"a": "doc a", "b": "doc b", "c": "doc c"}
    pairs = training_pairs([{"id": "q", "text": "query", "qrels": {"a": 2, "b": 0, "c": 1}}], docs)
    assert pairs.to_dict() == {"anchor": ["query", "query"], "positive": ["doc a", "doc c"]}


def test_truncated_share_counts_special_tokens():
    tok = wordpiece_tokenizer()
    # "the cat" is 2 words + [CLS] [SEP] = 4 tokens: longer than 3, not than 4
    assert truncated_share(tok, ["the cat", "the"], 3) == 0.5
    assert truncated_share(tok, ["the cat", "the"], 4) == 0.0


class BestMetric(TrainerCallback):
    """Records the trainer's dev evaluations, the metric names it logs, and its best dev score (the extra
    callbacks reach the trainer)."""

    def __init__(self):
        self.evaluations, self.best, self.names = 0, None, set()

    def on_evaluate(self, args, state, control, **kwargs):
        self.evaluations += 1

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.names |= set(logs or {})

    def on_train_end(self, args, state, control, **kwargs):
        self.best = state.best_metric


@pytest.fixture(scope="module")
def mlm_bert(tmp_path_factory):
    """A tiny random BERT saved from BertForMaskedLM: an MLM head and no pooler, as pretrain leaves it."""
    path = tmp_path_factory.mktemp("mlm-bert")
    tok = wordpiece_tokenizer()
    torch.manual_seed(0)  # the same weights every session, so the epoch the test relies on stays the best
    BertForMaskedLM(BertConfig(vocab_size=len(tok), **TINY)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_fit_and_score_from_an_mlm_checkpoint_is_deterministic(mlm_bert, tmp_path):
    task = toy_task()
    recorder = BestMetric()
    metrics, rows = fit_and_score(mlm_bert, task, CORPUS, T, seed=4, scratch=tmp_path / "a", callbacks=[recorder])
    measures = [f"{p}{s}_{m}" for p in ("", "zero_shot_") for s in ("dev", "test") for m in MEASURES]
    assert set(metrics) == {*measures, "epochs_run", "truncated"}
    assert all(0 <= metrics[k] <= 1 for k in measures)
    assert metrics["epochs_run"] == 2.0 and metrics["truncated"] == dict.fromkeys(("train", "dev", "test", "corpus"), 0)
    # the kept model is the trainer's best dev epoch: ir-measures agrees with the evaluator on binary judgements
    assert recorder.evaluations == 2 and metrics["dev_ndcg_at_10"] == pytest.approx(recorder.best, abs=1e-6)
    # names MLflow accepts (the caller's logger gets them): no `@` as in sentence-transformers' own names
    assert "eval_dev_cosine_ndcg_at_10" in recorder.names
    assert all(re.fullmatch(r"[\w\-. :/]+", name) for name in recorder.names)

    assert [r["id"] for r in rows] == [q["id"] for q in task["test"]]
    ids = {d["id"] for d in CORPUS}
    for row, q in zip(rows, task["test"]):
        assert row["qrels"] == q["qrels"] and len(row["ranking"]) == len(set(row["ranking"])) <= 10
        assert set(row["ranking"]) <= ids and set(row["zero_shot"]) == set(MEASURES)
        assert all(0 <= row[m] <= 1 and 0 <= row["zero_shot"][m] <= 1 for m in MEASURES)
    assert np.mean([r["ndcg_at_10"] for r in rows]) == pytest.approx(metrics["test_ndcg_at_10"])

    again = fit_and_score(mlm_bert, task, CORPUS, T, seed=4, scratch=tmp_path / "b")
    assert again == (metrics, rows)


def test_fit_and_score_with_byte_level_bpe(tiny_roberta, tmp_path):
    t = SimpleNamespace(**{**vars(T), "epochs": 1, "patience": 1, "max_seq_length": 8})
    metrics, rows = fit_and_score(tiny_roberta, toy_task(), CORPUS, t, seed=1, scratch=tmp_path)
    assert metrics["epochs_run"] == 1.0 and len(rows) == 4 and 0 <= metrics["test_ndcg_at_10"] <= 1
    assert metrics["truncated"]["corpus"] > 0  # every document is longer than 8 tokens with <s> and </s>
