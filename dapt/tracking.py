"""MLflow for every stage: one run per stage process, flattened params, step-wise metrics, lineage tags.

Where runs go: `MLFLOW_TRACKING_URI` if set, else a SQLite database at the project root addressed by an
absolute URI, so every stage process (whatever its working directory) writes to the same store.
When the Prefect flow runs the stages it sets `DAPT_MLFLOW_PARENT_RUN_ID`, and every stage run becomes a
child of that flow run's parent run.

A tracking server (`MLFLOW_TRACKING_URI=http://...`) is checked before a stage does any work: an unreachable one
fails the stage at once (`check_server`). Once the work has started, tracking never fails it: the first failed
MLflow call warns and stops tracking for the rest of that run, and a run that could not be closed is written to
`mlflow_unclosed.jsonl` at the project root and closed (with its stage's outcome and a `tracking_stopped` tag) by
the next stage or flow that reaches the server. Stages therefore log through this module's helpers, never
through `mlflow.*` directly.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
import requests
import sqlalchemy.exc
import yaml
from filelock import FileLock
from mlflow.exceptions import MlflowException
from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.rest_utils import http_request
from pydantic import BaseModel
from transformers import TrainerCallback

from dapt.common import PARAMS_FILE, active_profile, log

EXPERIMENT = "dapt"
PARENT_ENV = "DAPT_MLFLOW_PARENT_RUN_ID"
JOURNAL = "mlflow_unclosed.jsonl"  # runs a lost server kept from closing, at the project root
STOPPED_TAG = "tracking_stopped"  # on a run closed late: when and why its tracking stopped
HEALTH_TIMEOUT_S = 10  # connect and read each: an unreachable server is reported within ~20 s
# MLflow's own defaults retry a lost server for ~4 minutes (7 retries, backoff factor 2, 120 s timeout) before a
# stage can carry on untracked. These ride out a restart of a few seconds (retries after ~0, 2 and 4 s) and keep
# a long read timeout for large artifact uploads through the server. Set only where the user has not.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}
# one short try, for a call whose failure is already handled (closing a run after the server was lost)
QUICK_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(HEALTH_TIMEOUT_S)}

_stopped: str | None = None  # why tracking stopped in this process's current run; None while it works
_journal: Path | None = None  # this project's JOURNAL, set by setup()


class TrackingServerUnreachable(RuntimeError):
    """The MLflow tracking server does not answer; raised before a stage or flow does any work."""


def tracking_uri(root: Path | None = None) -> str:
    """The tracking URI every stage and flow uses."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(root or Path.cwd()).resolve() / 'mlflow.db'}"


def is_server(uri: str) -> bool:
    """Whether `uri` is a tracking server (http/https) rather than a local store."""
    return urlparse(uri).scheme in ("http", "https")


def check_server(uri: str | None = None) -> None:
    """Raise `TrackingServerUnreachable` unless the tracking server at `uri` (default: `tracking_uri()`) answers
    its /health endpoint within ~20 s; nothing to check for a local store."""
    uri = uri or tracking_uri()
    if not is_server(uri):
        return
    try:  # MLflow's own HTTP client: it sends the credentials and TLS settings of MLFLOW_TRACKING_* variables
        response = http_request(get_default_host_creds(uri), "/health", "GET", max_retries=0,
                                timeout=HEALTH_TIMEOUT_S)
        problem = None if response.status_code == 200 else f"/health answered HTTP {response.status_code}"
    except Exception as e:  # refused, timed out, a bad URL: the same to the user
        problem = str(e)
    if problem:
        raise TrackingServerUnreachable(
            f"MLflow tracking server {uri} is unreachable ({problem}). Start it (e.g. `mlflow server --host "
            f"0.0.0.0 --port 5000`), fix MLFLOW_TRACKING_URI, or unset MLFLOW_TRACKING_URI to log to the local "
            f"store (mlflow.db at the project root).")


def setup(root: Path | None = None) -> str:
    """Check the tracking server, point MLflow at the project's store and experiment, close the runs a lost
    server left open; returns the experiment id."""
    global _journal
    root = (root or Path.cwd()).resolve()
    uri = tracking_uri(root)
    check_server(uri)
    if is_server(uri):
        for name, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)  # inherited by the stage processes a flow starts
    mlflow.set_tracking_uri(uri)
    _journal = root / JOURNAL
    close_unclosed_runs()
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        # a server keeps artifacts where it is configured to (its proxy, mlflow-artifacts:/); a local store needs
        # an absolute location, or artifacts land relative to whichever directory a process ran in
        location = {} if is_server(uri) else {"artifact_location": (root / "mlartifacts").as_uri()}
        exp = mlflow.get_experiment(mlflow.create_experiment(EXPERIMENT, **location))
    if is_server(uri) and urlparse(exp.artifact_location).scheme in ("", "file"):
        log.warning("MLflow: experiment %r on %s keeps its artifacts at %s, on each client's disk: they never reach "
                    "the server. Fix: rename it (`mlflow experiments rename -x %s --new-name %s-local`); the next "
                    "run creates %r in the server's artifact store (start the server with --artifacts-destination)",
                    EXPERIMENT, uri, exp.artifact_location, exp.experiment_id, EXPERIMENT, EXPERIMENT)
    return exp.experiment_id


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


