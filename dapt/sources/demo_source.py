"""demo_source: the offline demo corpus, read from two pinned PyPI wheels opened as zip files (never installed).

- scancode-toolkit ships ScanCode's licence database: the full text of ~2,600 licences (`*.LICENSE`) and
  ~36,000 detection rules (`*.RULE`: notices, references, tags... each tied to a licence expression).
  That is the *domain* corpus, and the source of a labelled task: which category (Permissive, Copyleft...)
  is the licence a notice belongs to; and of a retrieval task: which licence text does a notice name.
- gensim ships two small general-English test corpora: a shortened Wikipedia dump and the Lee news corpus.
  That is the *general* reference text.

PyPI is the one source every machine of this project can reach (the model hubs are not), and a wheel pinned
by version and sha256 never changes under us. Everything here returns plain lists of dicts; writing files is
the calling stage's job (`stages/ingest.py`).
"""

from __future__ import annotations

import bz2
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path, PurePosixPath
from typing import IO

import mwparserfromhell
import numpy as np
import yaml
from mwparserfromhell.nodes import Node
from mwparserfromhell.wikicode import Wikicode
from sklearn.model_selection import StratifiedKFold
from sklearn.utils import resample

# ---------------------------------------------------------------------------------------------------
# pinned wheels


@dataclass(frozen=True)
class WheelPin:
    """One wheel on PyPI, pinned by exact file name and content hash."""

    name: str
    version: str
    filename: str
    sha256: str
    # pip only offers a wheel built for the target interpreter/platform; pinning them makes the download
    # the same file whatever host or Python version runs it
    python_version: str = "3.11"
    platform: str | None = None


WHEELS: dict[str, WheelPin] = {
    "scancode": WheelPin(
        name="scancode-toolkit",
        version="32.5.0",
        filename="scancode_toolkit-32.5.0-cp311-none-any.whl",
        sha256="327d20a0de71d49930d8a6919c2b6d54c2acf4dd0a1d48da9a71dd4ce7b97b78",
    ),
    "gensim": WheelPin(
        name="gensim",
        version="4.4.0",
        filename="gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
        sha256="91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
        platform="manylinux_2_28_x86_64",
    ),
}

