"""The demo's cleaned domain corpus (`paths.domain_train`, `dvc repro clean`) for the training benchmarks.

Blocks come from the stage's token cache (`dapt.pretraining.blocks`, 🤗 datasets) where `datasets` is installed; on a
bare GPU image (torch and transformers only) they are packed in memory by `mlm.pack`, which gives the same blocks.
Reads Parquet shards (pyarrow) or a JSONL file, whichever `paths.domain_train` holds.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dapt.pretraining.mlm import pack  # noqa: E402


def source() -> Path:
    path = ROOT / yaml.safe_load((ROOT / "params.yaml").read_text())["paths"]["domain_train"]
    if not path.exists():
        sys.exit(f"{path}: missing; run `dvc repro clean` first (or carry it to the GPU machine)")
    return path


def texts(limit: int | None = None) -> list[str]:
    """The corpus's first `limit` documents (all with None)."""
    path, out = source(), []
    if path.is_dir():
        import pyarrow.parquet as pq

        for shard in sorted(path.glob("*.parquet")):
            out += pq.read_table(shard, columns=["text"]).column("text").to_pylist()
            if limit is not None and len(out) >= limit:
                break
    else:
        out = [json.loads(line)["text"] for line in path.open(encoding="utf-8") if line.strip()]
    return out[:limit]


def blocks(tok, seq: int, n: int | None = None) -> torch.Tensor:
    """The corpus's first `n` blocks of `seq` tokens (all with None)."""
    try:
        from dapt.pretraining.blocks import token_blocks
    except ImportError:  # no datasets here: the same blocks, packed in memory
        return pack(tok, texts(None if n is None else 4 * n), seq)[:n]
    with tempfile.TemporaryDirectory(prefix="bench-tokens-") as cache:
        data = token_blocks(tok, source(), seq, Path(cache))
        return data.head(len(data) if n is None else n)
