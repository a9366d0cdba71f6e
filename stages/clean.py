"""clean: normalise, filter, deduplicate (exact and near) and decontaminate the domain text; split train/valid.

The blocks are datatrove pipeline steps (`dapt.cleaning.filters`), listed in order under `clean.steps` in params.yaml;
each can be switched off. `clean.preset` (web, scientific, legal: `dapt.cleaning.filters.PRESETS`) supplies the quality
steps' thresholds for that kind of text; a key written under `clean.steps.<step>` overrides the preset's. The
corpus streams through them shard by shard on datatrove's executors, the way FineWeb was built:

1. filter:  read shards -> steps -> write survivors -> exact-dedup signatures
2. exact:   find exact duplicates (hash of the case- and space-normalised text) -> drop them -> MinHash signatures
3. near:    MinHash LSH over word n-grams (bands x rows in params) -> clusters -> keep one per cluster
4. merge:   survivors in input order -> train/validation split by a hash of the text -> outputs

The training text (domain, and general for replay) is written as a folder of zstd Parquet shards,
`part-00000.parquet`, ... of `shard_docs` documents each, with columns `id` and `text`: what 🤗 `datasets`
reads in parallel (`dapt.common.iter_texts` streams it too). The validation sets stay small JSONL files.

A phase that fails raises a `CleanStepError` naming the phase and the corpus it was cleaning (domain or general,
and its input path): the intermediate files it names are gone by then.

Every drop has a named reason: per-reason counts go to `metrics/clean.json` and MLflow, and the first
`dropped_samples` documents of each reason to `reports/clean/dropped_<step>_<reason>.jsonl`. `reports/clean/
report.md` shows the counts, near-duplicate pairs and the task's own train/test overlap.
`clean.executor.engine` picks datatrove's local executor (processes on this machine) or its Ray executor
(a Ray cluster, or a local Ray when none is configured). Nothing holds the corpus in memory: shards stream,
and dedup works on signatures on disk.

Run: `dvc repro clean` (or `python -m stages.clean`).
"""

from __future__ import annotations

import contextlib
import heapq
import json
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from dapt import tracking
from dapt.cleaning.filters import (
    PRESETS,
    Decontaminate,
    build_steps,
    check_steps,
    fingerprint,
    named,
    plain_row,
    preset_steps,
)
from dapt.common import (
    Paths,
    Section,
    TextShardWriter,
    atomic_path,
    load_params,
    load_paths,
    log,
    read_jsonl,
    setup_stage,
    write_json,
)


class NearDedupParams(Section):
    enabled: bool = True
    n_grams: int = Field(default=5, ge=1)
    bands: int = Field(default=14, ge=1)
    rows: int = Field(default=8, ge=1)
    seed: int = 1
    strip_diacritics: bool = False


class ExecutorParams(Section):
    engine: Literal["local", "ray"] = "local"
    tasks: int = Field(default=1, ge=1)
    workers: int = Field(default=1, ge=1)
    options: dict[str, Any] = {}


class CleanParams(Section):
    # the thresholds of the quality steps for a kind of text; "web" (the published FineWeb ones) when not given
    preset: Literal[tuple(PRESETS)] = "web"
    steps: dict[str, dict[str, Any] | None]
    exact_dedup: bool = True
    near_dedup: NearDedupParams = NearDedupParams()
    valid_fraction: float = Field(gt=0, lt=0.5)
    max_valid_docs: int = Field(ge=1)
    general_max_docs: int = Field(ge=1)
    shard_docs: int = Field(default=100_000, ge=1)
    dropped_samples: int = Field(default=20, ge=0)
    executor: ExecutorParams = ExecutorParams()
    work_dir: str | None = None

    @model_validator(mode="after")
    def _steps(self) -> CleanParams:
        check_steps(self.pipeline_steps)
        return self

    @property
    def pipeline_steps(self) -> dict[str, dict[str, Any]]:
        """What runs: `steps` in order, each with the preset's options under the ones written in params.yaml."""
        return preset_steps(self.preset, self.steps)


# ---------------------------------------------------------------------------------------------------
# datatrove plumbing (module level: executors pickle these into worker processes)