LICENCE_DIR = "licensedcode/data/licenses/"
RULE_DIR = "licensedcode/data/rules/"
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE_MEMBER = "gensim/test/test_data/lee_background.cor"


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (the scancode wheel is 126 MB)."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def pip_download_command(pin: WheelPin, dest: Path) -> list[str]:
    """The `pip download` call that fetches exactly `pin.filename` into `dest`."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--python-version", pin.python_version, "--implementation", "cp", "--dest", str(dest)]
    if pin.platform:
        cmd += ["--platform", pin.platform]
    return cmd + [f"{pin.name}=={pin.version}"]


def fetch_wheel(pin: WheelPin, cache_dir: Path) -> Path:
    """Return `cache_dir/pin.filename`, downloading it with pip unless a copy with the right sha256 is there.

    The download goes to a temporary folder inside `cache_dir` and is moved into place only once its hash
    matches, so an interrupted or tampered download never sits at the final path.
    """
    target = cache_dir / pin.filename
    if target.is_file() and sha256_of(target) == pin.sha256:
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
        cmd = pip_download_command(pin, Path(tmp))
        # not captured: pip's own progress bar is the progress report for a 126 MB download
        result = subprocess.run(cmd, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"pip download failed with exit code {result.returncode}: {' '.join(cmd)}")
        downloaded = Path(tmp) / pin.filename
        if not downloaded.is_file():
            got = sorted(p.name for p in Path(tmp).iterdir())
            raise RuntimeError(f"pip download did not produce {pin.filename} (it wrote {got}): {' '.join(cmd)}")
        actual = sha256_of(downloaded)
        if actual != pin.sha256:
            raise ValueError(f"{pin.filename}: sha256 mismatch: expected {pin.sha256}, got {actual}")
        os.replace(downloaded, target)
    return target


# ---------------------------------------------------------------------------------------------------
# ScanCode licence database

# front matter: a `---` line, YAML, a `---` line, then the body; some rule files use CRLF line ends, and
# licences without a text end right after the closing `---`
_FRONT_MATTER = re.compile(r"\A---[ \t]*\r?\n(.*?)^---[ \t]*\r?$\n?(.*)\Z", re.DOTALL | re.MULTILINE)
# ScanCode marks a rule's required phrases as {{...}}; a marker may span lines
_REQUIRED_PHRASE = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
_FLAG_PREFIX = "is_license_"
# libyaml makes read_rules ~3x faster (3 s instead of 10 s); same safe semantics as yaml.safe_load
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def split_front_matter(text: str, source: str) -> tuple[dict, str]:
    """Split a ScanCode data file into its YAML front matter (a dict) and its body.

    `source` names the file in error messages.
    """
    match = _FRONT_MATTER.match(text)
    if match is None:
        raise ValueError(f"{source}: no YAML front matter (expected a '---' line, YAML, then a '---' line)")
    try:
        meta = yaml.load(match.group(1), Loader=_YAML_LOADER)
    except yaml.YAMLError as e:
        raise ValueError(f"{source}: malformed YAML front matter: {e}") from e
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise ValueError(f"{source}: front matter is a {type(meta).__name__}, expected a mapping of keys")
    return meta, match.group(2)


def strip_markers(text: str) -> str:
    """Remove ScanCode's `{{ }}` required-phrase markers, keeping the words inside them.

    Underscores next to markers (`__{{3-clause BSD__-License}}`, `` `...`__ ``) are left alone: they are
    the Markdown/reStructuredText of the scanned file itself, not ScanCode's markup, and the same `__` also
    spells Python's `__license__` in these rules.
    """
    return _REQUIRED_PHRASE.sub(r"\1", text)


def _members(zf: zipfile.ZipFile, directory: str, suffix: str, wheel: Path) -> list[str]:
    """Sorted member names directly in `directory` that end with `suffix`; an error if there are none."""
    names = sorted(n for n in zf.namelist() if n.startswith(directory) and n.endswith(suffix)
                   and "/" not in n[len(directory):])
    if not names:
        raise ValueError(f"{wheel}: no {directory}*{suffix} files; is this the pinned wheel?")
    return names


def _require(zf: zipfile.ZipFile, name: str, wheel: Path) -> None:
    """An error naming the wheel when a member the pinned wheel has is missing."""
    try:
        zf.getinfo(name)
    except KeyError:
        raise ValueError(f"{wheel}: no {name}; is this the pinned wheel?") from None


def _read_member(zf: zipfile.ZipFile, name: str, wheel: Path) -> str:
    """A zip member decoded as UTF-8 with newlines normalised to `\\n`."""
    _require(zf, name, wheel)
    try:
        text = zf.read(name).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{wheel}!{name}: invalid UTF-8 at byte {e.start}") from e
    return text.replace("\r\n", "\n")


def read_licences(wheel: Path) -> list[dict]:
    """`{"key", "name", "category", "text"}` for every licence in the wheel that has a text, sorted by key (`name`:
    the front matter's, "" where it has none).

    A handful of licences are placeholders (e.g. `unknown`, `generic-cla`) with metadata only; they are
    skipped.
    """
    licences = []
    with zipfile.ZipFile(wheel) as zf:
        for name in _members(zf, LICENCE_DIR, ".LICENSE", wheel):
            source = f"{wheel.name}!{name}"
            meta, body = split_front_matter(_read_member(zf, name, wheel), source)
            key = PurePosixPath(name).stem
            if meta.get("key", key) != key:
                raise ValueError(f"{source}: key {meta['key']!r} does not match the file name")
            if "category" not in meta:
                raise ValueError(f"{source}: front matter has no 'category'")
            text = strip_markers(body).strip()
            if text:
                licences.append({"key": key, "name": str(meta.get("name") or ""), "category": meta["category"],
                                 "text": text})
    return licences


def _flags(meta: dict) -> list[str]:
    """Short names of the rule's true `is_license_*` flags: `is_license_notice: yes` -> "notice"."""
    return sorted(key.removeprefix(_FLAG_PREFIX) for key, value in meta.items()
                  if key.startswith(_FLAG_PREFIX) and value is True)


def read_rules(wheel: Path) -> list[dict]:
    """`{"id", "license_expression", "flags", "text"}` for every rule with a text, sorted by id.

    `license_expression` is None for false-positive rules (texts that look like a licence but are not one).
    """
    rules = []
    with zipfile.ZipFile(wheel) as zf:
        for name in _members(zf, RULE_DIR, ".RULE", wheel):
            meta, body = split_front_matter(_read_member(zf, name, wheel), f"{wheel.name}!{name}")
            text = strip_markers(body).strip()
            if text:
                rules.append({"id": PurePosixPath(name).stem, "license_expression": meta.get("license_expression"),
                              "flags": _flags(meta), "text": text})
    return rules


def domain_documents(licences: list[dict], rules: list[dict]) -> list[dict]:
    """`{"id", "text"}` for every licence text then every rule text, each sorted by key/id."""
    docs = [{"id": f"licence:{lic['key']}", "text": lic["text"]} for lic in sorted(licences, key=itemgetter("key"))]
    docs += [{"id": f"rule:{rule['id']}", "text": rule["text"]} for rule in sorted(rules, key=itemgetter("id"))]
    return docs


# a compound expression ("mit AND apache-2.0", "gpl-2.0 WITH classpath-exception-2.0") names several licences,
# so it has no single category; ScanCode keys themselves never contain spaces or parentheses
_COMPOUND = re.compile(r"[\s()]")
TASK_FLAGS = ("text", "notice")  # the texts a reader would see in a file; tags and references are too short


def task_examples(licences: list[dict], rules: list[dict], categories: list[str],
                  flags: tuple[str, ...] = TASK_FLAGS) -> list[dict]:
    """Labelled examples: rules with one of `flags` (text or notice) for a single licence, labelled with its
    category.

    Returns `{"id", "text", "label", "group"}` where `group` is the licence key (examples of one licence
    must stay in one split) and `label` is one of `categories`; other categories are dropped, and so are
    repeated texts (see `_drop_duplicate_texts`).
    """
    category_of = {lic["key"]: lic["category"] for lic in licences}
    wanted = set(categories)
    examples = []
    for rule in rules:
        expression = rule["license_expression"]
        if not expression or _COMPOUND.search(expression) or not set(rule["flags"]) & set(flags):
            continue
        label = category_of.get(expression)
        if label in wanted:
            examples.append({"id": rule["id"], "text": rule["text"], "label": label, "group": expression})
    return _drop_duplicate_texts(examples)


def _drop_duplicate_texts(examples: list[dict]) -> list[dict]:
    """Keep one example per text; drop a text entirely if it belongs to more than one group.

    Rules differing only in their {{ }} markers become one text here. Under two licences the same text
    would sit in two splits (a leak), often with two labels (noise).
    """
    groups_of: dict[str, set[str]] = {}
    for ex in examples:
        groups_of.setdefault(ex["text"], set()).add(ex["group"])
    seen: set[str] = set()
    kept = []
    for ex in examples:
        if len(groups_of[ex["text"]]) == 1 and ex["text"] not in seen:
            seen.add(ex["text"])
            kept.append(ex)
    return kept


# ---------------------------------------------------------------------------------------------------
# splitting and capping


def _first_fold(labels: list[str], n_splits: int, seed: int) -> tuple[list[int], list[int]]:
    """(kept, held-out) positions: the first fold of a shuffled StratifiedKFold over `labels`."""
    folds = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    kept, held = next(folds.split(np.zeros(len(labels)), labels))
    return kept.tolist(), held.tolist()


def split_by_group(examples: list[dict], dev_fraction: float, test_fraction: float,
                   seed: int) -> dict[str, list[dict]]:
    """Split into train/dev/test so that all examples of a `group` land in one split, stratified by `label`.

    The fractions are of groups (licences), not of examples, so that every label gets its share of unseen
    groups in dev and test: test is one of round(1/test_fraction) folds of the groups, dev one fold of
    what remains. Groups, not examples, are the rows handed to StratifiedKFold: StratifiedGroupKFold
    balances example counts, and since one licence has over a thousand rules while most have a few, it
    put a single licence of a label in test. Every example of a group must carry the same label.
    Deterministic for a seed; each split keeps the input order.
    """
    if not (0 < dev_fraction < 1 and 0 < test_fraction < 1 and dev_fraction + test_fraction < 1):
        raise ValueError(f"dev_fraction={dev_fraction} and test_fraction={test_fraction} must be in (0, 1) "
                         "with a sum below 1")
    label_of: dict[str, str] = {}
    for ex in examples:
        if label_of.setdefault(ex["group"], ex["label"]) != ex["label"]:
            raise ValueError(f"group {ex['group']!r} has examples labelled {label_of[ex['group']]!r} and "
                             f"{ex['label']!r}; each group needs a single label")
    groups = sorted(label_of)  # sorted: the split must not depend on the order examples arrive in
    test_folds = max(2, round(1 / test_fraction))
    dev_folds = max(2, round((1 - test_fraction) / dev_fraction))
    rest, test = _first_fold([label_of[g] for g in groups], test_folds, seed)
    rest_groups = [groups[i] for i in rest]
    train, dev = _first_fold([label_of[g] for g in rest_groups], dev_folds, seed)
    split_of = {groups[i]: "test" for i in test}
    split_of |= {rest_groups[i]: "dev" for i in dev} | {rest_groups[i]: "train" for i in train}
    splits: dict[str, list[dict]] = {"train": [], "dev": [], "test": []}
    for ex in examples:
        splits[split_of[ex["group"]]].append(ex)
    return splits


def cap_per_group(examples: list[dict], max_per_group: int | None, seed: int) -> list[dict]:
    """At most `max_per_group` examples of each group (a seeded sample); input order kept. None: all.

    A few licences have over a thousand rules (gpl-2.0, mit, bsd-new): uncapped, whichever split they land
    in is dominated by them, and a category's score measures one licence rather than the category.
    """
    if max_per_group is None:
        return list(examples)
    by_group: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        by_group.setdefault(ex["group"], []).append(i)
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    for group in sorted(by_group):
        idx = by_group[group]
        keep += idx if len(idx) <= max_per_group else rng.choice(idx, max_per_group, replace=False).tolist()
    return [examples[i] for i in sorted(keep)]


def cap_examples(examples: list[dict], max_n: int | None, seed: int) -> list[dict]:
    """At most `max_n` examples, each label keeping its share; input order kept. None or a larger cap: all.

    sklearn's `resample` rather than `train_test_split(stratify=...)`, which refuses labels with one example.
    """
    if max_n is None or len(examples) <= max_n:
        return list(examples)
    keep = resample(np.arange(len(examples)), replace=False, n_samples=max_n,
                    stratify=[ex["label"] for ex in examples], random_state=seed)
    return [examples[i] for i in sorted(keep.tolist())]


# ---------------------------------------------------------------------------------------------------
# retrieval task: find the licence a notice names among all licence texts

# texts that name or point to a licence, what a reader finds in a file and would search with; full licence
# texts are the documents searched, and tags (`License: MIT` in a manifest) are markup, not a reader's text
QUERY_FLAGS = ("notice", "reference")


def retrieval_corpus(licences: list[dict]) -> list[dict]:
    """`{"id", "title", "text"}` for every licence, sorted by key: the whole search space, licences that no
    query asks for included. `title` is the licence's `name` ("" where it has none)."""
    return [{"id": lic["key"], "title": lic.get("name", ""), "text": lic["text"]}
            for lic in sorted(licences, key=itemgetter("key"))]


def retrieval_task(licences: list[dict], rules: list[dict], categories: list[str], dev_fraction: float,
                   test_fraction: float, max_per_licence: int | None, caps: dict[str, int | None],
                   seed: int) -> tuple[list[dict], dict[str, list[dict]]]:
    """(corpus, splits) of the demo's retrieval task: which licence does a notice or reference name?

    The corpus is `retrieval_corpus(licences)`. The queries are the rules flagged notice or reference for a
    single licence whose category is in `categories`, repeated texts dropped (`task_examples` with
    QUERY_FLAGS), each judged `{licence key: 1}`. They are chosen and split as the classification demo's
    examples are: at most `max_per_licence` per licence, then `split_by_group` (a licence's queries all in
    one split, stratified by category, so test asks for licences never seen in training), then at most
    `caps[split]` per split (`cap_examples`; None: all). Queries are `{"id", "text", "qrels"}`: the licence and
    any other licence with exactly its text (18 groups in ScanCode's data, e.g. ms-refl and ms-rsl), since no
    model could tell such twins apart.
    """
    if set(caps) != {"train", "dev", "test"}:
        raise ValueError(f"caps has keys {sorted(caps)}; expected exactly train, dev and test")
    queries = task_examples(licences, rules, categories, flags=QUERY_FLAGS)
    queries = cap_per_group(queries, max_per_licence, seed)
    splits = split_by_group(queries, dev_fraction, test_fraction, seed)
    splits = {split: cap_examples(splits[split], caps[split], seed) for split in splits}
    # label (category) and group (licence) served the split only; the licence (and its twins) is now relevant
    same_text: dict[str, list[str]] = {}
    for lic in sorted(licences, key=itemgetter("key")):
        same_text.setdefault(lic["text"], []).append(lic["key"])
    twins = {key: keys for keys in same_text.values() for key in keys}
    judged = {split: [{"id": q["id"], "text": q["text"], "qrels": dict.fromkeys(twins.get(q["group"], [q["group"]]), 1)}
                      for q in splits[split]] for split in splits}
    return retrieval_corpus(licences), judged


# ---------------------------------------------------------------------------------------------------
# general text: Wikipedia and Lee news from gensim's test data

ARTICLE_NAMESPACE = "0"
# tags whose content is not prose: citations, tables, image galleries, TeX, code listings
_DROP_TAGS = {"ref", "references", "table", "gallery", "math", "source", "syntaxhighlight", "timeline", "score"}
# link namespaces that are not running text: images (their captions read as stray fragments) and categories
_DROP_LINK_PREFIXES = {"file", "image", "media", "category"}
# end-of-article sections that are lists of citations and links, not prose
_DROP_SECTIONS = {"references", "notes", "footnotes", "sources", "citations", "bibliography", "further reading",
                  "external links", "see also"}
_BOLD_ITALIC = re.compile(r"'{2,}")
_EMPTY_PARENS = re.compile(r"\(\s*[,;]?\s*\)")  # left behind by removed templates, e.g. "Albedo ({{IPA|...}})"
_SPACES = re.compile(r"[ \t\u00a0]+")
_BLANK_LINES = re.compile(r"\n{3,}")


def _remove(code: Wikicode, node: Node | Wikicode) -> None:
    """Remove a node, which may already be gone with an enclosing node removed before it."""
    # most dropped nodes sit at the top level; the recursive search of the whole tree is the slow path
    for recursive in (False, True):
        try:
            code.remove(node, recursive=recursive)
            return
        except ValueError:
            pass


def wikitext_to_text(wikitext: str) -> str:
    """Plain text of a Wikipedia article: prose paragraphs separated by blank lines, markup removed."""
    # style tags off: MediaWiki closes '' and ''' at each line end, but the parser lets an unclosed one
    # swallow the rest of the article (headings included), which would defeat the section filter
    code = mwparserfromhell.parse(wikitext, skip_style_tags=True)
    for section in code.get_sections(levels=[2]):
        if section.filter_headings()[0].title.strip_code().strip().lower() in _DROP_SECTIONS:
            _remove(code, section)
    for tag in code.filter_tags():
        if tag.tag.strip_code().strip().lower() in _DROP_TAGS:
            _remove(code, tag)
    for link in code.filter_wikilinks():
        if str(link.title).split(":", 1)[0].strip().lower() in _DROP_LINK_PREFIXES:
            _remove(code, link)
    # templates and comments are dropped by strip_code itself
    text = code.strip_code(normalize=True, collapse=True)
    text = _EMPTY_PARENS.sub("", _BOLD_ITALIC.sub("", text))
    lines = (_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def _mediawiki_pages(stream: IO[bytes]) -> Iterator[dict]:
    """`{"title", "ns", "redirect", "text"}` for each <page> of a MediaWiki XML export, streamed."""
    namespace = ""
    for event, elem in ET.iterparse(stream, events=("start", "end")):
        if event == "start":
            if not namespace and elem.tag.startswith("{"):
                # the export schema version (0.10, 0.11...) is in the namespace URI; take it from the root
                namespace = elem.tag[: elem.tag.index("}") + 1]
            continue
        if elem.tag == f"{namespace}page":
            yield {"title": elem.findtext(f"{namespace}title", ""),
                   "ns": elem.findtext(f"{namespace}ns", ""),
                   "redirect": elem.find(f"{namespace}redirect") is not None,
                   "text": elem.findtext(f"{namespace}revision/{namespace}text", "")}
            elem.clear()  # keep memory flat over a long dump


def read_wikipedia(wheel: Path) -> list[dict]:
    """`{"id": "wiki:<title>", "text"}` for each article (main namespace, not a redirect) in gensim's dump."""
    docs = []
    with zipfile.ZipFile(wheel) as zf:
        _require(zf, WIKI_MEMBER, wheel)
        with zf.open(WIKI_MEMBER) as raw, bz2.open(raw) as xml:
            for page in _mediawiki_pages(xml):
                redirect = page["redirect"] or page["text"].lstrip().upper().startswith("#REDIRECT")
                if page["ns"] != ARTICLE_NAMESPACE or redirect:
                    continue
                text = wikitext_to_text(page["text"])
                if text:
                    docs.append({"id": f"wiki:{page['title']}", "text": text})
    return docs


def read_lee(wheel: Path) -> list[dict]:
    """`{"id": "lee:<line number>", "text"}` for each article of gensim's Lee background corpus."""
    with zipfile.ZipFile(wheel) as zf:
        lines = _read_member(zf, LEE_MEMBER, wheel).split("\n")
    return [{"id": f"lee:{n}", "text": line.strip()} for n, line in enumerate(lines, 1) if line.strip()]
