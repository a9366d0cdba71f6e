"""clean: the stage on tiny shards: reasons counted, dedup and decontamination, samples and report, determinism
across task counts and engines, and the errors a user meets."""

import json
import random

import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from dapt.cleaning.filters import Normalise, fingerprint
from dapt.common import iter_texts, text_shards
from stages.clean import CleanParams, CleanStepError, is_validation, run
from tests.conftest import write_jsonl

STEPS = {"size": {"max_chars": 5000}, "normalise": {}, "length": {"min_words": 5},
         "gopher_repetition": {"min_top_count": 2}, "decontaminate": {"ngram": 8}}
WORDS = [f"{a}{b}" for a in ("licens", "grant", "warrant", "liabil", "copyright", "notic", "sourc", "binar",
                             "distribut", "modif", "patent", "trademark", "contribut", "deriv", "sublicens", "royalt",
                             "perpetu", "irrevoc", "jurisdict", "waiv") for b in "aeiou" + "bcdfghjklmnpqrs"]


def params(**overrides) -> CleanParams:
    base = {"steps": STEPS, "valid_fraction": 0.2, "max_valid_docs": 5, "general_max_docs": 10,
            "near_dedup": {"n_grams": 3, "bands": 20, "rows": 2}, "executor": {"tasks": 2, "workers": 1},
            "dropped_samples": 3}
    return CleanParams(**{**base, **overrides})


def distinct_docs(n: int = 60) -> list[dict]:
    """`n` documents of 30 words drawn from a 400-word vocabulary each, so no two are near-duplicates."""
    return [{"id": f"d{i}", "text": " ".join(random.Random(i).choices(WORDS, k=30)) + f" doc {i}."} for i in range(n)]


def make_project(project, extra_domain=(), duplicates=("copy", "near")) -> None:
    domain = distinct_docs()
    copies = {"copy": {"id": "copy", "text": domain[3]["text"].upper()},  # exact duplicate, case aside
              "near": {"id": "near", "text": domain[5]["text"].replace("doc 5.", "document number five.")}}
    domain += [
        {"id": "short", "text": "too short"},
        *(copies[name] for name in duplicates),
        {"id": "leak", "text": "The held out test NOTICE says  nothing else at all here"},
        {"id": "embeds",
         "text": "Preamble text first, then the held out test notice says nothing else at all, then more."},
        {"id": "huge", "text": "word " * 2000},
        {"id": "blank", "text": "  "},
        *extra_domain,
    ]
    (project.raw_domain).mkdir(parents=True)
    write_jsonl(project.raw_domain / "00000.jsonl", domain[:35])
    write_jsonl(project.raw_domain / "00001.jsonl", domain[35:])
    write_jsonl(project.raw_general, [{"id": f"g{i}", "text": f"general text number {i} about the wide world"}
                                      for i in range(30)])
    write_jsonl(project.task / "train.jsonl", [{"text": "a training example about the licence", "label": "a"}])
    write_jsonl(project.task / "dev.jsonl", [{"text": "x", "label": "a"}])
    write_jsonl(project.task / "test.jsonl", [{"text": "the held out test notice says nothing else at all here",
                                               "label": "a"}])


def outputs(project) -> dict[str, bytes]:
    files = [*text_shards(project.domain_train), project.domain_valid, project.general_valid,
             *text_shards(project.general_train)]
    return {str(p): p.read_bytes() for p in files}


def rows(path) -> list[dict]:
    """{"id", "text"} rows of a folder of Parquet shards, in order."""
    return [row for shard in text_shards(path) for row in pq.read_table(shard).to_pylist()]


