"""End to end: the whole DAG through the Prefect flow on a tiny random BERT, in a temporary copy.

Asserts the outputs, the MLflow runs and their parent/child links, and that a second `dvc repro` reruns
nothing. Takes about three minutes on two cores.
"""

import json
import subprocess
import sys

import mlflow
import pytest
import yaml

from tests.smoke import ROOT, SMOKE_PARAMS, deep_update, git_env, make_workspace

_PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
VARIANTS, PRETRAINED = _PARAMS["finetune"]["variants"], _PARAMS["pretrain"]["variants"]

pytestmark = pytest.mark.e2e


def dvc(cwd, *args: str) -> str:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True, check=True,
                          env=git_env()).stdout


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A smoke workspace after one flow run; returns (workspace, stages run)."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import pipeline

    tmp = tmp_path_factory.mktemp("e2e")
    # two stages at once (each on one thread, SMOKE_PARAMS' runtime), pushed to a local DVC remote after the run
    ws = make_workspace(tmp / "ws", deep_update(SMOKE_PARAMS, {"pipeline": {"max_parallel": 2, "dvc_remote": "store"}}))
    dvc(ws, "remote", "add", "-d", "store", str(tmp / "remote"))
    subprocess.run(["git", "commit", "-qam", "a DVC remote"], cwd=ws, check=True, env=git_env())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{ws / 'mlflow.db'}")
        mp.setenv("PREFECT_HOME", str(tmp / "prefect"))
        mp.delenv("DAPT_MLFLOW_PARENT_RUN_ID", raising=False)
        with prefect_test_harness(server_startup_timeout=60):
            stages = pipeline(root=str(ws))
    return ws, stages


