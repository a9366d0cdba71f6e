"""clean: normalise, filter, deduplicate and decontaminate the domain text; split train/validation.

Every drop has a named reason and is counted in `metrics/clean.json`. Decontamination removes domain
documents whose normalised text equals a task dev/test text (`contaminated`) or shares a run of
`decontaminate_ngram` words with one (`ngram_overlap`), so pretraining never sees evaluation text. Runs of
words found in more than `decontaminate_max_df` domain documents are the domain's boilerplate and do not
count.
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

from pydantic import Field, model_validator
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
    decontaminate_ngram: int = Field(ge=0)
    decontaminate_max_df: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _bounds(self) -> CleanParams:
        if self.min_words > self.max_words:
            raise ValueError(f"clean.min_words ({self.min_words}) exceeds clean.max_words ({self.max_words})")
        return self


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


def word_ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """Lower-cased word n-grams (the unit of GPT-3-style overlap decontamination)."""
    words = text.lower().split()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


@dataclass(frozen=True)
class Contamination:
    """Evaluation texts pretraining must not see: exact copies, and any shared run of `n` words.

    The n-gram rule also catches a domain document that *contains* an evaluation text (a full licence
    that embeds a test notice) or differs from it in a name or a year.
    """

    fingerprints: frozenset[str]
    ngrams: frozenset[tuple[str, ...]]
    n: int

    @classmethod
    def of(cls, texts: Iterable[str], n: int, corpus: Iterable[str] = (), max_df: int | None = None) -> Contamination:
        """From the held-out texts; n-grams found in more than `max_df` documents of `corpus` are left out.

        Those are the domain's boilerplate ("provided as is, without warranty of any kind"), shared by
        thousands of documents: dropping every document that contains one would drop most of the corpus
        without removing anything specific to an evaluation text.
        """
        texts = [normalise(t) for t in texts]
        grams = {g for t in texts for g in word_ngrams(t, n)} if n else set()
        if grams and max_df is not None:
            df: Counter = Counter()
            for doc in tqdm(corpus, desc="n-gram document frequency", unit="doc", mininterval=2):
                df.update(grams.intersection(word_ngrams(normalise(doc), n)))
            grams = {g for g in grams if df[g] <= max_df}
        return cls(frozenset(fingerprint(t) for t in texts), frozenset(grams), n)

    def reason(self, text: str, fp: str) -> str | None:
        if fp in self.fingerprints:
            return "contaminated"
        if self.ngrams and not self.ngrams.isdisjoint(word_ngrams(text, self.n)):
            return "ngram_overlap"
        return None


NO_CONTAMINATION = Contamination(frozenset(), frozenset(), 0)


def clean_docs(docs: Iterable[dict], filters: list, contamination: Contamination, counts: Counter) -> list[dict]:
    """Normalise, filter, decontaminate and drop exact duplicates.

    `counts` receives one entry per drop reason plus `kept`; returned docs carry their fingerprint.
    """
    seen: set[str] = set()
    out = []
    for doc in tqdm(docs, desc="cleaning", unit="doc", mininterval=2):
        text = normalise(doc["text"])
        reason = next((f.name for f in filters if not f.keep(text)), None)
        fp = fingerprint(text)
        if reason is None:
            reason = contamination.reason(text, fp)
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
        raw_domain = read_jsonl(paths.raw_domain)
        contamination = NO_CONTAMINATION
        if p.decontaminate:
            held_out = [ex["text"] for split in ("dev", "test") for ex in read_jsonl(paths.task / f"{split}.jsonl")]
            contamination = Contamination.of(held_out, p.decontaminate_ngram, (d["text"] for d in raw_domain),
                                             p.decontaminate_max_df)

        domain_counts: Counter = Counter()
        domain = clean_docs(raw_domain, filters, contamination, domain_counts)
        train, valid = split_domain(domain, p.valid_fraction, p.max_valid_docs)
        general_counts: Counter = Counter()
        general = clean_docs(read_jsonl(paths.raw_general), filters, NO_CONTAMINATION, general_counts)
        general = sorted(general, key=lambda d: d["fp"])[: p.general_max_docs]
        for name, docs, counts in (("domain train", train, domain_counts), ("domain validation", valid, domain_counts),
                                   ("general", general, general_counts)):
            if not docs:
                raise ValueError(f"clean: {name} text is empty after filtering; drops by reason: {dict(counts)}")

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
