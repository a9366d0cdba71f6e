"""retrieval: the retrieval task type of `finetune`: a bi-encoder (mean-pooled encoder) searching a corpus.

A variant is judged as retrievers usually are (BEIR, MTEB): each model folder becomes a sentence-transformers
bi-encoder (the encoder + mean pooling; an MLM checkpoint's head is simply unused), scored zero-shot, then
fine-tuned on (query, relevant document) pairs with in-batch negatives (MultipleNegativesRankingLoss), the
epoch kept by dev nDCG@10, and the kept model scored once on test. Search is exact (cosine over the whole
corpus), so scores measure the encoder, not an index. Every metric comes from ir-measures (nDCG and recall by
trec_eval, RR@10 by the MS MARCO scorer), per query, so `compare` can pair queries across variants; `bm25_run` is the
lexical reference.

Data: corpus `{"id", "title", "text"}`; queries `{"id", "text", "qrels": {doc_id: grade}}` (grade > 0 relevant).
`finetune` calls `fit_and_score` when the task's records carry `qrels`; nothing here reads or writes files
except the trainer's checkpoints under `scratch`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import bm25s
import ir_measures
import torch
from datasets import Dataset
from ir_measures import RR, R, nDCG
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers.base.sampler import BatchSamplers
from sentence_transformers.sentence_transformer.evaluation.information_retrieval import InformationRetrievalEvaluator
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
from sentence_transformers.util import semantic_search
from transformers import EarlyStoppingCallback, PreTrainedTokenizerBase, TrainerCallback, set_seed

from dapt.common import log
from dapt.finetuning.tasks import truncated

Run = dict[str, dict[str, float]]  # query id -> {doc id: score}, the shape trec_eval and ir-measures read
Qrels = dict[str, dict[str, int]]  # query id -> {doc id: graded relevance}

# the measures BEIR and MTEB report, so numbers sit beside published ones; RR counts grade >= 1 as relevant
MEASURES = {"ndcg_at_10": nDCG @ 10, "mrr_at_10": RR @ 10, "recall_at_100": R @ 100}
K = 100  # documents retrieved per query: what R@100 needs, and more than nDCG@10 and RR@10 read
SPLITS = ("dev", "test")  # scored with ir-measures; train only feeds the loss
# the evaluator's key for dev nDCG@10 (cosine, since bi_encoder pins it), prefixed `eval_` by the trainer
BEST_METRIC = "eval_dev_cosine_ndcg_at_10"


class TrainingSettings(Protocol):
    """What `fit_and_score` reads from `stages.finetune.TrainingParams` (typed here, as finetune imports us)."""
    learning_rate: float
    epochs: int
    patience: int | None
    batch_size: int
    max_seq_length: int
    warmup_ratio: float
    weight_decay: float


# ---------------------------------------------------------------------------------------------------
# metrics


def evaluate(qrels: Qrels, run: Run) -> dict[str, dict[str, float]]:
    """Per-query values of `MEASURES`, `{query id: {measure key: value}}`, for every query in `qrels`.

    A query the run has nothing for scores 0: ir-measures 0.4 yields a measure's default (0) for those itself,
    but the zeros are filled in here too so no version's behaviour can drop a query from the mean.
    """
    names = {m: k for k, m in MEASURES.items()}
    per_query = {q: dict.fromkeys(MEASURES, 0.0) for q in qrels}
    for metric in ir_measures.iter_calc(list(MEASURES.values()), qrels, run):
        if metric.query_id in per_query:
            per_query[metric.query_id][names[metric.measure]] = float(metric.value)
    return per_query


def mean_scores(per_query: dict[str, dict[str, float]]) -> dict[str, float]:
    """The mean of each measure over the queries (each query weighs the same, as in trec_eval)."""
    n = max(len(per_query), 1)
    return {k: sum(v[k] for v in per_query.values()) / n for k in MEASURES}


def qrels_of(queries: Iterable[dict]) -> Qrels:
    """The judgements of `queries`, keyed by query id."""
    return {q["id"]: {d: int(g) for d, g in q["qrels"].items()} for q in queries}


# ---------------------------------------------------------------------------------------------------
# retrieval


def doc_text(doc: dict) -> str:
    """What is encoded or indexed for a document: "title text" when it has a title (BEIR's convention)."""
    return f"{doc['title']} {doc['text']}" if doc.get("title") else doc["text"]


def _unique_ids(queries: Sequence[dict]) -> list[str]:
    ids = [q["id"] for q in queries]
    if len(set(ids)) != len(ids):  # a run is keyed by query id: a repeated id would silently merge two queries
        raise ValueError("query ids must be unique")
    return ids


def bm25_run(corpus: list[dict], queries: list[dict], k: int = K) -> Run:
    """BM25 (bm25s, Lucene's variant, English stopwords, no stemming) top-`k` per query: the lexical reference.

    Documents sharing no term with the query score 0 and are left out: they are not retrieved, and a tie among
    them would be broken differently by each measure's implementation.
    """
    ids = _unique_ids(queries)
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize([doc_text(d) for d in corpus], stopwords="en", show_progress=False),
                    show_progress=False)
    tokens = bm25s.tokenize([q["text"] for q in queries], stopwords="en", show_progress=False)
    hits, scores = retriever.retrieve(tokens, k=min(k, len(corpus)), show_progress=False)
    return {qid: {corpus[int(i)]["id"]: float(s) for i, s in zip(row, row_scores) if s > 0}
            for qid, row, row_scores in zip(ids, hits, scores)}


