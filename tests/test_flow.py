"""Prefect flow: DVC's order, one task per stage, MLflow parent run, markdown artifact, the schedule."""

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
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
            cmd: mkdir -p reports && (echo '# Toy report'; echo '![plot](figures/x.png)'; cat a.txt)
              > reports/comparison.md
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


def test_prefect_yaml_deploys_the_flow_with_the_schedule_and_limit_of_serve():
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"][0]
    served = flow_module.deployment(ROOT)
    pipeline = flow_module.settings(ROOT)
    assert spec["entrypoint"] == "flows/pipeline.py:pipeline"
    assert spec["schedules"] == [{"cron": pipeline.cron, "timezone": pipeline.timezone}]
    assert spec["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
    assert served.concurrency_limit == 1 and served.concurrency_options.collision_strategy == "ENQUEUE"


def test_overlapping_runs_of_the_work_pool_deployment_wait_and_both_complete(toy_repo, monkeypatch):
    """`prefect deploy` from prefect.yaml, two runs triggered at once, one process worker: the second run waits
    for a concurrency slot (AwaitingConcurrencySlot) and starts after the first has finished."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    dvc_yaml = toy_repo / "dvc.yaml"  # a first stage long enough for the runs to overlap
    dvc_yaml.write_text(dvc_yaml.read_text().replace('cmd: echo "parent', 'cmd: sleep 3 && echo "parent'))
    # the server retries a queued run after this many seconds (30 by default)
    monkeypatch.setenv("PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS", "1")
    with prefect_test_harness(server_startup_timeout=60):
        env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_WORKER_QUERY_SECONDS": "1"}
        with get_client(sync_client=True) as client:
            client.create_work_pool(WorkPoolCreate(name="dapt", type="process"))
        prefect = [sys.executable, "-m", "prefect"]
        subprocess.run([*prefect, "--no-prompt", "deploy", "--name", "dapt-pool", "--params",
                        json.dumps({"root": str(toy_repo)})], cwd=ROOT, env=env, check=True, capture_output=True)
        runs = [run_deployment("dapt-pipeline/dapt-pool", timeout=0) for _ in range(2)]
        worker = subprocess.Popen([*prefect, "worker", "start", "--pool", "dapt"], cwd=ROOT, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            with get_client(sync_client=True) as client:
                deadline = time.monotonic() + 240
                while time.monotonic() < deadline:
                    runs = [client.read_flow_run(r.id) for r in runs]
                    if all(r.state.is_final() for r in runs):
                        break
                    time.sleep(1)
                histories = [[s.name for s in client.read_flow_run_states(r.id)] for r in runs]
        finally:
            worker.terminate()
            worker.wait(30)
    assert all(r.state.is_completed() for r in runs), [r.state for r in runs]
    first, second = sorted(runs, key=lambda r: r.start_time)
    for r, states in zip(runs, histories):  # the timeline, with -s
        print(f"{r.name}: created {r.created:%H:%M:%S.%f}, started {r.start_time:%H:%M:%S.%f}, "
              f"ended {r.end_time:%H:%M:%S.%f}; states {states}")
    assert first.end_time <= second.start_time
    assert any("AwaitingConcurrencySlot" in h for h in histories), histories


def test_independent_stages_run_side_by_side_and_dvc_records_both(toy_repo):
    from prefect.testing.utilities import prefect_test_harness

    # two stages that depend on nothing: with max_parallel 2 they overlap (each notes when it ran)
    (toy_repo / "dvc.yaml").write_text(textwrap.dedent("""
        stages:
          left:
            cmd: date +%s.%N > left.txt && sleep 2 && date +%s.%N >> left.txt
            outs: [left.txt]
          right:
            cmd: date +%s.%N > right.txt && sleep 2 && date +%s.%N >> right.txt
            outs: [right.txt]
        """))
    (toy_repo / "params.yaml").write_text("pipeline: {cron: '0 4 * * *', max_parallel: 2}\n")
    with prefect_test_harness(server_startup_timeout=60):
        assert sorted(flow_module.pipeline(root=str(toy_repo))) == ["left", "right"]
    (l0, l1), (r0, r1) = ([float(t) for t in (toy_repo / f).read_text().split()] for f in ("left.txt", "right.txt"))
    assert l0 < r1 and r0 < l1  # they overlapped
    out = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=toy_repo, capture_output=True, text=True)
    assert "up to date" in out.stdout


def test_a_stage_waits_for_dvc_s_lock_and_its_failure_names_the_command(monkeypatch):
    calls = []
    monkeypatch.setattr(flow_module, "stream", lambda cmd, *a: calls.append(cmd) or 1)
    monkeypatch.setattr(flow_module, "get_run_logger", lambda: logging.getLogger("test"))
    with pytest.raises(RuntimeError, match="dvc --wait-for-lock repro --single-item x failed with exit code 1"):
        flow_module.run_stage.fn("x", ".", {})
    assert calls == [["dvc", "--wait-for-lock", "repro", "--single-item", "x"]]


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append((record.levelname, record.getMessage()))


def test_stage_output_keeps_its_levels_and_a_progress_bar_is_not_a_line_per_update():
    logger = logging.getLogger("test-stage-log")
    logger.setLevel(logging.INFO)
    handler = Records()
    logger.addHandler(handler)
    log = flow_module.StageLog(logger, progress_every=3600)
    bar = "".join(f"\rMap: {i:3d}%|###| {i}/100" for i in range(0, 101, 5))
    for chunk in ("2026-12-06 10:00:00,123 stages.clean WARNING 3 shards are empty\r", "\n", bar[:70], bar[70:], "\n",
                  "ERROR: failed to reproduce 'clean'\n", "/x/y.py:3: UserWarning: careful\n",
                  "Traceback (most recent call last):\n", '  File "x.py", line 1\n', "ValueError: bad\n",
                  "Running stage 'clean':\nlast line without newline"):
        log.feed(chunk)
    log.close()
    logger.removeHandler(handler)
    assert handler.records == [
        ("WARNING", "2026-12-06 10:00:00,123 stages.clean WARNING 3 shards are empty"),
        ("INFO", "Map:   0%|###| 0/100"),  # the first redraw, then none until its line ends
        ("INFO", "Map: 100%|###| 100/100"),
        ("ERROR", "ERROR: failed to reproduce 'clean'"),
        ("WARNING", "/x/y.py:3: UserWarning: careful"),
        ("ERROR", "Traceback (most recent call last):"), ("ERROR", '  File "x.py", line 1'),
        ("ERROR", "ValueError: bad"),
        ("INFO", "Running stage 'clean':"), ("INFO", "last line without newline")]


def test_each_stage_sees_its_own_gpu_or_its_share_of_the_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert flow_module.slot_env({}, ["3"], 4)["CUDA_VISIBLE_DEVICES"] == "3"
    assert flow_module.slot_env({}, ["0", "1"], 1)["CUDA_VISIBLE_DEVICES"] == "0,1"  # a launcher's stage: all
    monkeypatch.setattr(flow_module.os, "cpu_count", lambda: 8)
    assert flow_module.slot_env({}, [], 2) == {"OMP_NUM_THREADS": "4"}
    assert flow_module.slot_env({"OMP_NUM_THREADS": "1"}, [], 2) == {"OMP_NUM_THREADS": "1"}  # the user's
    assert flow_module.slot_env({}, [], 1) == {}
    assert flow_module.exclusive("torchrun --nproc_per_node 4 -m stages.pretrain --variant domain")
    assert not flow_module.exclusive("python -m stages.finetune --variant general --seed 0")
