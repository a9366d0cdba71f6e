"""The DVC pipeline as a Prefect flow: one task per DVC stage, independent stages side by side.

Each task runs `dvc repro --single-item <stage>` (so DVC still decides what is up to date and records every
output) and streams the stage's output into the Prefect log. A stage starts once the stages it depends on in
DVC's graph have finished, on a free device: up to `pipeline.max_parallel` stages at once, each pinned to its
own GPU (`CUDA_VISIBLE_DEVICES`); a stage run through a multi-process launcher (`pretrain.launcher`) runs alone on
every GPU. Concurrent stages wait for DVC's repo lock (`dvc --wait-for-lock`) instead of failing after 3 s.
One flow run at a time per workspace: a second waits for the first (a lock file, and the deployments'
concurrency limit of 1 with enqueueing, so the UI shows it as AwaitingConcurrencySlot).
The flow opens an MLflow parent run; every stage's run becomes its child. With `pipeline.dvc_remote` set, it
pulls from that DVC remote before the stages and pushes after. The comparison report (verdict and tables)
becomes a Prefect markdown artifact.

Run once:   python -m flows.pipeline            (or `dapt-flow`)
Schedule:   python -m flows.pipeline --serve    (a deployment on `pipeline.cron` from params.yaml;
            start `prefect server start` first to see it, its scheduled runs and their logs in the UI)
Work pool:  prefect deploy --name dapt-pool; prefect worker start --pool dapt   (prefect.yaml)
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import networkx as nx
from filelock import FileLock
from prefect import flow, get_run_logger, serve, task
from prefect.artifacts import create_markdown_artifact
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.futures import as_completed
from prefect.runtime import flow_run
from prefect.schedules import Cron
from pydantic import Field

from dapt import tracking
from dapt.common import Section, read_params_file, validate_section

ROOT = Path(__file__).resolve().parents[1]
PARENT_ENV = tracking.PARENT_ENV  # every stage's MLflow run becomes a child of the flow's
# one run per deployment at a time; the others wait in the queue (Prefect: AwaitingConcurrencySlot)
ONE_AT_A_TIME = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)
PROGRESS_EVERY = 30.0  # seconds between two log lines of one progress bar


class PipelineParams(Section):
    """`pipeline:` in params.yaml: how the flow runs the stages; no stage's result depends on it."""

    cron: str
    timezone: str = "UTC"
    # stages at once; null: one per visible GPU, 1 without a GPU
    max_parallel: int | None = Field(None, ge=1)
    dvc_remote: str | None = None  # a `dvc remote add` name: pull before the stages, push after


def settings(root: Path = ROOT) -> PipelineParams:
    """The `pipeline:` section of params.yaml, validated."""
    path = root / "params.yaml"
    return validate_section(read_params_file(path, profile=False), "pipeline", PipelineParams, path)


def dag(root: Path = ROOT) -> dict[str, tuple[list[str], str]]:
    """Every stage address (`finetune@general-0` included) in an execution order of DVC's graph, with the stages
    it depends on and its command."""
    from dvc.repo import Repo

    # DVC names a stage relative to the working directory ("../x/dvc.yaml:first" from elsewhere)
    with contextlib.chdir(root), Repo(str(root)) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        order = nx.lexicographical_topological_sort(graph.reverse(copy=False), key=lambda s: s.addressing)
        return {s.addressing: (sorted(d.addressing for d in graph.successors(s)), s.cmd or "") for s in order}


def stage_order(root: Path = ROOT) -> list[str]:
    """Every stage address in an execution order of DVC's graph."""
    return list(dag(root))


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as `CUDA_VISIBLE_DEVICES` names them (empty on a CPU machine)."""
    import torch

    count = torch.cuda.device_count()
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return listed[:count] if listed else [str(i) for i in range(count)]


def stage_env(parent_run_id: str | None) -> dict[str, str]:
    """The stage processes' environment: this interpreter's tools first on PATH, the MLflow parent run."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if parent_run_id:
        env[PARENT_ENV] = parent_run_id
    return env


def slot_env(env: dict[str, str], gpus: list[str], slots: int) -> dict[str, str]:
    """A stage's environment on its device(s): the GPUs it may see; on a CPU, its share of the cores (unless
    OMP_NUM_THREADS or `runtime.threads` says otherwise), so that parallel stages do not oversubscribe them."""
    env = dict(env)
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    elif slots > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // slots))
    return env


LAUNCHERS = {"torchrun", "accelerate", "deepspeed", "mpirun", "srun"}  # what pretrain.launcher may name


def exclusive(cmd: str) -> bool:
    """A stage started through a multi-process launcher (`pretrain.launcher`) wants every device."""
    return bool(cmd.strip()) and Path(shlex.split(cmd)[0]).name in LAUNCHERS


# ---------------------------------------------------------------------------------------------------
# a stage's output in the Prefect log: each line at its own level, a progress bar not an update a line

_STAGE_LOG = re.compile(r"^\d{4}-\d\d-\d\d [\d:,.]+ \S+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")  # setup_logging's
_PREFIXED = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL): ")  # DVC's own messages
_PY_WARNING = re.compile(r"^\S+:\d+: \w*Warning: ")  # the warnings module


