"""The DVC pipeline as a Prefect flow: one task per DVC stage, in the order of DVC's own graph.

Each task runs `dvc repro --single-item <stage>` (so DVC still decides what is up to date) and streams the
stage's output into the Prefect log. Tasks run one after another: DVC allows one process per workspace.
The flow opens an MLflow parent run; every stage's run becomes its child. The comparison report (verdict and
tables) becomes a Prefect markdown artifact.

Run once:   python -m flows.pipeline            (or `dapt-flow`)
Schedule:   python -m flows.pipeline --serve    (a deployment on `pipeline.cron` from params.yaml;
            start `prefect server start` first to see it, its scheduled runs and their logs in the UI)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import networkx as nx
import yaml
from prefect import flow, get_run_logger, serve, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from prefect.schedules import Cron

ROOT = Path(__file__).resolve().parents[1]
PARENT_ENV = "DAPT_MLFLOW_PARENT_RUN_ID"  # read by stages/tracking.py
EXPERIMENT = "dapt"


def stage_order(root: Path = ROOT) -> list[str]:
    """Every stage address (`finetune@general-0` included) in an execution order of DVC's graph."""
    from dvc.repo import Repo

    # DVC names a stage relative to the working directory ("../x/dvc.yaml:first" from elsewhere)
    with contextlib.chdir(root), Repo(str(root)) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        order = nx.lexicographical_topological_sort(graph.reverse(copy=False), key=lambda s: s.addressing)
        return [stage.addressing for stage in order]


def settings(root: Path = ROOT) -> dict:
    """The `pipeline:` section of params.yaml (schedule)."""
    data = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8"))
    section = data.get("pipeline") or {}
    unknown = set(section) - {"cron", "timezone"}
    if unknown or "cron" not in section:
        raise ValueError(f"params.yaml: pipeline: needs 'cron' (and optional 'timezone'); unknown keys {sorted(unknown)}")
    return section


def stage_env(parent_run_id: str | None) -> dict[str, str]:
    """The stage processes' environment: this interpreter's tools first on PATH, the MLflow parent run."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if parent_run_id:
        env[PARENT_ENV] = parent_run_id
    return env


# one retry for transient failures (a hub download, a full disk freed by a cleanup); DVC skips what finished
@task(retries=1, retry_delay_seconds=60, timeout_seconds=12 * 3600)
def run_stage(stage: str, root: str, env: dict[str, str]) -> None:
    """`dvc repro --single-item <stage>`, its output streamed line by line into the Prefect log."""
    logger = get_run_logger()
    cmd = ["dvc", "repro", "--single-item", stage]
    logger.info("$ %s", " ".join(cmd))
    with subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1) as proc:
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.strip():
                    logger.info(line.rstrip())
        finally:  # a timeout or cancellation must not leave DVC running and holding the repo lock
            if proc.poll() is None:
                proc.kill()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {proc.returncode}")


@flow(name="dapt-pipeline", log_prints=True)
def pipeline(root: str = str(ROOT)) -> list[str]:
    """Run every DVC stage as its own Prefect task under one MLflow parent run; returns the stages run."""
    root_path = Path(root)
    stages = stage_order(root_path)
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root_path / 'mlflow.db'}")
    if mlflow.get_experiment_by_name(EXPERIMENT) is None:
        mlflow.create_experiment(EXPERIMENT, artifact_location=(root_path / "mlartifacts").as_uri())
    mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run(run_name=f"pipeline-{flow_run.get_name() or 'local'}",
                          tags={"stage": "pipeline", "prefect.flow_run_id": str(flow_run.get_id())}) as parent:
        env = stage_env(parent.info.run_id)
        for stage in stages:
            run_stage.with_options(name=stage.split("@")[0], task_run_name=stage)(stage, root, env)
    report = root_path / "reports" / "comparison.md"
    if report.exists():
        # the verdict and the tables; the figures are local files the Prefect UI cannot show (comparison.html has them)
        text = "\n".join(line for line in report.read_text(encoding="utf-8").splitlines() if not line.startswith("!["))
        create_markdown_artifact(key="dapt-comparison", markdown=text, description="General vs domain-adapted model")
    return stages


def deployment(root: Path = ROOT):
    """The scheduled deployment: this flow on `pipeline.cron` (and `pipeline.timezone`) from params.yaml."""
    s = settings(root)
    return pipeline.to_deployment(name="dapt-scheduled", schedules=[Cron(s["cron"], timezone=s.get("timezone", "UTC"))],
                                  parameters={"root": str(root)}, tags=["dapt"],
                                  description="The DAPT pipeline (dvc repro, one task per stage) on a schedule")


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the DAPT pipeline as a Prefect flow.")
    parser.add_argument("--serve", action="store_true", help="serve a deployment on pipeline.cron from params.yaml")
    args = parser.parse_args()
    if args.serve:
        serve(deployment())
    else:
        pipeline()


if __name__ == "__main__":
    main()