def test_stage_counts_reasons_removes_duplicates_and_leaks(project):
    make_project(project)
    run(params(), project)

    metrics = json.loads((project.metrics / "clean.json").read_text())
    d = metrics["domain"]
    assert d["input_docs"] == 67
    assert d["dropped"]["length"] == {"too_short": 1}
    assert d["dropped"]["size"] == {"too_large": 1, "empty": 1}
    assert d["dropped"]["decontaminate"] == {"contaminated_exact": 1, "contaminated_ngram": 1}
    assert d["dropped"]["exact_dedup"] == {"duplicate": 1}
    assert d["dropped"]["near_dedup"] == {"near_duplicate": 1}
    assert d["kept"] == 60 == metrics["domain_train_docs"] + metrics["domain_valid_docs"]
    assert metrics["general_valid_docs"] == 10
    valid = {json.loads(x)["text"] for x in project.general_valid.read_text().splitlines()}
    rest = [t for batch in iter_texts(project.general_train) for t in batch]
    assert metrics["general_train_docs"] == len(rest) == len(set(rest)) > 0 and not valid & set(rest)
    train = rows(project.domain_train) + [json.loads(x) for x in project.domain_valid.read_text().splitlines()]
    assert len(train) == 60 and not any("held out" in d["text"] for d in train)
    assert not {"copy", "huge"} & {d["id"] for d in train}

    out = project.reports / "clean"
    assert json.loads((out / "dropped_length_too_short.jsonl").read_text())["text"] == "too short"
    report = (out / "report.md").read_text()
    assert "| decontaminate | contaminated_ngram | 1 |" in report
    assert "kept: " in report and "removed: " in report and "document numbe" in report
    assert "Thresholds: preset `web`" in report


def test_output_is_identical_across_task_counts_and_runs(project):
    make_project(project)
    run(params(executor={"tasks": 1, "workers": 1}), project)
    one = outputs(project)
    run(params(executor={"tasks": 2, "workers": 2}), project)
    assert outputs(project) == one