class StageLog:
    """Turns a stage's output stream into log records. A line keeps the level it was written with (stage loggers,
    DVC's `ERROR:`, Python warnings, a traceback); a progress bar (tqdm redraws a line after `\\r`) gives one
    record per `PROGRESS_EVERY` seconds and its final state, not one per redraw."""

    def __init__(self, log: logging.Logger | logging.LoggerAdapter, progress_every: float = PROGRESS_EVERY):
        self.log, self.progress_every = log, progress_every
        self.buffer, self.last_progress, self.in_traceback = "", float("-inf"), False

    def feed(self, text: str) -> None:
        self.buffer += text
        # a trailing \r may be half of a \r\n whose \n comes with the next chunk: keep it for then
        held = "\r" if self.buffer.endswith("\r") else ""
        *pieces, rest = re.split(r"(\r\n|\n|\r)", self.buffer[:len(self.buffer) - len(held)])
        self.buffer = rest + held
        for piece, end in zip(pieces[::2], pieces[1::2]):
            if end == "\r":  # a redraw: the line is not finished
                if piece.strip() and time.monotonic() - self.last_progress >= self.progress_every:
                    self.last_progress = time.monotonic()
                    self.log.info(piece.rstrip())
            elif piece.strip():
                self.log.log(self.level(piece), piece.rstrip())

    def close(self) -> None:
        if self.buffer.strip():
            self.log.log(self.level(self.buffer), self.buffer.rstrip())
        self.buffer = ""

    def level(self, line: str) -> int:
        if line.startswith("Traceback (most recent call last)"):
            self.in_traceback = True
        if self.in_traceback:
            # the frames are indented; the exception's own line ends the traceback
            self.in_traceback = line[:1].isspace() or line.startswith("Traceback")
            return logging.ERROR
        match = _STAGE_LOG.match(line) or _PREFIXED.match(line)
        if match:
            return logging.getLevelName(match.group(1))
        return logging.WARNING if _PY_WARNING.match(line) else logging.INFO