def bi_encoder(model_dir: Path, max_seq_length: int) -> SentenceTransformer:
    """A mean-pooled bi-encoder over the encoder in `model_dir` (any HF encoder folder; an MLM checkpoint loads
    as its base model, head unused), inputs cut at `max_seq_length` tokens, compared by cosine.

    Mean pooling rather than [CLS]: an MLM-pretrained encoder never trained its [CLS] vector (nor, for a
    checkpoint saved without one, its pooler), while the mean of its token vectors is usable zero-shot.
    """
    encoder = Transformer(str(model_dir), max_seq_length=max_seq_length)
    pooling = Pooling(encoder.get_embedding_dimension(), pooling_mode="mean")
    return SentenceTransformer(modules=[encoder, pooling], similarity_fn_name="cosine")


def dense_run(model: SentenceTransformer, corpus: list[dict], queries: list[dict], k: int = K,
              batch_size: int = 64) -> Run:
    """Exact top-`k` search by cosine over the whole corpus (no approximate index, so nothing but the encoder
    varies between variants); deterministic for fixed weights."""
    ids = _unique_ids(queries)
    docs = model.encode_document([doc_text(d) for d in corpus], batch_size=batch_size, convert_to_tensor=True,
                                 normalize_embeddings=True)
    qs = model.encode_query([q["text"] for q in queries], batch_size=batch_size, convert_to_tensor=True,
                            normalize_embeddings=True)
    hits = semantic_search(qs, docs, top_k=min(k, len(corpus)))
    return {qid: {corpus[h["corpus_id"]]["id"]: float(h["score"]) for h in row} for qid, row in zip(ids, hits)}


def truncated_share(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_len: int) -> float:
    """The share of `texts` longer than `max_len` tokens as the encoder sees them (special tokens included),
    i.e. of which the model reads only the start."""
    if not texts:
        return 0.0
    cut = truncated(tokenizer(texts, truncation=True, max_length=max_len), max_len)  # as classification counts it
    return round(sum(cut) / len(texts), 4)


def training_pairs(queries: list[dict], docs: dict[str, str]) -> Dataset:
    """One (anchor = query, positive = relevant document) row per judgement with grade > 0; the other documents
    of a batch are the negatives (in-batch negatives)."""
    pairs = [(q["text"], docs[d]) for q in queries for d, grade in q["qrels"].items() if grade > 0]
    return Dataset.from_dict({"anchor": [a for a, _ in pairs], "positive": [p for _, p in pairs]})


class DevEvaluator(InformationRetrievalEvaluator):
    """sentence-transformers' IR evaluator with `@` spelled `_at_` in its metric names (`dev_cosine_ndcg_at_10`):
    MLflow rejects a metric name with `@`, and the trainer hands these names to the callbacks that log them."""

    def __call__(self, *args, **kwargs) -> dict[str, float]:
        return {k.replace("@", "_at_"): v for k, v in super().__call__(*args, **kwargs).items()}


def dev_evaluator(corpus: list[dict], dev: list[dict], batch_size: int) -> DevEvaluator:
    """The per-epoch dev search (dev queries vs the whole corpus) that picks the best epoch.

    Its relevance is binary (grade > 0), so on graded qrels its nDCG differs from the reported (ir-measures) one.
    """
    relevant = {q["id"]: {d for d, g in q["qrels"].items() if g > 0} for q in dev}
    return DevEvaluator(
        queries={q["id"]: q["text"] for q in dev}, corpus={d["id"]: doc_text(d) for d in corpus},
        relevant_docs=relevant, name="dev", batch_size=batch_size, ndcg_at_k=[10], mrr_at_k=[10],
        accuracy_at_k=[1], precision_recall_at_k=[100], map_at_k=[100], write_csv=False)