def read_doc(self, data: dict, path: str, id_in_file: int) -> dict:
    """Reader adapter: remember where each document came from, so the output keeps the input order."""
    text = data.get("text")
    return {"text": text if isinstance(text, str) else "", "id": str(data.get("id", f"{path}:{id_in_file}")),
            "metadata": {"src": path, "line": id_in_file}}


def dedup_key(doc) -> bytes:
    """What exact dedup compares: the text with case and spacing ignored (bytes: datatrove hashes it as is)."""
    return " ".join(doc.text.lower().split()).encode("utf-8")


def shards(path: Path) -> tuple[str, str]:
    """A JSONL file, or a folder of them, as datatrove's (data_folder, glob_pattern). The folder is absolute:
    fsspec caches a filesystem per path string, and a relative one would keep reading the first working
    directory's files in a process that cleans in another (the tests do)."""
    if path.is_dir():
        return str(path.resolve()), "*.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"clean: input {path} does not exist; run `dvc repro ingest` first")
    return str(path.parent.resolve()), path.name


def executor(p: ExecutorParams, pipeline: list, logs: Path, tasks: int | None = None):
    tasks = p.tasks if tasks is None else tasks
    if p.engine == "ray":
        import ray
        from datatrove.executor.ray import RayPipelineExecutor

        if not ray.is_initialized():
            # joins the cluster in RAY_ADDRESS when set, else starts a local Ray on this machine
            ray.init(include_dashboard=False, log_to_driver=False)
        return RayPipelineExecutor(pipeline, tasks=tasks, workers=p.workers, logging_dir=str(logs), **p.options)
    from datatrove.executor import LocalPipelineExecutor

    return LocalPipelineExecutor(pipeline, tasks=tasks, workers=min(p.workers, tasks), logging_dir=str(logs),
                                 **p.options)


def step_stats(logs: Path) -> dict[str, dict[str, int]]:
    """Per-step counters from datatrove's merged stats: {step name: {counter: value}}."""
    out: dict[str, dict[str, int]] = {}
    for step in json.loads((logs / "stats.json").read_text()):
        counters = {k: int(v["total"] if isinstance(v, dict) else v) for k, v in step["stats"].items()}
        out[step["name"]] = counters
    return out


# datatrove's dedup filters drop without a reason; these name them
UNNAMED = {"exact_dedup": "duplicate", "near_dedup": "near_duplicate"}


