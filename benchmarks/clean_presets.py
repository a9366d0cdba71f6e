"""Drops of every cleaning preset (params.yaml `clean.preset`) on given corpora: per preset and corpus, the
documents each step drops, by reason, and the share of the corpus that is.

The steps are params.yaml's `clean.steps` (their order, and any key written there over the preset's), as the
stage runs them on the domain corpus, without decontamination (it needs the task) and without dedup (no preset
changes it). The dropped documents are written as the stage writes them, to
`<samples>/<preset>/<corpus>/dropped_<step>_<reason>.jsonl`: read them to judge a threshold.

Run: `python benchmarks/clean_presets.py /work/extdata/scientific_abstracts.jsonl data/raw/general.jsonl`
(JSONL files or folders of them, one `{"id", "text"}` a line; `--presets web,legal`, `--samples DIR`,
`--dropped-samples N`). The last line is JSON: {preset: {corpus: {"docs", "dropped", "rate", "reasons"}}}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dapt.cleaning.filters import PRESETS  # noqa: E402
from dapt.common import load_params  # noqa: E402
from stages.clean import CleanParams, corpus_size, drops, filter_and_dedup, gather_samples  # noqa: E402


def preset_drops(p: CleanParams, source: Path, samples: Path) -> dict:
    """One preset on one corpus: document count, drops by "step/reason", their total and rate."""
    work = Path(tempfile.mkdtemp(prefix="clean-presets-"))
    try:
        _, stats, _ = filter_and_dedup(p, source.stem, source, work / "run", work / "samples",
                                       {"eval_texts": [], "train_texts": []}, dedup=False, skip=("decontaminate",))
        samples.mkdir(parents=True, exist_ok=True)
        gather_samples(work / "samples", samples, p.dropped_samples)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    docs, _ = corpus_size(source)
    reasons = {f"{step}/{reason}": n for step, by in drops(stats).items() for reason, n in by.items()}
    dropped = sum(reasons.values())
    return {"docs": docs, "dropped": dropped, "rate": round(dropped / docs, 4) if docs else 0.0, "reasons": reasons}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("corpora", nargs="+", type=Path, help="JSONL files or folders of them")
    parser.add_argument("--presets", default=",".join(PRESETS), help="comma-separated (default: all)")
    parser.add_argument("--samples", type=Path, default=Path(tempfile.gettempdir()) / "clean_presets",
                        help="where the dropped documents go")
    parser.add_argument("--dropped-samples", type=int, default=50, help="documents kept per step and reason")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    args = parser.parse_args()

    base = load_params("clean", CleanParams, args.params)
    # one process: the numbers do not depend on the machine's cores
    base = base.model_copy(update={"executor": base.executor.model_copy(update={"engine": "local", "tasks": 1,
                                                                                "workers": 1}),
                                   "dropped_samples": args.dropped_samples})
    results: dict[str, dict[str, dict]] = {}
    for preset in args.presets.split(","):
        p = CleanParams.model_validate({**base.model_dump(), "preset": preset})  # validated: names a bad preset
        for source in args.corpora:
            r = preset_drops(p, source, args.samples / preset / source.stem)
            results.setdefault(preset, {})[source.stem] = r
            print(f"{preset:<11} {source.stem:<28} {r['docs']:>7,} docs  {r['dropped']:>6,} dropped "
                  f"({r['rate']:.2%})")
            for reason, n in sorted(r["reasons"].items(), key=lambda kv: -kv[1]):
                print(f"{'':<13}{reason:<50} {n:>6,}  {n / r['docs']:.2%}")
    print(f"samples: {args.samples}/<preset>/<corpus>/dropped_<step>_<reason>.jsonl")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
