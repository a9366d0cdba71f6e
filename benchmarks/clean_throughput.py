"""Throughput and memory of the configured cleaning (params.yaml `clean`) on the demo corpus, 1x and 10x.

Each size runs in a fresh process with one worker, so its time is one core's and its peak RSS is its own:
- `mb_per_s_per_core`: input MB / seconds of normalisation + filters + exact dedup (phases filter, exact_*);
- `minhash_docs_per_s_per_core`: documents entering near-dedup / seconds of the four MinHash phases;
- `rss_ratio_10x`: peak RSS of the 10x run / peak RSS of the 1x run (streaming: should stay near 1).
The 10x corpus is the demo's shards copied ten times with new ids: exact dedup removes the copies, which is
what a re-crawl looks like, and every document still passes through normalisation and the filters.

Needs the demo inputs (`dvc repro ingest`). Run: `python benchmarks/clean_throughput.py`; the last line is JSON.
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(source: str, out: str) -> None:
    """One cleaning run (domain text, with decontamination and both dedups) in this process."""
    import os

    os.chdir(ROOT)
    from dapt.common import load_params, load_paths
    from stages.clean import CleanParams, filter_and_dedup, task_texts

    paths = load_paths()
    p = load_params("clean", CleanParams)
    p = p.model_copy(update={"executor": p.executor.model_copy(update={"engine": "local", "workers": 1})})
    context = task_texts(paths.task)
    work = Path(tempfile.mkdtemp(prefix="clean-bench-"))
    try:
        _, stats, seconds = filter_and_dedup(p, "domain", Path(source), work / "domain", work / "samples", context,
                                             True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    files = sorted(Path(source).glob("*.jsonl"))
    result = {
        "input_mb": sum(f.stat().st_size for f in files) / 1e6,
        "input_docs": sum(1 for f in files for _ in f.open("rb")),
        "seconds": seconds,
        "near_docs": stats.get("near_dedup_signatures", {}).get("total", 0),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    Path(out).write_text(json.dumps(result))


def replicate(source: Path, target: Path, times: int) -> None:
    target.mkdir(parents=True)
    for copy in range(times):
        for shard in sorted(source.glob("*.jsonl")):
            with shard.open(encoding="utf-8") as src, (target / f"{copy:03d}_{shard.name}").open("w") as dst:
                for line in src:
                    doc = json.loads(line)
                    doc["id"] = f"{doc['id']}#{copy}"
                    dst.write(json.dumps(doc, ensure_ascii=False) + "\n")


def measure(source: Path) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([sys.executable, __file__, "--child", str(source), out.name], check=True, cwd=ROOT,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        r = json.loads(Path(out.name).read_text())
    s = r["seconds"]
    filt = sum(v for k, v in s.items() if k == "filter" or k.startswith("exact"))
    near = sum(v for k, v in s.items() if k.startswith("near"))
    r["mb_per_s_per_core"] = r["input_mb"] / filt
    r["docs_per_s_per_core"] = r["input_docs"] / filt
    r["minhash_docs_per_s_per_core"] = r["near_docs"] / near if near else None
    return r


def main() -> None:
    import os

    from dapt.common import load_paths

    os.chdir(ROOT)
    source = load_paths().raw_domain
    if not source.is_dir() or not any(source.glob("*.jsonl")):
        sys.exit(f"{source}: no demo shards; run `dvc repro ingest` first")
    with tempfile.TemporaryDirectory(prefix="clean-bench-") as tmp:
        ten = Path(tmp) / "x10"
        replicate(source, ten, 10)
        one, tenx = measure(source), measure(ten)
    for name, r in (("1x", one), ("10x", tenx)):
        print(f"{name}: {r['input_docs']:,} docs, {r['input_mb']:.1f} MB | normalise+filters+exact dedup "
              f"{r['mb_per_s_per_core']:.2f} MB/s/core ({r['docs_per_s_per_core']:,.0f} docs/s/core) | MinHash "
              f"{r['near_docs']:,} docs at {r['minhash_docs_per_s_per_core'] or 0:,.0f} docs/s/core | peak RSS "
              f"{r['peak_rss_mb']:.0f} MB | phases {', '.join(f'{k} {v:.1f}s' for k, v in r['seconds'].items())}")
    print(json.dumps({"mb_per_s_per_core": round(one["mb_per_s_per_core"], 2),
                      "minhash_docs_per_s_per_core": round(one["minhash_docs_per_s_per_core"] or 0),
                      "rss_ratio_10x": round(tenx["peak_rss_mb"] / one["peak_rss_mb"], 3),
                      "mb_per_s_per_core_10x": round(tenx["mb_per_s_per_core"], 2),
                      "peak_rss_mb_1x": round(one["peak_rss_mb"]), "peak_rss_mb_10x": round(tenx["peak_rss_mb"])}))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
    else:
        main()
