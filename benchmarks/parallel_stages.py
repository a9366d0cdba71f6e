"""Fine-tuning wall time with 1 and with N stages at once (`pipeline.max_parallel`), through the Prefect flow.

Works on a scratch clone of this workspace whose outputs come from this workspace's DVC cache (`dvc checkout`),
so it needs a finished `make run`. For each setting it deletes the chosen fine-tuning runs' outputs and runs the
flow on just those stages; DVC reruns them. Both settings run the same stages on the same machine, one after the
other: keep the machine otherwise idle. On a CPU, parallel stages share the cores (each gets its share of
threads): on 2 cores expect little, on a GPU machine one GPU a stage.

Run: python benchmarks/parallel_stages.py [--stages finetune@general-0 finetune@general-1 ...] [--parallel 1 2]
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ["finetune@general-0", "finetune@general-1", "finetune@domain-0", "finetune@domain-1"]


def sh(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> None:
    subprocess.run(cmd, cwd=cwd, check=True, env=env, stdout=subprocess.DEVNULL)


def scratch_clone(dest: Path) -> Path:
    """A git clone of this workspace with its DVC outputs checked out from this workspace's cache."""
    sh(["git", "clone", "-q", str(ROOT), str(dest)], ROOT)
    dvc = [sys.executable, "-m", "dvc"]
    sh([*dvc, "cache", "dir", "--local", str(ROOT / ".dvc" / "cache")], dest)
    sh([*dvc, "config", "--local", "cache.type", "reflink,copy"], dest)  # reruns must not write into the cache
    sh([*dvc, "checkout", "--quiet"], dest)
    # an empty cache from here on: with this workspace's run cache, DVC would restore the results, not rerun
    sh([*dvc, "cache", "dir", "--local", str(dest.parent / "cache")], dest)
    return dest


def run(ws: Path, stages: list[str], parallel: int, env: dict[str, str]) -> float:
    """Seconds for the flow to rerun `stages` with `parallel` of them at once."""
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["pipeline"]["max_parallel"] = parallel
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for stage in stages:  # the outputs gone: DVC reruns the stage
        shutil.rmtree(ws / params["paths"]["finetune"] / stage.split("@")[1], ignore_errors=True)
    started = time.perf_counter()
    sh([sys.executable, "-m", "flows.pipeline", "--root", str(ws), *stages], ROOT, env)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", nargs="+", default=DEFAULT, help="fine-tuning stages to rerun")
    parser.add_argument("--parallel", nargs="+", type=int, default=[1, 2])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dapt-parallel-") as tmp:
        ws = scratch_clone(Path(tmp) / "ws")
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db", "PREFECT_HOME": f"{tmp}/prefect",
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        env.pop("DAPT_MLFLOW_PARENT_RUN_ID", None)
        seconds = {}
        for n in args.parallel:
            seconds[n] = run(ws, args.stages, n, env)
            print(f"{len(args.stages)} fine-tuning stages, {n} at once: {seconds[n]:.0f} s", flush=True)
    base = seconds[args.parallel[0]]
    print(json.dumps({"stages": args.stages, "cores": os.cpu_count(),
                      "seconds": {str(n): round(s, 1) for n, s in seconds.items()},
                      "speedup": {str(n): round(base / s, 2) for n, s in seconds.items()}}))


if __name__ == "__main__":
    main()
