"""MLflow as a team server: a real `mlflow server` process (sqlite backend, proxied artifacts), started once."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from unittest import mock

import mlflow
import pytest
import requests

from dapt import tracking
from stages.compare import log_children


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`mlflow server` on 127.0.0.1:<port>, with its store and artifacts under `root`; restartable in place."""

    def __init__(self, root: Path, port: int):
        self.root, self.port, self.url = root, port, f"http://127.0.0.1:{port}"
        self.artifacts = root / "artifacts"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--artifacts-destination", str(self.artifacts)]
        # no job runner (eight processes for GenAI jobs nobody here runs); its own session: stop() ends the
        # server and its workers, nothing else
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if requests.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except requests.RequestException:  # not listening yet, or not answering yet
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"mlflow server on {self.url} did not come up")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # killed, not shut down: the server is lost
            self.proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("mlflow-server"), free_port())
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def client_dir(server, tmp_path, monkeypatch):
    """A stage's working directory (the project root) with MLFLOW_TRACKING_URI on the server."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    with mock.patch.dict(os.environ):  # setup() sets the MLFLOW_HTTP_* defaults; not beyond this test
        yield tmp_path
    mlflow.set_tracking_uri(None)


def test_artifacts_go_to_the_servers_destination_not_the_clients_disk(client_dir, server):
    out = client_dir / "report.md"
    with tracking.stage_run("compare", {"a": 1}) as run:
        out.write_text("the verdict")
        tracking.log_artifact(out)
    assert [p.read_text() for p in server.artifacts.rglob("report.md")] == ["the verdict"]
    assert not (client_dir / "mlartifacts").exists()
    assert mlflow.get_experiment_by_name("dapt").artifact_location.startswith("mlflow-artifacts:")
    assert mlflow.get_run(run.info.run_id).info.status == "FINISHED"


def test_an_experiment_with_client_side_artifacts_is_named_with_the_fix(client_dir, server, monkeypatch, caplog):
    monkeypatch.setattr(tracking, "EXPERIMENT", "dapt-old")
    mlflow.set_tracking_uri(server.url)
    mlflow.create_experiment("dapt-old", artifact_location=(client_dir / "mlartifacts").as_uri())
    tracking.setup()
    assert "keeps its artifacts at file://" in caplog.text and "mlflow experiments rename" in caplog.text


def test_an_unreachable_server_fails_before_any_work_naming_the_uri(client_dir, monkeypatch):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    started = time.time()
    with pytest.raises(tracking.TrackingServerUnreachable, match=f"{uri} is unreachable.*unset MLFLOW_TRACKING_URI"):
        tracking.check_server()
    assert time.time() - started < 30  # the requirement's bound; a closed port answers in milliseconds
    worked = []
    with pytest.raises(RuntimeError, match=uri), tracking.stage_run("ingest", {}):
        worked.append(True)
    assert not worked


def test_a_server_lost_mid_stage_neither_fails_the_stage_nor_leaves_its_run_running(client_dir, server, caplog):
    out = client_dir / "metrics.json"
    try:
        with tracking.stage_run("finetune", {"lr": 0.1}) as run:
            tracking.log_metrics({"loss": 1.0}, step=1)
            server.stop()
            tracking.log_metrics({"loss": 0.5}, step=2)  # fails: warns, tracking stops
            tracking.log_metrics({"loss": 0.25}, step=3)  # skipped
            out.write_text(json.dumps(tracking.run_record(run)))
            tracking.log_artifact(out)
        run_id = run.info.run_id
        assert json.loads(out.read_text())["mlflow_run_id"] == run_id  # the stage finished and wrote its output
        assert caplog.text.count("Tracking stops") == 1
        [entry] = [json.loads(line) for line in (client_dir / tracking.JOURNAL).read_text().splitlines()]
        assert (entry["run_id"], entry["status"], entry["tracking_uri"]) == (run_id, "FINISHED", server.url)
    finally:
        server.start()  # same database, same port
    tracking.setup()  # what the next stage or flow does first
    closed = mlflow.get_run(run_id)
    assert closed.info.status == "FINISHED" and "ConnectionError" in closed.data.tags[tracking.STOPPED_TAG]
    assert [m.value for m in mlflow.MlflowClient().get_metric_history(run_id, "loss")] == [1.0]
    assert not (client_dir / tracking.JOURNAL).exists()


def test_lineage_tags_link_only_runs_on_this_server(client_dir, caplog):
    with tracking.stage_run("finetune", {}) as trained:
        record = tracking.run_record(trained)
    gone = {"mlflow_run_id": uuid.uuid4().hex, "mlflow_tracking_uri": "sqlite:////elsewhere/mlflow.db"}
    runs = {"general-0": {"variant": "general", "seed": 0, "test_macro_f1": 0.5, **record},
            "domain-0": {"variant": "domain", "seed": 0, "test_macro_f1": 0.6, **gone}}
    caplog.set_level(logging.WARNING)
    with tracking.stage_run("compare", {}) as compare:
        log_children(mock.Mock(training={"learning_rate": 1e-4}), runs)
    children = mlflow.search_runs(experiment_names=["dapt"], output_format="list",
                                  filter_string=f"tags.mlflow.parentRunId = '{compare.info.run_id}'")
    links = {c.data.tags["variant"]: c.data.tags.get("finetune_run_id") for c in children}
    assert links == {"general": record["mlflow_run_id"], "domain": None}
    [warning] = [r.getMessage() for r in caplog.records if "finetune_run_id" in r.getMessage()]
    assert "(domain-0)" in warning and "sqlite:////elsewhere/mlflow.db" in warning and "dvc repro -f" in warning
