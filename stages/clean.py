"""clean: normalise, filter, deduplicate and decontaminate the domain text; split train/validation.

Every drop has a named reason and is counted in `metrics/clean.json`. Decontamination removes domain
documents whose normalised text equals a task dev/test text, so pretraining never sees evaluation text.
The train/validation split is decided by a hash of the normalised text: stable across runs, machines and
document order.

Run: `dvc repro clean` (or `python -m stages.clean`).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from pydantic import Field
from tqdm.auto import tqdm

from stages import tracking
from stages.common import Paths, Section, load_params, load_paths, log, read_jsonl, setup_logging, \
    write_json, write_jsonl


class CleanParams(Section):
    min_words: int = Field(ge=1)
    max_words: int = Field(ge=1)
    valid_fraction: float = Field(gt=0, lt=0.5)
    max_valid_docs: int = Field(ge=1)
    general_max_docs: int = Field(ge=1)
    decontaminate: bool = True


# ---------------------------------------------------------------------------------------------------
# normalisation and filters (pure; one decision each, with a name that is counted)

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SPACES = re.compile(r"[ \t\u00a0]+")
_BLANK_LINES = re.compile(r"\n\s*\n\s*\n+")


def normalise(text: str) -> str:
    """NFC, no control characters, single spaces, at most one blank line, stripped."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub(" ", text)
    text = _SPACES.sub(" ", text)
    text = "\n".join(line.strip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", text).strip()


def fingerprint(text: str) -> str:
    """Identity of a text for dedup, decontamination and the split: case and spacing do not count."""
    return hashlib.sha1(" ".join(text.lower().split()).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class MinWords:
    n: int
    name: str = "too_short"

    def keep(self, text: str) -> bool:
        return len(text.split()) >= self.n


@dataclass(frozen=True)
class MaxWords:
    n: int
    name: str = "too_long"

    def keep(self, text: str) -> bool:
        return len(text.split()) <= self.n


def clean_docs(docs: Iterable[dict], filters: list, blocked: set[str], counts: Counter) -> list[dict]:
    """Normalise, filter, drop blocked fingerprints (decontamination) and exact duplicates.

    `counts` receives one entry per drop reason plus `kept`; returned docs carry their fingerprint.
    """
    seen: set[str] = set()
    out = []
    for doc in tqdm(docs, desc="cleaning", unit="doc", mininterval=2):
        text = normalise(doc["text"])
        reason = next((f.name for f in filters if not f.keep(text)), None)
        fp = fingerprint(text)
        if reason is None and fp in blocked:
            reason = "contaminated"
        if reason is None and fp in seen:
            reason = "duplicate"
        if reason:
            counts[reason] += 1
            continue
        seen.add(fp)
        counts["kept"] += 1
        out.append({"id": doc["id"], "text": text, "fp": fp})
    return out


def is_validation(fp: str, fraction: float) -> bool:
    """Hash-based split: the first 8 hex digits of the fingerprint as a number in [0, 1)."""
    return int(fp[:8], 16) / 16**8 < fraction


def split_domain(docs: list[dict], fraction: float, max_valid: int) -> tuple[list[dict], list[dict]]:
    """Train/validation by hash; validation capped at `max_valid` (the lowest hashes, so still stable)."""
    valid = sorted((d for d in docs if is_validation(d["fp"], fraction)), key=lambda d: d["fp"])
    chosen = {d["fp"] for d in valid[:max_valid]}
    train = [d for d in docs if d["fp"] not in chosen]
    return train, [d for d in docs if d["fp"] in chosen]


def strip_fp(docs: list[dict]) -> list[dict]:
    return [{"id": d["id"], "text": d["text"]} for d in docs]


# ---------------------------------------------------------------------------------------------------


def run(p: CleanParams, paths: Paths) -> None:
    """Clean domain and general text, write the splits and per-reason counts."""
    with tracking.stage_run("clean", p):
        filters = [MinWords(p.min_words), MaxWords(p.max_words)]
        blocked: set[str] = set()
        if p.decontaminate:
            for split in ("dev", "test"):
                blocked |= {fingerprint(normalise(ex["text"])) for ex in read_jsonl(paths.task / f"{split}.jsonl")}

        domain_counts: Counter = Counter()
        domain = clean_docs(read_jsonl(paths.raw_domain), filters, blocked, domain_counts)
        train, valid = split_domain(domain, p.valid_fraction, p.max_valid_docs)
        general_counts: Counter = Counter()
        general = clean_docs(read_jsonl(paths.raw_general), filters, set(), general_counts)
        general = sorted(general, key=lambda d: d["fp"])[: p.general_max_docs]
        for name, docs in (("domain train", train), ("domain validation", valid), ("general", general)):
            if not docs:
                raise ValueError(f"clean: {name} text is empty after filtering; counts: {dict(domain_counts)}")

        write_jsonl(paths.domain_train, strip_fp(train))
        write_jsonl(paths.domain_valid, strip_fp(valid))
        write_jsonl(paths.general_valid, strip_fp(general))
        metrics = {
            "domain": dict(domain_counts),
            "general": dict(general_counts),
            "domain_train_docs": len(train),
            "domain_valid_docs": len(valid),
            "general_valid_docs": len(general),
            "domain_train_words": sum(len(d["text"].split()) for d in train),
        }
        write_json(paths.metrics / "clean.json", metrics)
        tracking.log_metrics(metrics)
        log.info("clean: %s", metrics)


def main() -> None:
    setup_logging()
    run(load_params("clean", CleanParams), load_paths())


if __name__ == "__main__":
    main()
