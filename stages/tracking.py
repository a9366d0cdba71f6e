"""MLflow for every stage: one run per stage process, flattened params, step-wise metrics, lineage tags.

Where runs go: `MLFLOW_TRACKING_URI` if set, else a SQLite database at the project root addressed by an
absolute URI, so every stage process (whatever its working directory) writes to the same store.
When the Prefect flow runs the stages it sets `DAPT_MLFLOW_PARENT_RUN_ID`, and every stage run becomes a
child of that flow run's parent run.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
import yaml
from pydantic import BaseModel
from transformers import TrainerCallback

from stages.common import PARAMS_FILE, active_profile

EXPERIMENT = "dapt"
PARENT_ENV = "DAPT_MLFLOW_PARENT_RUN_ID"


def tracking_uri(root: Path | None = None) -> str:
    """The tracking URI every stage and flow uses."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(root or Path.cwd()).resolve() / 'mlflow.db'}"


def setup(root: Path | None = None) -> str:
    """Point MLflow at the project's store and experiment; returns the experiment id."""
    root = (root or Path.cwd()).resolve()
    mlflow.set_tracking_uri(tracking_uri(root))
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    if exp is not None:
        return exp.experiment_id
    # an absolute artifact location, or artifacts land relative to whichever directory a process ran in
    return mlflow.create_experiment(EXPERIMENT, artifact_location=(root / "mlartifacts").as_uri())


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested params -> `a.b.c` keys, the form MLflow's params table and compare view need."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): obj}


def git_commit() -> str | None:
    """The commit the code ran at, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def data_version_tags(lock_file: Path = Path("dvc.lock")) -> dict[str, str]:
    """`data.<path>` -> md5 of every output DVC has recorded, i.e. the exact inputs this run could see."""
    if not lock_file.exists():
        return {}
    lock = yaml.safe_load(lock_file.read_text(encoding="utf-8")) or {}
    tags = {}
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            if "md5" in out:
                tags[f"data.{out['path']}"] = out["md5"]
    return tags


@contextlib.contextmanager
def stage_run(stage: str, params: Any, run_name: str | None = None,
              tags: Mapping[str, str] | None = None) -> Iterator[mlflow.ActiveRun]:
    """Open this stage's MLflow run (a child of the flow's run when there is one) and log its params."""
    experiment_id = setup()
    all_tags = {"stage": stage, **data_version_tags(), **(tags or {})}
    if PARAMS_FILE.exists():  # the budget profile: MLflow's compare view groups runs by it
        all_tags["profile"] = active_profile() or "none"
    commit = git_commit()
    if commit:
        all_tags["mlflow.source.git.commit"] = commit
    parent = os.environ.get(PARENT_ENV) or None
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name or stage, parent_run_id=parent,
                          tags=all_tags) as run:
        mlflow.log_params(flatten(params))
        yield run


def log_metrics(metrics: Mapping[str, Any], step: int | None = None) -> None:
    """Log the numeric entries of a (possibly nested) metrics mapping."""
    flat = {k: float(v) for k, v in flatten(dict(metrics)).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if flat:
        mlflow.log_metrics(flat, step=step)


class MLflowLogger(TrainerCallback):
    """Trainer logs (loss, learning rate, eval metrics) to the active MLflow run at every logging step.

    `step_offset` puts several Trainer phases of one stage on a single step axis.
    """

    def __init__(self, prefix: str = "", step_offset: int = 0):
        self.prefix, self.step_offset = prefix, step_offset

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero:  # several processes train; one logs
            log_metrics({f"{self.prefix}{k}": v for k, v in (logs or {}).items()},
                        step=self.step_offset + state.global_step)