def stream(cmd: list[str], root: str, env: dict[str, str], log: StageLog) -> int:
    """Run `cmd`, its output fed to `log` as it comes; returns the exit code."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may span two reads
    # its own process group: a cancelled task takes DVC and the stage under it (and its GPU) down together
    with subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          start_new_session=True) as proc:
        try:
            assert proc.stdout is not None
            # raw reads, not lines: a progress bar redraws with \r and ends its line only when it finishes
            while chunk := proc.stdout.read1(65536):
                log.feed(decoder.decode(chunk))
            log.feed(decoder.decode(b"", final=True))
            log.close()
        finally:  # a timeout or cancellation must not leave DVC running and holding the repo lock
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode


# DVC takes its repo lock for seconds before and after a stage's command (hashing, caching, writing dvc.lock) and
# gives up after 3 s: with stages side by side, wait for it, or a finished stage fails before DVC records it
DVC = ["dvc", "--wait-for-lock"]


# one retry for transient failures (a hub download, a full disk freed by a cleanup); DVC skips what finished.
# No task timeout: tasks run in threads, where Prefect cannot interrupt one; the stage bounds its own time
@task(retries=1, retry_delay_seconds=60)
def run_stage(stage: str, root: str, env: dict[str, str]) -> None:
    """`dvc repro --single-item <stage>`, its output streamed into the Prefect log."""
    logger = get_run_logger()
    cmd = [*DVC, "repro", "--single-item", stage]
    if env.get("CUDA_VISIBLE_DEVICES"):
        logger.info("on GPU %s", env["CUDA_VISIBLE_DEVICES"])
    logger.info("$ %s", " ".join(cmd))
    code = stream(cmd, root, env, StageLog(logger))
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {code} (its output is above)")


@task(retries=2, retry_delay_seconds=30)
def dvc_sync(action: str, remote: str, root: str, env: dict[str, str]) -> None:
    """`dvc pull` (what is missing on the remote is left to the stages) or `dvc push` to `remote`."""
    logger = get_run_logger()
    cmd = [*DVC, action, "-r", remote, *(["--allow-missing"] if action == "pull" else [])]
    logger.info("$ %s", " ".join(cmd))
    code = stream(cmd, root, env, StageLog(logger))
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {code}: is remote '{remote}' configured "
                           f"(`dvc remote list`) and reachable?")


def run_stages(graph: dict[str, tuple[list[str], str]], root: str, env: dict[str, str], max_parallel: int,
               gpus: list[str]) -> list[str]:
    """Every stage of `graph` once the stages it depends on have completed, up to `max_parallel` at once, each on
    its own device. After a failure the stages that do not depend on it still run; then the failure is raised.
    Returns the stages in the order they started."""
    logger = get_run_logger()
    # a slot is a place to run; with GPUs it is one GPU (several slots share one when max_parallel > GPUs)
    free = [gpus[i % len(gpus)] if gpus else "" for i in range(max_parallel)]
    pending, running, futures, done, failed = list(graph), {}, {}, set(), set()
    while pending or running:
        for stage in list(pending):
            deps, cmd = graph[stage]
            if any(d in failed for d in deps):
                logger.error("%s: not run, a stage it depends on failed", stage)
                failed.add(stage)
                pending.remove(stage)
                continue
            alone = exclusive(cmd)  # a launcher's stage: every slot, every GPU, every core
            need = max_parallel if alone else 1
            if not set(deps) <= done or len(free) < need:
                continue
            slots, free = free[:need], free[need:]
            stage_env = slot_env(env, gpus, 1) if alone else slot_env(env, [s for s in slots if s], max_parallel)
            # wait_for: the dependencies have finished; given, they draw DVC's graph in the Prefect UI
            futures[stage] = run_stage.with_options(name=stage.split("@")[0], task_run_name=stage).submit(
                stage, root, stage_env, wait_for=[futures[d] for d in deps])
            running[futures[stage]] = (stage, slots)
            pending.remove(stage)
        if not running:  # cannot happen with DVC's acyclic graph; said rather than stages silently skipped
            raise RuntimeError(f"stages never became ready: {pending}")
        future = next(as_completed(list(running)))
        stage, slots = running.pop(future)
        free += slots
        try:
            future.result()
            done.add(stage)
        except Exception as err:  # the task's own log has the stage's output
            failed.add(stage)
            logger.error("%s failed: %s", stage, err)
    if failed:
        raise RuntimeError(f"stages failed or not run: {', '.join(s for s in graph if s in failed)}")
    return list(futures)


@flow(name="dapt-pipeline", log_prints=True)
def pipeline(root: str = str(ROOT), stages: list[str] | None = None) -> list[str]:
    """Run every DVC stage (or only `stages`, e.g. `finetune@general-0`) as its own Prefect task under one MLflow
    parent run; returns the stages run."""
    logger = get_run_logger()
    root_path = Path(root)
    s = settings(root_path)
    (root_path / ".dvc" / "tmp").mkdir(parents=True, exist_ok=True)
    lock = FileLock(root_path / ".dvc" / "tmp" / "dapt-flow.lock")  # any flow run here: deployed, served or not
    try:
        lock.acquire(timeout=0)
    except TimeoutError:
        logger.info("another flow run is using %s: waiting for it to finish", root_path)
        lock.acquire()
    try:
        graph = dag(root_path)
        if stages:  # a subset: what they depend on outside it counts as done
            unknown = set(stages) - set(graph)
            if unknown:
                raise ValueError(f"{root_path / 'dvc.yaml'}: no stage {sorted(unknown)}; stages: {list(graph)}")
            graph = {name: ([d for d in deps if d in stages], cmd) for name, (deps, cmd) in graph.items()
                     if name in stages}
        gpus = visible_gpus()
        max_parallel = s.max_parallel or max(len(gpus), 1)
        logger.info("%d stages, up to %d at once, %s", len(graph), max_parallel,
                    f"GPUs {','.join(gpus)}" if gpus else "no GPU")
        # parent_run checks the tracking server first: an unreachable one fails here, before DVC touches an output
        with tracking.parent_run(f"pipeline-{flow_run.get_name() or 'local'}", root=root_path,
                                 tags={"stage": "pipeline", "prefect.flow_run_id": str(flow_run.get_id())}) as parent:
            if s.dvc_remote:
                dvc_sync("pull", s.dvc_remote, root, stage_env(None))
            started = run_stages(graph, root, stage_env(parent), max_parallel, gpus)
            if s.dvc_remote:
                dvc_sync("push", s.dvc_remote, root, stage_env(None))
    finally:
        lock.release()
    report = root_path / "reports" / "comparison.md"
    if report.exists():
        # the verdict and the tables; the figures are local files the Prefect UI cannot show (comparison.html has them)
        text = "\n".join(line for line in report.read_text(encoding="utf-8").splitlines() if not line.startswith("!["))
        create_markdown_artifact(key="dapt-comparison", markdown=text, description="General vs domain-adapted model")
    return started


def deployment(root: Path = ROOT):
    """The scheduled deployment: this flow on `pipeline.cron` (and `pipeline.timezone`) from params.yaml, one run
    at a time (a run due while another runs waits for it)."""
    s = settings(root)
    return pipeline.to_deployment(name="dapt-scheduled", schedules=[Cron(s.cron, timezone=s.timezone)],
                                  parameters={"root": str(root)}, tags=["dapt"], concurrency_limit=ONE_AT_A_TIME,
                                  description="The DAPT pipeline (dvc repro, one task per stage) on a schedule")


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the DAPT pipeline as a Prefect flow.")
    parser.add_argument("--serve", action="store_true", help="serve a deployment on pipeline.cron from params.yaml")
    parser.add_argument("--root", type=Path, default=ROOT, help="the workspace (a DVC project; default: this one)")
    parser.add_argument("stages", nargs="*", help="run only these DVC stages (default: all)")
    args = parser.parse_args()
    if args.serve:
        serve(deployment(args.root.resolve()))
    else:
        pipeline(root=str(args.root.resolve()), stages=args.stages or None)


if __name__ == "__main__":
    main()
