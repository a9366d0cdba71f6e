"""Preparing pretraining blocks: the 🤗 datasets path (`dapt.pretraining.blocks`) against the in-memory one it replaced.

Both prepare the blocks of the demo's cleaned domain corpus (`paths.domain_train`, `dvc repro clean`), copied 1x
and 10x, with the demo's base tokenizer (`models/general`), each run in a fresh process:
- new: Parquet shards -> `Dataset.map(batched, num_proc)` -> Arrow token cache -> `TokenBlocks` (memory-mapped);
- baseline: the previous `pretrain.cached_blocks`: one JSONL file read into a list, `mlm.pack` into one tensor,
  `torch.save`d, keyed by a hash of the whole file read into memory.
Peak memory is the peak of the anonymous memory of the run's process tree (`Pss_Anon`: shared pages counted once,
map's worker processes included, the page cache of mapped files not), sampled every 20 ms, above its level once
the libraries are imported and warmed up on the corpus's first 200 documents (lazy imports, the tokenizer's
thread pool: a fixed cost of about 200 MB for the new path, which the README states). Time is from the corpus on
disk to blocks ready to train on. The new path's blocks are checked equal to the baseline's (every one at 1x; a
sample at 10x), and reading them all back is timed (`read_blocks_per_s`).

The new path runs twice: with `--num-proc` map processes (default: every core, as the stage does) and with one
(the tokenizer's own threads only). `tokens_per_s` is measured on the 10x corpus, where start-up costs (the
process pool, reading shard footers) no longer dominate, `tokens_per_s_1x` on the 1x one.

Run: `python benchmarks/pretrain_data.py [--num-proc N]`; the last line is JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def tree_pss_mb(pid: int) -> float:
    """Anonymous memory of a process and its children, each shared page counted once (`Pss_Anon`): what the run
    holds, without the page cache of the files it maps."""
    import psutil

    total = 0
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return 0.0
    for p in procs:
        try:
            with open(f"/proc/{p.pid}/smaps_rollup") as f:
                total += sum(int(line.split()[1]) for line in f if line.startswith("Pss_Anon:"))
        except OSError:
            pass
    return total / 1024


class PeakMemory:
    """The peak of this process tree's summed PSS while the block runs, above its level at the start."""

    def __enter__(self):
        self.start = self.peak = tree_pss_mb(os.getpid())
        self.running = True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self):
        while self.running:
            self.peak = max(self.peak, tree_pss_mb(os.getpid()))
            time.sleep(0.02)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, tree_pss_mb(os.getpid()))
        self.added = self.peak - self.start


def child(kind: str, source: str, cache: str, tokenizer: str, block: int, num_proc: int, out: str) -> None:
    import torch
    from transformers import AutoTokenizer

    from dapt.common import read_jsonl
    from dapt.pretraining import mlm
    from dapt.pretraining.blocks import token_blocks

    tok = AutoTokenizer.from_pretrained(tokenizer)
    result: dict = {}
    warm(kind, tok, Path(source), Path(cache) / "warm", block, num_proc)
    with PeakMemory() as mem:
        started = time.perf_counter()
        if kind == "new":
            blocks = token_blocks(tok, Path(source), block, Path(cache), num_proc)
            result["tokens"], result["blocks"] = blocks.tokens, len(blocks)
        else:  # the previous stages.pretrain.cached_blocks, as it was
            path = Path(source)
            key = hashlib.sha1(tok.backend_tokenizer.to_str().encode() + path.read_bytes() + str(block).encode()
                               + Path(mlm.__file__).read_bytes()).hexdigest()
            blocks = mlm.pack(tok, [d["text"] for d in read_jsonl(path)], block)
            Path(cache).mkdir(parents=True, exist_ok=True)
            torch.save(blocks, Path(cache) / f"blocks-{key[:16]}.pt")
            result["blocks"] = len(blocks)
            result["tokens"] = None  # the in-memory stream is gone; the new path's count is the reference
        result["seconds"] = time.perf_counter() - started
    result["peak_rss_mb"] = mem.added
    if kind == "new":
        started = time.perf_counter()
        n = len(blocks)
        for i in range(n):
            blocks[i]
        result["read_blocks_per_s"] = n / (time.perf_counter() - started)
        reference = Path(cache) / "reference.pt"  # the baseline's blocks, for the equality check
        if reference.exists():
            ref = torch.load(reference)
            step = 1 if len(ref) <= 100_000 else len(ref) // 10_000
            result["equal_to_baseline"] = len(ref) == n and all(torch.equal(blocks[i], ref[i])
                                                                for i in range(0, n, step))
    Path(out).write_text(json.dumps(result))