def test_outputs(finished):
    ws, stages = finished
    seeds = SMOKE_PARAMS["finetune"]["seeds"]
    assert stages[0] == "ingest" and stages[-1] == "compare"
    snapshots = SMOKE_PARAMS["pretrain"]["snapshots"]
    assert len(stages) == 4 + len(PRETRAINED) + (len(VARIANTS) + len(snapshots)) * len(seeds)
    for variant in VARIANTS:
        for seed in seeds:
            m = json.loads((ws / "results/finetune" / f"{variant}-{seed}" / "metrics.json").read_text())
            assert 0 <= m["test_macro_f1"] <= 1 and m["variant"] == variant and m["seed"] == seed
    compare = json.loads((ws / "metrics/compare.json").read_text())
    assert compare["seeds"] == len(seeds) and 0 <= compare["domain_macro_f1_mean"] <= 1
    report = (ws / "reports/comparison.md").read_text()
    assert report.startswith("# General vs domain-adapted model") and "| TF-IDF + LR, whole text |" in report
    max_len = SMOKE_PARAMS["finetune"]["training"]["max_seq_length"]
    assert f"| TF-IDF + LR, same text as the transformers (first {max_len} tokens) |" in report
    for figure in ("scores", "confusion", "adaptation_curve", "dapt_loss", "fertility"):
        assert (ws / "reports/figures" / f"{figure}.png").stat().st_size > 1000, figure
    assert "## Adaptation curve" in report and "## Forgetting probe: general text" in report
    assert (ws / "reports/comparison.html").read_text().count('src="data:image/png;base64,') == 5
    curve = (ws / "metrics/adaptation_curve.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in curve[1:]] == [*map(str, snapshots), "100"]
    for variant in PRETRAINED:
        pretrain = json.loads((ws / f"metrics/pretrain_{variant}.json").read_text())
        assert pretrain["stop_reason"] in {"max_steps", "patience", "general_degradation"}
        assert (ws / "models" / variant / "config.json").exists()
    assert "Gain from the new vocabulary (domain - domain_novocab" in report
    assert json.loads((ws / "metrics/adapt_tokenizer.json").read_text())["new_tokens"] > 0
    assert (ws / "models/domain/config.json").exists() and (ws / "models/general/config.json").exists()


def test_mlflow_runs_are_children_of_the_flow_run(finished):
    ws, stages = finished
    mlflow.set_tracking_uri(f"sqlite:///{ws / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["dapt"], output_format="list")
    parents = [r for r in runs if r.data.tags.get("stage") == "pipeline"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == len(stages)
    assert all(r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id for r in children)
    assert all(r.info.status == "FINISHED" for r in runs)
    assert {r.data.tags["stage"] for r in children} == {s.split("@")[0] for s in stages}
    finetune = {(r.data.tags["variant"], int(r.data.tags["seed"])) for r in children
                if r.data.tags["stage"] == "finetune" and "dapt_percent" not in r.data.tags}
    assert finetune == {(v, s) for v in VARIANTS for s in SMOKE_PARAMS["finetune"]["seeds"]}
    # the comparison is the parent of every fine-tuning run it compares (the adaptation curve's too)
    compare = next(r for r in children if r.data.tags["stage"] == "compare")
    compared = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == compare.info.run_id]
    assert len(compared) == sum(s.startswith("finetune") for s in stages)
    assert all({"variant", "seed"} <= set(r.data.tags) and "test_macro_f1" in r.data.metrics for r in compared)
    assert {r.data.tags["variant"] for r in children if r.data.tags["stage"] == "pretrain"} == set(PRETRAINED)
    pretrain = next(r for r in children if r.data.tags["stage"] == "pretrain"
                    and r.data.tags["variant"] == "domain")
    assert pretrain.data.params["max_steps"] == str(SMOKE_PARAMS["pretrain"]["max_steps"])
    assert "mlflow.source.git.commit" in pretrain.data.tags and "data.data/clean/domain_train" in pretrain.data.tags
    history = mlflow.MlflowClient().get_metric_history(pretrain.info.run_id, "eval_domain_loss")
    assert len(history) >= 2 and history[0].step < history[-1].step


def test_models_are_registered_and_the_verdict_names_the_champion(finished):
    ws, _ = finished
    mlflow.set_tracking_uri(f"sqlite:///{ws / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    versions = client.search_model_versions("name = 'dapt-encoder'")
    assert sorted(v.tags["variant"] for v in versions) == sorted(["general", *PRETRAINED])
    headline = json.loads((ws / "metrics/headline.json").read_text())
    champion = client.get_model_version_by_alias("dapt-encoder", "champion")
    assert champion.tags["variant"] == champion.tags["compare.favoured"] in ("general", "domain")
    assert champion.tags["compare.verdict"] == headline["verdict"]
    assert all("data.data/clean/domain_train" in v.tags for v in versions if v.tags["variant"] != "general")


def test_second_repro_reruns_nothing(finished):
    ws, _ = finished
    out = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=ws, capture_output=True, text=True, check=True)
    assert "Running stage" not in out.stdout
    assert "Data and pipelines are up to date" in out.stdout


def test_a_clone_with_dvc_pull_reproduces_without_rerunning(finished, tmp_path):
    """The flow pushed every cached output to the remote; git holds the rest (dvc.lock, uncached metrics)."""
    ws, _ = finished
    subprocess.run(["git", "add", "-A"], cwd=ws, check=True)
    subprocess.run(["git", "commit", "-qm", "a pipeline run"], cwd=ws, check=True, env=git_env())
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ws), str(clone)], check=True)
    dvc(clone, "pull")
    assert "Data and pipelines are up to date" in dvc(clone, "status")
    out = dvc(clone, "repro")
    assert "Running stage" not in out and "Data and pipelines are up to date" in out


def test_fine_tuning_side_by_side_gives_the_metrics_of_one_at_a_time(finished):
    """The flow ran two stages at once (max_parallel 2); two of its fine-tuning runs again, one after the other,
    give the same outputs, to the byte: DVC sees nothing changed downstream."""
    ws, _ = finished
    mlflow.set_tracking_uri(f"sqlite:///{ws / 'mlflow.db'}")
    runs = [r for r in mlflow.search_runs(experiment_names=["dapt"], output_format="list")
            if r.data.tags.get("stage") in ("finetune", "finetune_curve") and "role" not in r.data.tags]
    spans = sorted((r.info.start_time, r.info.end_time) for r in runs)
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])), "no two fine-tuning runs overlapped"
    stages = ["finetune@general-0", "finetune@domain-1"]
    before = {s: (ws / "results/finetune" / s.split("@")[1] / "metrics.json").read_text() for s in stages}
    for stage in stages:
        dvc(ws, "repro", "-f", "--single-item", stage)
    for stage in stages:
        assert (ws / "results/finetune" / stage.split("@")[1] / "metrics.json").read_text() == before[stage], stage
    assert "Data and pipelines are up to date" in dvc(ws, "status")
