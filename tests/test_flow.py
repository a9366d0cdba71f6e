"""Prefect flow: DVC's order, one task per stage, MLflow parent run, markdown artifact, the schedule."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pytest
import yaml

from flows import pipeline as flow_module

ROOT = Path(__file__).resolve().parents[1]


def test_stage_order_follows_dvc_graph():
    order = flow_module.stage_order(ROOT)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    runs = {f"finetune@{v}-{s}" for v in params["finetune"]["variants"] for s in params["finetune"]["seeds"]}
    curve = {f"finetune_curve@{at}-{s}" for at in params["pretrain"]["snapshots"] for s in params["finetune"]["seeds"]}
    pretrain = {f"pretrain@{v}" for v in params["pretrain"]["variants"]}
    assert set(order) == {"ingest", "clean", "adapt_tokenizer", "compare"} | pretrain | runs | curve
    assert all(pos_ < order.index("compare") and pos_ > order.index("pretrain@domain")
               for pos_ in map(order.index, curve))
    pos = order.index
    assert pos("ingest") < pos("clean") < pos("adapt_tokenizer") < min(map(pos, pretrain))
    assert all(pos(f"pretrain@{r.split('@')[1].rsplit('-', 1)[0]}") < pos(r) < pos("compare")
               for r in runs if "@domain" in r)
    assert order[-1] == "compare"


def test_deployment_schedule_comes_from_params():
    dep = flow_module.deployment(ROOT)
    cron = yaml.safe_load((ROOT / "params.yaml").read_text())["pipeline"]["cron"]
    assert dep.name == "dapt-scheduled" and dep.schedules[0].schedule.cron == cron


@pytest.fixture
def toy_repo(tmp_path, monkeypatch):
    """A two-stage DVC project whose stages record the MLflow parent run id they were given."""
    repo = tmp_path / "toy"
    repo.mkdir()
    (repo / "params.yaml").write_text("pipeline: {cron: '0 4 * * *'}\nfirst: {n: 1}\n")
    (repo / "dvc.yaml").write_text(textwrap.dedent("""
        stages:
          second:
            cmd: mkdir -p reports && (echo '# Toy report'; echo '![plot](figures/x.png)'; cat a.txt) > reports/comparison.md
            deps: [a.txt]
            outs: [reports/comparison.md]
          first:
            cmd: echo "parent=$DAPT_MLFLOW_PARENT_RUN_ID" > a.txt
            params: [first]
            outs: [a.txt]
        """))
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True, env=env)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    return repo


def test_flow_runs_each_stage_as_a_task_under_one_parent_run(toy_repo):
    from prefect.client.orchestration import get_client
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        assert flow_module.pipeline(root=str(toy_repo)) == ["first", "second"]
        with get_client(sync_client=True) as client:
            tasks = client.read_task_runs()
            artifacts = client.read_artifacts()
    assert sorted(t.name for t in tasks) == ["first", "second"]
    assert all(t.state.is_completed() for t in tasks)
    assert any(a.key == "dapt-comparison" and "# Toy report" in a.data and "![plot]" not in a.data for a in artifacts)

    parent_id = (toy_repo / "a.txt").read_text().strip().removeprefix("parent=")
    run = mlflow.MlflowClient().get_run(parent_id)
    assert run.data.tags["stage"] == "pipeline" and run.info.status == "FINISHED"
    out = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=toy_repo, capture_output=True, text=True)
    assert "up to date" in out.stdout