def drops(stats: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """{step: {reason: count}} from datatrove's `dropped_<reason>` counters."""
    out = {}
    for name, counters in stats.items():
        reasons = {k.removeprefix("dropped_"): v for k, v in counters.items() if k.startswith("dropped_")}
        unnamed = counters.get("dropped", 0) - sum(reasons.values())
        if unnamed > 0:
            reasons[UNNAMED.get(name, "dropped")] = unnamed
        if reasons:
            out[name] = reasons
    return out


def iter_rank_files(folder: Path) -> Iterator[dict]:
    """Survivors of all tasks, merged back into input order (file, line): independent of the task count."""
    files = sorted(folder.glob("*.jsonl"))

    def rows(f: Path) -> Iterator[dict]:
        with f.open(encoding="utf-8") as fh:
            for line in fh:
                yield json.loads(line)

    yield from heapq.merge(*(rows(f) for f in files), key=lambda d: (d["metadata"]["src"], d["metadata"]["line"]))


class CleanStepError(RuntimeError):
    """A cleaning phase failed; the message names the phase and the user's corpus, not just a temporary path."""


@contextlib.contextmanager
def failing_step(step: str, corpus: str, source: Path) -> Iterator[None]:
    """Re-raises an error inside `step` as a `CleanStepError` that names the step, the corpus and its input."""
    try:
        yield
    except CleanStepError:
        raise
    except Exception as e:
        detail = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        raise CleanStepError(f"clean: step {step!r} failed on the {corpus} corpus ({source}): {detail}") from e


# ---------------------------------------------------------------------------------------------------
# the four phases


def filter_and_dedup(p: CleanParams, corpus: str, source: Path, work: Path, samples: Path | None, context: dict,
                     dedup: bool, skip: tuple[str, ...] = ()) -> tuple[Path, dict, dict[str, float]]:
    """Runs the steps and the dedup phases on `source` (the `corpus`: domain or general); returns the folder of
    survivors, the stats and the seconds each phase took."""
    from datatrove.pipeline.dedup import MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter
    from datatrove.pipeline.dedup.exact_dedup import (
        ExactDedupConfig,
        ExactDedupFilter,
        ExactDedupSignature,
        ExactFindDedups,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig
    from datatrove.utils.text import TextNormConfig

    from dapt.cleaning.filters import DropSampleWriter, FastMinhashSignature

    folder, glob = shards(source)
    n_files = len(list(Path(folder).glob(glob)))
    if n_files == 0:
        raise FileNotFoundError(f"clean: no {glob} files in {folder}")
    tasks = min(p.executor.tasks, n_files)
    stats: dict[str, dict[str, int]] = {}
    seconds: dict[str, float] = {}

    def phase(name: str, pipeline: list, n_tasks: int = tasks, output: str | None = None) -> bool:
        """Runs one phase; False when it left no documents (the later phases have nothing to read)."""
        with failing_step(name, corpus, source):
            start = time.perf_counter()
            executor(p.executor, pipeline, work / "logs" / name, n_tasks).run()
            seconds[name] = time.perf_counter() - start
            stats.update(step_stats(work / "logs" / name))
            if output is None:
                return True
            # a task whose documents were all dropped writes no file; an empty one keeps file i = task i for the
            # next phase's reader, whose dedup decisions are indexed by task
            (work / output).mkdir(parents=True, exist_ok=True)
            for rank in range(n_tasks):
                (work / output / f"{rank:05d}.jsonl").touch()
            return any(f.stat().st_size for f in (work / output).glob("*.jsonl"))

    def write(name: str):
        return JsonlWriter(str(work / name), output_filename="${rank}.jsonl", compression=None, adapter=plain_row)

    def read(folder: str | Path, **options):
        # metadata.src names the shard: datatrove's absolute `file_path` would cost a path resolution per document
        # and put this machine's paths in the samples
        return JsonlReader(str(folder), add_file_path=False, **options)

    exact = ExactDedupConfig(content_getter=dedup_key, hash_config=HashConfig(precision=64))
    near = MinhashConfig(n_grams=p.near_dedup.n_grams, num_buckets=p.near_dedup.bands,
                         hashes_per_bucket=p.near_dedup.rows, seed=p.near_dedup.seed,
                         norm_config=TextNormConfig(norm_unicode_diacritics=p.near_dedup.strip_diacritics))
    tail = [ExactDedupSignature(str(work / "exact_sigs"), exact)] if dedup and p.exact_dedup else []
    steps = build_steps(p.pipeline_steps, context, samples, p.dropped_samples, skip)
    if not phase("filter", [read(folder, glob_pattern=glob, adapter=read_doc), *steps, write("filtered"),
                            *tail], output="filtered"):
        return work / "filtered", stats, seconds
    current = "filtered"
    if dedup and p.exact_dedup:
        phase("exact_find", [ExactFindDedups(str(work / "exact_sigs"), str(work / "exact_dups"), exact)], 1)
        drop = ExactDedupFilter(str(work / "exact_dups"), exact,
                                DropSampleWriter(samples / "exact_dedup", p.dropped_samples, UNNAMED["exact_dedup"]))
        named(drop, "exact_dedup")
        if not phase("exact_filter", [read(work / current), drop, write("exact")], output="exact"):
            return work / "exact", stats, seconds
        current = "exact"
    if dedup and p.near_dedup.enabled:
        sig = FastMinhashSignature(str(work / "mh_sigs"), near)  # words split at whitespace
        named(sig, "near_dedup_signatures")
        phase("near_sigs", [read(work / current), sig])
        phase("near_buckets", [MinhashDedupBuckets(str(work / "mh_sigs"), str(work / "mh_buckets"), config=near)],
              near.num_buckets)
        phase("near_cluster", [MinhashDedupCluster(str(work / "mh_buckets"), str(work / "mh_remove"), config=near,
                                                   save_cluster_id=True)], 1)
        with failing_step("near_cluster", corpus, source):
            # datatrove writes no files (not even the folder) for a task without near-duplicates, which a curated
            # corpus has none of; its filter then skips the task before it loads the cluster ids the report needs,
            # or fails for want of a .clusters file: empty ones say "nothing to remove" to both
            (work / "mh_remove").mkdir(parents=True, exist_ok=True)
            for rank in range(tasks):
                for suffix in ("remove", "clusters"):
                    (work / "mh_remove" / f"{rank:06d}.{suffix}").touch()
        drop = MinhashDedupFilter(str(work / "mh_remove"), DropSampleWriter(samples / "near_dedup", p.dropped_samples,
                                                                   UNNAMED["near_dedup"]),
                                  load_cluster_ids=True)
        named(drop, "near_dedup")
        phase("near_filter", [read(work / current), drop, write("near")], output="near")
        current = "near"
    return work / current, stats, seconds


def is_validation(fp: str, fraction: float) -> bool:
    """Hash-based split: the first 8 hex digits of the fingerprint as a number in [0, 1)."""
    return int(fp[:8], 16) / 16**8 < fraction


def write_split(survivors: Path, p: CleanParams, train_path: Path, valid_path: Path) -> dict[str, int]:
    """Two streaming passes: choose the validation fingerprints (the `max_valid_docs` lowest hashes under
    `valid_fraction`, so the choice is stable), then write every survivor to train (Parquet shards) or
    validation (JSONL)."""
    candidates: list[str] = []  # a max-heap of the smallest hashes, as negated ints
    for doc in iter_rank_files(survivors):
        fp = fingerprint(doc["text"])
        if is_validation(fp, p.valid_fraction):
            item = -int(fp, 16)
            if len(candidates) < p.max_valid_docs:
                heapq.heappush(candidates, item)
            elif item > candidates[0]:
                heapq.heapreplace(candidates, item)
    chosen = {-c for c in candidates}
    counts = Counter()
    with atomic_path(train_path) as tmp_train, atomic_path(valid_path) as tmp_valid, \
            TextShardWriter(tmp_train, p.shard_docs) as train, tmp_valid.open("w", encoding="utf-8") as valid:
        for doc in iter_rank_files(survivors):
            is_valid = int(fingerprint(doc["text"]), 16) in chosen
            if is_valid:
                valid.write(json.dumps({"id": doc["id"], "text": doc["text"]}, ensure_ascii=False) + "\n")
                counts["domain_valid_docs"] += 1
            else:
                train.write(doc["id"], doc["text"])
                counts["domain_train_docs"] += 1
                counts["domain_train_words"] += len(doc["text"].split())
    return dict(counts)


def pick_general(survivors: Path, n: int, path: Path, rest: Path, shard_docs: int) -> tuple[int, int]:
    """The `n` general texts with the lowest hashes (distinct texts), a stable sample of any size corpus, to
    `path` (validation, JSONL); the other distinct texts to `rest` (replay during pretraining, Parquet shards of
    `shard_docs`). Returns both counts."""
    seen: set[str] = set()
    best: list[tuple[int, str, str]] = []  # a max-heap of the lowest hashes, as negated ints
    for doc in iter_rank_files(survivors):
        fp = fingerprint(doc["text"])
        if fp in seen:
            continue
        seen.add(fp)
        item = (-int(fp, 16), doc["id"], doc["text"])
        if len(best) < n:
            heapq.heappush(best, item)
        elif item[0] > best[0][0]:
            heapq.heapreplace(best, item)
    rows = [{"id": i, "text": t} for _, i, t in sorted(best, reverse=True)]
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    chosen, written = {fingerprint(r["text"]) for r in rows}, 0
    with atomic_path(rest) as tmp, TextShardWriter(tmp, shard_docs) as f:
        for doc in iter_rank_files(survivors):
            fp = fingerprint(doc["text"])
            if fp not in chosen:
                chosen.add(fp)  # and each text once
                f.write(doc["id"], doc["text"])
                written += 1
    return len(rows), written


# ---------------------------------------------------------------------------------------------------
# what a person checks: dropped samples, near-duplicate pairs, the task's own overlap


SAMPLE_CHARS = 3000


def gather_samples(samples: Path, out: Path, per_reason: int) -> dict[str, Path]:
    """`samples/<step>/<reason>/<rank>.jsonl` -> `out/dropped_<step>_<reason>.jsonl` (first `per_reason`)."""
    written = {}
    for reason_dir in sorted(d for d in samples.glob("*/*") if d.is_dir()):
        step, reason = reason_dir.parent.name, reason_dir.name
        rows = [json.loads(line) for f in sorted(reason_dir.glob("*.jsonl"))
                for line in f.read_text("utf-8").splitlines()][:per_reason]
        for row in rows:  # enough to judge the filter; a 1 MB "document" would bloat the repository
            row.setdefault("text", "")  # datatrove's writer leaves out an empty text
            if len(row["text"]) > SAMPLE_CHARS:
                row["metadata"]["chars"] = len(row["text"])
                row["text"] = row["text"][:SAMPLE_CHARS] + " [...]"
        target = out / f"dropped_{step}_{reason}.jsonl"
        target.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        written[f"{step}/{reason}"] = target
    return written


def near_pairs(samples: Path, survivors: Path, n: int = 5) -> list[dict]:
    """Removed near-duplicates next to the document kept from the same MinHash cluster."""
    removed = {}
    for f in sorted((samples / "near_dedup").glob("*/*.jsonl")):
        for line in f.read_text("utf-8").splitlines():
            doc = json.loads(line)
            removed.setdefault(doc["metadata"].get("minhash_cluster_id", -1), doc)
    removed.pop(-1, None)
    wanted = dict(list(removed.items())[:n])
    pairs = []
    for doc in iter_rank_files(survivors):
        cluster = doc["metadata"].get("minhash_cluster_id", -1)
        if cluster in wanted:
            pairs.append({"kept": doc["text"], "removed": wanted.pop(cluster)["text"]})
    return pairs


def task_texts(task: Path) -> dict[str, list[str]]:
    """What decontamination needs from the task: the evaluation (dev + test) texts and the train texts."""
    return {"eval_texts": [ex["text"] for s in ("dev", "test") for ex in read_jsonl(task / f"{s}.jsonl")],
            "train_texts": [ex["text"] for ex in read_jsonl(task / "train.jsonl")]}


def task_overlap(texts: dict[str, list[str]]) -> dict[str, int]:
    """Task train texts that duplicate a dev/test text, exactly or nearly (the split leaks if these are many)."""
    index = Decontaminate(texts["eval_texts"], [], ngram=0)
    counts = Counter(index.reasons(texts["train_texts"]))
    return {"train_exact_in_dev_test": counts["exact"], "train_near_in_dev_test": counts["near"]}


def _excerpt(text: str, n: int = 300) -> str:
    text = " ".join(text.split())
    return (text[:n] + " ...") if len(text) > n else text


def report(metrics: dict, pairs: list[dict], sample_files: dict[str, Path], preset: str) -> str:
    d = metrics["domain"]
    lines = ["# Cleaning report", "",
             f"Domain: {d['input_docs']:,} documents in ({d['input_mb']:.1f} MB), {d['kept']:,} kept "
             f"({metrics['domain_train_docs']:,} train, {metrics['domain_valid_docs']:,} validation). "
             f"General: {metrics['general']['input_docs']:,} in, {metrics['general_valid_docs']:,} used.", "",
             f"Thresholds: preset `{preset}` (dapt/cleaning/filters.py `PRESETS`), under the keys written in "
             f"params.yaml `clean.steps`. Another kind of text: "
             f"`dvc exp run -S clean.preset=<{' | '.join(PRESETS)}>`.", "",
             "## Drops by step and reason (domain, in pipeline order)", "",
             "| step | reason | documents | sample |", "|---|---|---|---|"]
    for step, reasons in d["dropped"].items():
        for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
            sample = sample_files.get(f"{step}/{reason}")
            lines.append(f"| {step} | {reason} | {n:,} | {sample.name if sample else ''} |")
    overlap = metrics["task_overlap"]
    lines += ["", "## Decontamination", "",
              "Domain documents dropped because they overlap the task's dev/test texts: "
              + ", ".join(f"{r.removeprefix('contaminated_')} {n:,}"
                          for r, n in d["dropped"].get("decontaminate", {}).items()) + ".",
              f"Inside the task, train texts that duplicate a dev/test text: exact "
              f"{overlap['train_exact_in_dev_test']:,}, near (5-gram Jaccard >= 0.8) "
              f"{overlap['train_near_in_dev_test']:,}.", "",
              "## Near-duplicates removed (MinHash LSH), with the document kept from each cluster", ""]
    for i, pair in enumerate(pairs, 1):
        lines += [f"{i}. kept: {_excerpt(pair['kept'])}", f"   removed: {_excerpt(pair['removed'])}", ""]
    if not pairs:
        lines.append("None found.")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------


def corpus_size(source: Path) -> tuple[int, float]:
    folder, glob = shards(source)
    files = sorted(Path(folder).glob(glob))
    docs = 0
    for f in files:
        with f.open("rb") as fh:
            docs += sum(1 for _ in fh)
    return docs, sum(f.stat().st_size for f in files) / 1e6


def run(p: CleanParams, paths: Paths) -> None:
    """Clean domain and general text, write the splits, per-reason counts, samples and the report."""
    with tracking.stage_run("clean", p):
        out_dir = paths.reports / "clean"
        parent = Path(p.work_dir) if p.work_dir else paths.domain_train.parent
        parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".clean-", dir=parent)).resolve()  # absolute: see `shards`
        try:
            context = task_texts(paths.task)
            samples = work / "samples"
            domain_out, domain_stats, _ = filter_and_dedup(p, "domain", paths.raw_domain, work / "domain", samples,
                                                           context, True)
            general_out, general_stats, _ = filter_and_dedup(p, "general", paths.raw_general, work / "general", None,
                                                             context, False, skip=("decontaminate",))
            metrics: dict[str, Any] = {}
            for name, source, stats in (("domain", paths.raw_domain, domain_stats),
                                        ("general", paths.raw_general, general_stats)):
                docs, mb = corpus_size(source)
                dropped = drops(stats)
                kept = docs - sum(n for reasons in dropped.values() for n in reasons.values())
                metrics[name] = {"input_docs": docs, "input_mb": round(mb, 2), "kept": kept, "dropped": dropped}
                if kept == 0:
                    raise ValueError(f"clean: no {name} text survives the filters ({source}); drops by step and "
                                     f"reason: {dropped}. Loosen the thresholds in params.yaml clean.steps")
            metrics.update(write_split(domain_out, p, paths.domain_train, paths.domain_valid))
            metrics["general_valid_docs"], metrics["general_train_docs"] = pick_general(
                general_out, p.general_max_docs, paths.general_valid, paths.general_train, p.shard_docs)
            for key in ("domain_train_docs", "domain_valid_docs"):
                if not metrics.get(key):
                    raise ValueError(f"clean: {key} is 0; the domain corpus is too small after cleaning "
                                     f"({metrics['domain']['kept']} documents kept)")
            metrics["task_overlap"] = task_overlap(context)
            with atomic_path(out_dir) as tmp:
                tmp.mkdir(parents=True)
                sample_files = gather_samples(samples, tmp, p.dropped_samples)
                pairs = near_pairs(samples, domain_out)
                (tmp / "near_duplicates.jsonl").write_text(
                    "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in pairs), encoding="utf-8")
                (tmp / "report.md").write_text(report(metrics, pairs, sample_files, p.preset), encoding="utf-8")
        finally:
            shutil.rmtree(work, ignore_errors=True)
        write_json(paths.metrics / "clean.json", metrics)
        tracking.log_metrics(metrics)
        tracking.log_artifacts(out_dir, artifact_path="clean")
        log.info("clean: %s", json.dumps(metrics))


def main() -> None:
    setup_stage()
    run(load_params("clean", CleanParams), load_paths())


if __name__ == "__main__":
    main()