def score_splits(model: SentenceTransformer, corpus: list[dict], task: dict[str, list[dict]], batch_size: int
                 ) -> tuple[dict[str, dict[str, dict[str, float]]], Run]:
    """Per-query scores of dev and test (one corpus encoding for both), and the test run."""
    queries = [q for s in SPLITS for q in task[s]]
    run = dense_run(model, corpus, queries, batch_size=batch_size)
    scores = {s: evaluate(qrels_of(task[s]), {q["id"]: run[q["id"]] for q in task[s]}) for s in SPLITS}
    return scores, {q["id"]: run[q["id"]] for q in task["test"]}


# ---------------------------------------------------------------------------------------------------


def fit_and_score(model_dir: Path, task: dict[str, list[dict]], corpus: list[dict], t: TrainingSettings,
                  seed: int, scratch: Path, callbacks: Sequence[TrainerCallback] = ()) -> tuple[dict, list[dict]]:
    """Fine-tune the bi-encoder of `model_dir` on `task["train"]`, keep the best dev epoch, score it on test.

    Returns the metrics (test and dev of the kept model, the untuned model's zero-shot scores, epochs run,
    truncated shares) and one row per test query, in test order, with its top-10 ranking and scores.
    """
    # seed: before the model, as loading draws the weights a checkpoint lacks (an MLM folder's pooler); the trainer
    # reseeds with `seed` when built, so dropout and batch order do not depend on how many such weights there were
    set_seed(seed)

    # model
    model = bi_encoder(model_dir, t.max_seq_length)
    eval_batch = 2 * t.batch_size
    cut = {s: truncated_share(model.tokenizer, [q["text"] for q in task[s]], t.max_seq_length)
           for s in ("train", *SPLITS)}
    cut["corpus"] = truncated_share(model.tokenizer, [doc_text(d) for d in corpus], t.max_seq_length)
    log.info("retrieval: truncated at %d tokens: %s", t.max_seq_length, cut)

    # zero-shot: the untuned encoder, what DAPT alone gives a retriever
    zero_shot, _ = score_splits(model, corpus, task, eval_batch)

    # data: (query, relevant document) pairs
    pairs = training_pairs(task["train"], {d["id"]: doc_text(d) for d in corpus})

    # trainer
    cuda = torch.cuda.is_available()
    steps_per_epoch = -(-len(pairs) // t.batch_size)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(scratch / "retrieval"), num_train_epochs=t.epochs, per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=eval_batch, learning_rate=t.learning_rate, weight_decay=t.weight_decay,
        warmup_steps=int(t.warmup_ratio * t.epochs * steps_per_epoch),
        # several queries share a relevant document: twice in a batch, it would be its own false negative
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        eval_strategy="epoch", save_strategy="epoch", save_total_limit=1, load_best_model_at_end=True,
        save_only_model=True,  # the best epoch's weights; no run resumes, so no optimiser state
        metric_for_best_model=BEST_METRIC, logging_steps=10, report_to="none", seed=seed,
        bf16=cuda and torch.cuda.is_bf16_supported(), dataloader_pin_memory=cuda)
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=pairs, loss=MultipleNegativesRankingLoss(model),
        evaluator=dev_evaluator(corpus, task["dev"], eval_batch), callbacks=list(callbacks))
    if t.patience is not None:  # the best epoch is kept either way (load_best_model_at_end)
        trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=t.patience))

    # train
    trainer.train()

    # evaluate: the dev-selected model (the best checkpoint's weights, loaded back into it), scored with ir-measures
    # (not the evaluator's numbers) on dev and test
    tuned, test_run = score_splits(model, corpus, task, eval_batch)
    metrics: dict = {}
    for prefix, scores in (("", tuned), ("zero_shot_", zero_shot)):
        for split in SPLITS:
            metrics.update({f"{prefix}{split}_{k}": v for k, v in mean_scores(scores[split]).items()})
    metrics["epochs_run"] = round(trainer.state.epoch or 0.0, 2)
    metrics["truncated"] = cut
    rows = [{"id": q["id"], "qrels": q["qrels"], "ranking": list(test_run[q["id"]])[:10],
             **tuned["test"][q["id"]], "zero_shot": zero_shot["test"][q["id"]]} for q in task["test"]]
    return metrics, rows