def data_version_tags(lock_file: Path = Path("dvc.lock"), paths: Iterable[str | Path] | None = None) -> dict[str, str]:
    """`data.<path>` -> md5 of every output DVC has recorded, i.e. the exact inputs this run could see (only
    `paths`, if given: a model's own inputs)."""
    if not lock_file.exists():
        return {}
    for attempt in range(5):  # DVC rewrites the file in place when a stage beside this one finishes
        try:
            lock = yaml.safe_load(lock_file.read_text(encoding="utf-8")) or {}
            break
        except yaml.YAMLError:
            time.sleep(0.2 * (attempt + 1))
    else:
        log.warning("MLflow: %s could not be read; the run goes without data.<path> tags", lock_file)
        return {}
    wanted = None if paths is None else {Path(p).as_posix() for p in paths}
    tags = {}
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            if "md5" in out and (wanted is None or out["path"] in wanted):
                tags[f"data.{out['path']}"] = out["md5"]
    return tags


# ---------------------------------------------------------------------------------------------------
# runs that survive a lost server


# what a lost or failing store raises: MLflow's REST client, artifact uploads, the SQL stores, the file store
STORE_ERRORS = (MlflowException, requests.RequestException, sqlalchemy.exc.SQLAlchemyError, OSError)


def _call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)`, or None once tracking has stopped; the first store failure warns and stops tracking
    (a stage that has started must finish and write its outputs). Anything else is a bug, and raises."""
    global _stopped
    if _stopped is not None:
        return None
    try:
        return fn(*args, **kwargs)
    except STORE_ERRORS as e:
        _stopped = f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}: {type(e).__name__}: {e}"
        log.warning("MLflow: %s failed (%s). Tracking stops for the rest of this run; the stage goes on and writes "
                    "its outputs. The run is closed now or, if the server stays away, by the next stage or flow "
                    "that reaches it (%s).", getattr(fn, "__name__", fn), e, _journal or JOURNAL)
        return None


def guarded(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """A stage's other MLflow work (logging a model, tagging versions) under the same rule as its logging calls:
    None without an active run or once tracking has stopped; a failure warns and stops tracking, never the stage."""
    return _call(fn, *args, **kwargs) if mlflow.active_run() is not None else None


@contextlib.contextmanager
def _environ(values: Mapping[str, str]) -> Iterator[None]:
    """`values` in os.environ for the block (MLflow reads its HTTP settings from there at each request)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _journal_lock() -> FileLock:
    """Stages side by side append to the journal while another closes its runs: one writer at a time."""
    return FileLock(f"{_journal or JOURNAL}.lock")


def _close(run_id: str, status: str) -> None:
    """End the active run `run_id` with `status`; if the server does not take it, journal it for later."""
    if _stopped is None:
        _call(mlflow.end_run, status)  # pops the run locally, then tells the server
        if _stopped is None:
            return
    else:  # stopped earlier: one short try (the server may be back); end_run forgets the run locally either way
        try:
            with _environ(QUICK_HTTP):
                mlflow.end_run(status)
                mlflow.MlflowClient().set_tag(run_id, STOPPED_TAG, _stopped)
            return
        except STORE_ERRORS:  # still unreachable: journal it below
            pass
    entry = {"tracking_uri": mlflow.get_tracking_uri(), "run_id": run_id, "status": status,
             "end_time": int(time.time() * 1000), "reason": _stopped}
    with _journal_lock(), open(_journal or JOURNAL, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")
    log.info("MLflow: run %s could not be closed (%s); written to %s, the next stage or flow that reaches %s "
             "closes it", run_id, status, _journal or JOURNAL, entry["tracking_uri"])


def close_unclosed_runs() -> None:
    """Close the journal's runs of the current tracking server with their stage's outcome and end time."""
    if _journal is None or not _journal.exists():
        return
    with _journal_lock():
        _close_journaled(_journal)


def _close_journaled(journal: Path) -> None:
    if not journal.exists():  # closed by a stage beside this one meanwhile
        return
    uri, client, left = mlflow.get_tracking_uri(), mlflow.MlflowClient(), []
    for line in journal.read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        if entry["tracking_uri"] != uri:
            left.append(line)
            continue
        try:
            client.set_tag(entry["run_id"], STOPPED_TAG, entry["reason"])
            client.set_terminated(entry["run_id"], entry["status"], end_time=entry["end_time"])
            log.info("MLflow: closed run %s (%s), left open when the server was lost", entry["run_id"],
                     entry["status"])
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":  # deleted meanwhile: nothing to close
                log.warning("MLflow: could not close run %s (%s); kept in %s", entry["run_id"], e, journal)
                left.append(line)
    if left:
        journal.write_text("".join(f"{line}\n" for line in left), encoding="utf-8")
    else:
        journal.unlink()


@contextlib.contextmanager
def _run(**start_run: Any) -> Iterator[mlflow.ActiveRun | None]:
    """`mlflow.start_run(**start_run)` that tracking failures cannot fail and that is never left RUNNING: FINISHED
    or FAILED by the outcome of the block, now or (journaled) once the server is back. None if it did not start."""
    run = _call(mlflow.start_run, **start_run)
    if run is None:
        yield None
        return
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    finally:
        _close(run.info.run_id, status)


@contextlib.contextmanager
def stage_run(stage: str, params: Any, run_name: str | None = None,
              tags: Mapping[str, str] | None = None) -> Iterator[mlflow.ActiveRun | None]:
    """Open this stage's MLflow run (a child of the flow's run when there is one) and log its params.
    Raises `TrackingServerUnreachable` before the stage's work; yields None if the run could not start."""
    global _stopped
    experiment_id = setup()
    _stopped = None  # the server answered: track this run afresh
    all_tags = {"stage": stage, **data_version_tags(), **(tags or {})}
    if PARAMS_FILE.exists():  # the budget profile: MLflow's compare view groups runs by it
        all_tags["profile"] = active_profile() or "none"
    commit = git_commit()
    if commit:
        all_tags["mlflow.source.git.commit"] = commit
    parent = os.environ.get(PARENT_ENV) or None
    with _run(experiment_id=experiment_id, run_name=run_name or stage, parent_run_id=parent, tags=all_tags) as run:
        log_params(flatten(params))
        yield run


@contextlib.contextmanager
def parent_run(run_name: str, tags: Mapping[str, str] | None = None,
               root: Path | None = None) -> Iterator[str | None]:
    """The flow's run, parent of every stage run (pass its id in `PARENT_ENV`); yields its id, None if it could
    not start. Calls `setup(root)`, so raises `TrackingServerUnreachable` before any work."""
    global _stopped
    experiment_id = setup(root)
    _stopped = None
    with _run(experiment_id=experiment_id, run_name=run_name, tags=dict(tags or {})) as run:
        yield run.info.run_id if run else None


@contextlib.contextmanager
def child_run(run_name: str, tags: Mapping[str, str] | None = None) -> Iterator[mlflow.ActiveRun | None]:
    """A nested run under the active run, in its experiment; None (and nothing logged) without one."""
    active = mlflow.active_run()
    if active is None or _stopped is not None:
        yield None
        return
    with _run(run_name=run_name, nested=True, tags=dict(tags or {}), experiment_id=active.info.experiment_id) as run:
        yield run


# ---------------------------------------------------------------------------------------------------
# logging to the active run: never fails a stage


def log_params(params: Mapping[str, Any]) -> None:
    """Log params to the active run."""
    guarded(mlflow.log_params, dict(params))


def log_metrics(metrics: Mapping[str, Any], step: int | None = None) -> None:
    """Log the numeric entries of a (possibly nested) metrics mapping."""
    flat = {k: float(v) for k, v in flatten(dict(metrics)).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if flat:
        guarded(mlflow.log_metrics, flat, step=step)


def set_tags(tags: Mapping[str, Any]) -> None:
    """Set tags on the active run."""
    guarded(mlflow.set_tags, dict(tags))


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    """Upload one file to the active run's artifacts."""
    guarded(mlflow.log_artifact, str(path), artifact_path)


def log_artifacts(folder: str | Path, artifact_path: str | None = None) -> None:
    """Upload a folder's files to the active run's artifacts."""
    guarded(mlflow.log_artifacts, str(folder), artifact_path)


def log_dict(data: Mapping[str, Any], artifact_file: str) -> None:
    """Write a mapping as a JSON (or YAML, by extension) artifact of the active run."""
    guarded(mlflow.log_dict, dict(data), artifact_file)


# ---------------------------------------------------------------------------------------------------
# lineage: links between runs, only to runs that exist on this server


def run_record(run: mlflow.ActiveRun | None) -> dict[str, str]:
    """`mlflow_run_id` and `mlflow_tracking_uri` of a stage's run, for its metrics file ({} without a run), so a
    later stage links to the run only when it is on the same server."""
    return {"mlflow_run_id": run.info.run_id, "mlflow_tracking_uri": mlflow.get_tracking_uri()} if run else {}


def existing_run_ids(run_ids: Iterable[str]) -> set[str] | None:
    """Those of `run_ids` that exist on the current tracking server; None if tracking has stopped."""
    client = mlflow.MlflowClient()

    def exists(run_id: str) -> bool:
        try:
            client.get_run(run_id)
            return True
        except MlflowException as e:
            if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise

    found = {run_id for run_id in set(run_ids) if _call(exists, run_id)}
    return None if _stopped is not None else found


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