def test_training_text_is_parquet_shards_of_shard_docs_in_input_order(project):
    make_project(project)
    run(params(), project)
    one_shard = rows(project.domain_train), rows(project.general_train)
    run(params(shard_docs=7), project)
    shards = text_shards(project.domain_train)
    assert [s.name for s in shards[:2]] == ["part-00000.parquet", "part-00001.parquet"]
    sizes = [pq.ParquetFile(s).metadata.num_rows for s in shards]
    assert sizes[:-1] == [7] * (len(shards) - 1) and 1 <= sizes[-1] <= 7 and sum(sizes) == len(one_shard[0])
    meta = pq.ParquetFile(shards[0]).metadata
    assert meta.schema.to_arrow_schema().names == ["id", "text"] and meta.row_group(0).column(1).compression == "ZSTD"
    assert (rows(project.domain_train), rows(project.general_train)) == one_shard
    # survivors keep the input order: the train ids are an increasing run of d0 ... d59
    numbers = [int(d["id"][1:]) for d in one_shard[0]]
    assert numbers == sorted(numbers) and len(numbers) > 50
    assert len(text_shards(project.general_train)) == -(-len(one_shard[1]) // 7)


def test_ray_engine_in_local_mode_gives_the_same_output(project):
    ray = pytest.importorskip("ray")
    make_project(project)
    run(params(), project)
    local = outputs(project)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        run(params(executor={"engine": "ray", "tasks": 2, "workers": 2, "options": {"mem_per_cpu_gb": 0.5}}),
            project)
    finally:
        ray.shutdown()
    assert outputs(project) == local


def test_corpus_that_filters_to_nothing_is_a_clear_error(project):
    make_project(project)
    with pytest.raises(ValueError, match=r"no domain text survives the filters .*'length': \{'too_short': 65\}"):
        run(params(steps={**STEPS, "length": {"min_words": 1000, "max_words": 100000}}), project)
    assert not project.domain_train.exists()  # nothing half-written


@pytest.mark.parametrize("duplicates", [("copy",), ("near",), ()], ids=["no_near", "no_exact", "neither"])
def test_corpus_without_near_or_exact_duplicates_keeps_every_document(project, duplicates):
    # a curated corpus: datatrove's dedup phases find nothing and write no files, which once crashed the stage
    make_project(project, duplicates=duplicates)
    run(params(), project)

    d = json.loads((project.metrics / "clean.json").read_text())["domain"]
    assert d["input_docs"] == 65 + len(duplicates)
    assert d["dropped"].get("exact_dedup") == ({"duplicate": 1} if "copy" in duplicates else None)
    assert d["dropped"].get("near_dedup") == ({"near_duplicate": 1} if "near" in duplicates else None)
    kept = {r["id"] for r in rows(project.domain_train)} | {
        json.loads(x)["id"] for x in project.domain_valid.read_text().splitlines()}
    assert kept == {f"d{i}" for i in range(60)} and d["kept"] == 60  # every distinct document survives
    if "near" not in duplicates:
        assert "None found." in (project.reports / "clean" / "report.md").read_text()


def test_only_distinct_documents_with_no_filter_drops_all_survive(project):
    make_project(project)
    write_jsonl(project.raw_domain / "00000.jsonl", distinct_docs(30))
    write_jsonl(project.raw_domain / "00001.jsonl", distinct_docs(60)[30:])
    run(params(), project)
    metrics = json.loads((project.metrics / "clean.json").read_text())
    assert metrics["domain"]["dropped"] == {} and metrics["domain"]["kept"] == 60
    assert metrics["domain_train_docs"] + metrics["domain_valid_docs"] == 60


def test_a_failing_phase_names_the_step_and_the_corpus(project, monkeypatch):
    make_project(project)

    def broken(self, *args, **kwargs):
        raise OSError("disk full in /tmp/.clean-x/domain/mh_remove")

    monkeypatch.setattr("datatrove.pipeline.dedup.MinhashDedupCluster.run", broken)
    with pytest.raises(CleanStepError, match=r"^clean: step 'near_cluster' failed on the domain corpus "
                                             r"\(data/raw/domain\): OSError: disk full") as info:
        run(params(), project)
    assert isinstance(info.value.__cause__, OSError)
    assert not project.domain_train.exists()


def test_a_failing_filter_names_the_phase_and_the_corpus(project, monkeypatch):
    make_project(project)

    def broken(self, text: str) -> str:
        raise ValueError("cannot normalise")

    monkeypatch.setattr(Normalise, "format", broken)
    with pytest.raises(CleanStepError, match=r"step 'filter' failed on the domain corpus \(data/raw/domain\): "
                                             r"ValueError: cannot normalise"):
        run(params(executor={"tasks": 1, "workers": 1}), project)


def test_split_is_by_hash_not_position():
    fps = [fingerprint(f"doc {i}") for i in range(1000)]
    share = sum(is_validation(fp, 0.1) for fp in fps) / len(fps)
    assert 0.07 < share < 0.13 and is_validation(fingerprint("Doc  0"), 0.1) == is_validation(fps[0], 0.1)


def test_unknown_step_or_option_names_the_key():
    with pytest.raises(ValidationError, match="clean.steps.gopher: unknown step"):
        params(steps={"gopher": {}})
    with pytest.raises(ValidationError, match="clean.steps.size: .*max_char"):
        params(steps={"size": {"max_char": 3}})


def test_preset_supplies_thresholds_under_the_params_and_a_bad_one_is_named():
    p = params(preset="scientific", steps={"gopher_quality": {"min_doc_words": 40}, "language": {"languages": ["en"]}})
    assert p.steps["gopher_quality"] == {"min_doc_words": 40}  # what params.yaml says, as MLflow logs it
    assert p.pipeline_steps["gopher_quality"]["min_doc_words"] == 40  # params over the preset
    assert p.pipeline_steps["gopher_quality"]["max_non_alpha_words_ratio"] == 0.6  # the preset's
    assert p.pipeline_steps["language"] == {"languages": ["en"], "threshold": 0.5}
    assert params().preset == "web"
    with pytest.raises(ValidationError, match="preset"):
        params(preset="news")
    with pytest.raises(ValidationError, match="clean.steps.gopher_quality: .*min_doc_word"):
        params(preset="legal", steps={"gopher_quality": {"min_doc_word": 3}})


def test_shard_docs_must_be_positive():
    with pytest.raises(ValidationError, match="shard_docs"):
        params(shard_docs=0)
