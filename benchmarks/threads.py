"""Training-step time against torch's intra-op thread count: what `runtime.threads` should default to.

Times a fine-tuning step (sequence classification, forward + backward + AdamW) and an MLM step of the demo's
base model (`models/general`, BERT with 6 layers) at each thread count, alternating the counts round by round
so that a machine whose load changes during the run affects every count alike. Reports the median and the
spread per count, and the machine's load average before and after (a busy machine favours fewer threads).

Run: `python benchmarks/threads.py [--threads 1 2] [--rounds 8]`; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification  # noqa: E402


def load_avg() -> float:
    return os.getloadavg()[0]


def step_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    """One optimiser step on a fixed batch."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step() -> float:
        started = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "general"))
    parser.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    vocab = 30000
    cls = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=7)
    mlm = AutoModelForMaskedLM.from_pretrained(args.model)
    ids = torch.randint(1000, vocab, (16, 64), generator=gen)
    blocks = torch.randint(1000, vocab, (16, 128), generator=gen)
    labels = torch.full_like(blocks, -100)
    labels[:, ::7] = blocks[:, ::7]  # ~15% of positions predicted
    steps = {
        "finetune_16x64": step_fn(cls, {"input_ids": ids, "labels": torch.randint(0, 7, (16,), generator=gen)}),
        "mlm_16x128": step_fn(mlm, {"input_ids": blocks, "labels": labels}),
    }
    load_before = load_avg()
    for step in steps.values():  # warm-up: first-call allocations
        for n in args.threads:
            torch.set_num_threads(n)
            step()
    times: dict[str, dict[int, list[float]]] = {name: {n: [] for n in args.threads} for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            for n in args.threads:
                torch.set_num_threads(n)
                times[name][n].append(step())
    result = {"cpu_count": os.cpu_count(), "load_before": round(load_before, 2), "load_after": round(load_avg(), 2),
              "rounds": args.rounds}
    for name, by_n in times.items():
        for n, ts in by_n.items():
            med = statistics.median(ts)
            result[f"{name}_threads{n}_median_s"] = round(med, 3)
            result[f"{name}_threads{n}_max_s"] = round(max(ts), 3)
            print(f"{name:16s} threads {n}: median {med:.3f} s, min {min(ts):.3f}, max {max(ts):.3f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