def warm(kind: str, tok, source: Path, folder: Path, block: int, num_proc: int) -> None:
    """Both paths once on the first 200 documents: what is imported or initialised lazily is not measured."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dapt.common import iter_texts
    from dapt.pretraining import mlm
    from dapt.pretraining.blocks import token_blocks

    texts = next(iter_texts(source, batch_size=200))
    folder.mkdir(parents=True)
    if kind == "new":
        pq.write_table(pa.table({"text": texts}), folder / "part-00000.parquet")
        token_blocks(tok, folder, block, folder / "cache", num_proc)
    else:
        mlm.pack(tok, texts, block)
    shutil.rmtree(folder)


def write_copies(source: Path, folder: Path, times: int, shard_docs: int) -> tuple[Path, Path]:
    """The corpus `times` over as Parquet shards (what clean writes) and as one JSONL file (what it wrote before)."""
    from dapt.common import iter_texts, write_jsonl, write_text_shards

    shards, jsonl = folder / "shards", folder / "corpus.jsonl"
    texts = [t for batch in iter_texts(source) for t in batch]
    rows = [{"id": f"{i}#{c}", "text": t} for c in range(times) for i, t in enumerate(texts)]
    write_jsonl(jsonl, rows)
    write_text_shards(shards, rows, shard_docs)  # as clean writes them
    return shards, jsonl


def measure(kind: str, source: Path, cache: Path, tokenizer: Path, block: int, num_proc: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([sys.executable, __file__, "--child", kind, str(source), str(cache), str(tokenizer),
                        str(block), str(num_proc), out.name], check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        return json.loads(Path(out.name).read_text())


def main() -> None:
    import yaml

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-proc", type=int, default=os.cpu_count(), help="Dataset.map processes (new path)")
    parser.add_argument("--times", type=int, nargs=2, default=[1, 10], help="the two corpus sizes")
    args = parser.parse_args()
    os.chdir(ROOT)
    params = yaml.safe_load(Path("params.yaml").read_text())
    source = Path(params["paths"]["domain_train"])
    tokenizer = Path(params["paths"]["models"]) / "general"
    block = params["pretrain"]["max_seq_length"]
    shard_docs = params["clean"].get("shard_docs", 100_000)
    if not source.exists() or not tokenizer.exists():
        sys.exit(f"{source} or {tokenizer} missing: run `dvc repro clean` first")
    runs = {"new": args.num_proc, "new_one_process": 1}  # name -> Dataset.map processes
    results = {}
    with tempfile.TemporaryDirectory(prefix="pretrain-data-") as tmp:
        for times in args.times:
            shards, jsonl = write_copies(source, Path(tmp) / f"x{times}", times, shard_docs)
            r = results[times] = {"parquet_mb": sum(f.stat().st_size for f in shards.glob("*.parquet")) / 1e6,
                                  "jsonl_mb": jsonl.stat().st_size / 1e6}
            cache = Path(tmp) / f"cache{times}"
            r["baseline"] = measure("baseline", jsonl, cache, tokenizer, block, 1)
            (next(cache.glob("blocks-*.pt"))).rename(cache / "reference.pt")
            for name, num_proc in runs.items():
                r[name] = measure("new", shards, cache, tokenizer, block, num_proc)
                r["cache_mb"] = sum(f.stat().st_size for f in cache.rglob("*.arrow")) / 1e6
                for folder in cache.iterdir():
                    if folder.is_dir():
                        shutil.rmtree(folder)
            shutil.rmtree(cache)
            new, base = r["new"], r["baseline"]
            print(f"{times}x: {new['tokens']:,} tokens, {new['blocks']:,} blocks; JSONL {r['jsonl_mb']:.1f} MB, "
                  f"Parquet {r['parquet_mb']:.1f} MB, token cache {r['cache_mb']:.1f} MB | "
                  f"baseline {base['seconds']:.1f} s "
                  f"(+{base['peak_rss_mb']:.0f} MB) | " + " | ".join(
                      f"{name} ({num_proc} proc) {r[name]['seconds']:.1f} s (+{r[name]['peak_rss_mb']:.0f} MB, read "
                      f"back {r[name]['read_blocks_per_s']:,.0f} blocks/s, equal: {r[name].get('equal_to_baseline')})"
                      for name, num_proc in runs.items()), flush=True)
    one, ten = (results[t] for t in args.times)
    cores = os.cpu_count()

    def summary(kind: str, prefix: str, processes: int) -> dict:
        """tokens/s on the 10x corpus (start-up costs amortised, as on a real corpus), and on the 1x one."""
        tokens_per_s = ten["new"]["tokens"] / ten[kind]["seconds"]
        return {f"{prefix}tokens_per_s": round(tokens_per_s),
                f"{prefix}tokens_per_s_per_core": round(tokens_per_s / processes),
                f"{prefix}tokens_per_s_1x": round(one["new"]["tokens"] / one[kind]["seconds"]),
                f"{prefix}peak_rss_mb_1x": round(one[kind]["peak_rss_mb"], 1),
                f"{prefix}peak_rss_mb_10x": round(ten[kind]["peak_rss_mb"], 1),
                f"{prefix}rss_ratio_10x": round(ten[kind]["peak_rss_mb"] / max(one[kind]["peak_rss_mb"], 1), 2)}

    print(json.dumps({**summary("new", "", min(args.num_proc, cores)),
                      **summary("new_one_process", "one_process_", 1),
                      # the baseline's tokenizer runs on every core (its Rust threads): per core is per machine core
                      **summary("baseline", "baseline_", cores),
                      "speedup": round(ten["baseline"]["seconds"] / ten["new"]["seconds"], 2),
                      "speedup_1x": round(one["baseline"]["seconds"] / one["new"]["seconds"], 2),
                      "cores": cores, "num_proc": args.num_proc,
                      "equal_blocks": all(r[k].get("equal_to_baseline") for r in results.values() for k in runs),
                      "cache_bytes_per_token": round(ten["cache_mb"] * 1e6 / ten["new"]["tokens"], 2),
                      "read_blocks_per_s": round(one["new"]["read_blocks_per_s"])}))


if __name__ == "__main__":
    if len(sys.argv) == 9 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6]), int(sys.argv[7]), sys.argv[8])
    else:
        main()
