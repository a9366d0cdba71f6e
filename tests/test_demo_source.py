"""Unit tests for dapt/sources/demo_source.py: tiny inline inputs, a tiny wheel-shaped zip, no network."""

from __future__ import annotations

import bz2
import hashlib
import subprocess
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from dapt.sources import demo_source as ds

# ---------------------------------------------------------------------------------------------------
# front matter and markers


def test_split_front_matter_reads_yaml_and_body() -> None:
    text = "---\nkey: mit\ncategory: Permissive\nis_exception: no\n---\n\nMIT text\n"
    meta, body = ds.split_front_matter(text, "x")
    assert meta == {"key": "mit", "category": "Permissive", "is_exception": False}
    assert body == "\nMIT text\n"


def test_split_front_matter_accepts_crlf_and_no_body() -> None:
    meta, body = ds.split_front_matter("---\r\nlicense_expression: mit\r\n---\r\n\r\nText", "x")
    assert meta == {"license_expression": "mit"} and body == "\r\nText"
    meta, body = ds.split_front_matter("---\nkey: unknown\n---", "x")
    assert meta == {"key": "unknown"} and body == ""


@pytest.mark.parametrize("text, problem", [
    ("---\nkey: [unclosed\n---\nbody", "malformed YAML"),
    ("key: mit\nno dashes at all", "no YAML front matter"),
    ("---\nkey: mit\nbody without a closing line", "no YAML front matter"),
    ("---\n- a\n- b\n---\nbody", "is a list"),
])
def test_split_front_matter_errors_name_the_source(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as err:
        ds.split_front_matter(text, "wheel.whl!licenses/mit.LICENSE")
    assert "wheel.whl!licenses/mit.LICENSE" in str(err.value)


@pytest.mark.parametrize("marked, clean", [
    ("based on the modified, __{{3-clause BSD__-License}}.", "based on the modified, __3-clause BSD__-License."),
    ('__license__ = "{{Apache License, Version 2.0}}"', '__license__ = "Apache License, Version 2.0"'),
    ("the `{{GNU General Public License`_ version 3 or\n  later}} (`local copy`__).",
     "the `GNU General Public License`_ version 3 or\n  later (`local copy`__)."),
    ("under the {old-style {{BSD license}}}[rdoc-label]", "under the {old-style BSD license}[rdoc-label]"),
    ("no markers, a { brace } and }} stray", "no markers, a { brace } and }} stray"),
])
def test_strip_markers_keeps_inner_words(marked: str, clean: str) -> None:
    assert ds.strip_markers(marked) == clean


# ---------------------------------------------------------------------------------------------------
# task examples, splits, caps

LICENCES = [
    {"key": "mit", "category": "Permissive", "text": "MIT"},
    {"key": "gpl-2.0", "category": "Copyleft", "text": "GPL"},
    {"key": "cla-x", "category": "CLA", "text": "CLA"},
]


def rule(rule_id: str, expression: str | None, flags: list[str], text: str | None = None) -> dict:
    return {"id": rule_id, "license_expression": expression, "flags": flags, "text": text or f"text of {rule_id}"}


def test_task_examples_labels_single_licence_texts_and_notices() -> None:
    rules = [
        rule("mit_1", "mit", ["notice"]),
        rule("gpl_1", "gpl-2.0", ["text"]),
        rule("mit_ref", "mit", ["reference"]),  # neither text nor notice
        rule("mit_tag", "mit", ["notice", "tag"]),
        rule("both", "mit AND gpl-2.0", ["notice"]),  # compound: no single category
        rule("with", "gpl-2.0 WITH classpath-exception-2.0", ["notice"]),
        rule("paren", "(mit)", ["notice"]),
        rule("unknown", "no-such-licence", ["notice"]),
        rule("cla", "cla-x", ["notice"]),  # category not asked for
        rule("fp", None, ["notice"]),  # false positive: no expression
    ]
    examples = ds.task_examples(LICENCES, rules, ["Permissive", "Copyleft"])
    assert examples == [
        {"id": "mit_1", "text": "text of mit_1", "label": "Permissive", "group": "mit"},
        {"id": "gpl_1", "text": "text of gpl_1", "label": "Copyleft", "group": "gpl-2.0"},
        {"id": "mit_tag", "text": "text of mit_tag", "label": "Permissive", "group": "mit"},
    ]


def test_task_examples_drops_repeated_texts() -> None:
    rules = [
        rule("mit_1", "mit", ["notice"], "same in one licence"),
        rule("mit_2", "mit", ["notice"], "same in one licence"),
        rule("mit_3", "mit", ["notice"], "shared by two licences"),
        rule("gpl_1", "gpl-2.0", ["notice"], "shared by two licences"),
    ]
    examples = ds.task_examples(LICENCES, rules, ["Permissive", "Copyleft"])
    assert [ex["id"] for ex in examples] == ["mit_1"]


def make_examples(groups_per_label: dict[str, int], per_group: int = 3) -> list[dict]:
    return [{"id": f"{label}-{g}-{i}", "text": "t", "label": label, "group": f"{label}-{g}"}
            for label, n_groups in groups_per_label.items() for g in range(n_groups) for i in range(per_group)]


def groups_in(examples: list[dict]) -> set[str]:
    return {ex["group"] for ex in examples}


def test_split_by_group_keeps_groups_whole_and_every_label_in_dev_and_test() -> None:
    examples = make_examples({"A": 20, "B": 10, "C": 10})
    splits = ds.split_by_group(examples, dev_fraction=0.2, test_fraction=0.2, seed=0)
    train, dev, test = (groups_in(splits[s]) for s in ("train", "dev", "test"))
    assert not (train & dev or train & test or dev & test)
    assert sum(len(v) for v in splits.values()) == len(examples)
    for split in ("dev", "test"):
        assert set(Counter(ex["label"] for ex in splits[split])) == {"A", "B", "C"}
    # a fraction of groups per label: 1 of 5 folds of the groups for test, 1 of 4 of the rest for dev
    assert Counter(g[0] for g in test) == {"A": 4, "B": 2, "C": 2}
    assert Counter(g[0] for g in dev) == {"A": 4, "B": 2, "C": 2}
    # each split keeps the input order
    assert splits["train"] == [ex for ex in examples if ex["group"] in train]


def test_split_by_group_is_deterministic_for_a_seed() -> None:
    examples = make_examples({"A": 20, "B": 10})
    first = ds.split_by_group(examples, 0.2, 0.2, seed=3)
    assert ds.split_by_group(examples, 0.2, 0.2, seed=3) == first
    assert ds.split_by_group(list(reversed(examples)), 0.2, 0.2, seed=3)["test"] == list(reversed(first["test"]))
    assert groups_in(ds.split_by_group(examples, 0.2, 0.2, seed=4)["test"]) != groups_in(first["test"])


def test_split_by_group_rejects_bad_input() -> None:
    examples = make_examples({"A": 10, "B": 10})
    with pytest.raises(ValueError, match="test_fraction=0.6"):
        ds.split_by_group(examples, 0.5, 0.6, seed=0)
    examples.append({"id": "x", "text": "t", "label": "B", "group": "A-0"})
    with pytest.raises(ValueError, match="group 'A-0' has examples labelled 'A' and 'B'"):
        ds.split_by_group(examples, 0.2, 0.2, seed=0)


def test_cap_examples_keeps_label_shares_and_order() -> None:
    examples = [{"id": i, "label": "A" if i < 80 else "B"} for i in range(100)]
    capped = ds.cap_examples(examples, 10, seed=0)
    assert Counter(ex["label"] for ex in capped) == {"A": 8, "B": 2}
    assert [ex["id"] for ex in capped] == sorted(ex["id"] for ex in capped)
    assert ds.cap_examples(examples, 10, seed=0) == capped
    assert ds.cap_examples(examples, 10, seed=1) != capped


def test_cap_examples_leaves_small_inputs_and_handles_singleton_labels() -> None:
    examples = [{"id": i, "label": "A" if i < 50 else "B" if i < 99 else "C"} for i in range(100)]
    assert ds.cap_examples(examples, 100, seed=0) == examples
    assert ds.cap_examples(examples, None, seed=0) == examples
    assert len(ds.cap_examples(examples, 10, seed=0)) == 10


# ---------------------------------------------------------------------------------------------------
# retrieval task

NO_CAPS = {"train": None, "dev": None, "test": None}


def retrieval_inputs() -> tuple[list[dict], list[dict]]:
    """Ten licences in each of two categories plus one of another, each with one rule of every kind."""
    licences = [{"key": f"{cat[0].lower()}-{i}", "category": cat, "text": f"{cat} licence {i}"}
                for cat in ("Permissive", "Copyleft") for i in range(10)]
    licences.append({"key": "cla-x", "category": "CLA", "text": "CLA"})
    rules = []
    for key in sorted(lic["key"] for lic in licences):
        rules += [rule(f"{key}_notice", key, ["notice"]), rule(f"{key}_ref", key, ["reference"]),
                  rule(f"{key}_text", key, ["text"]), rule(f"{key}_tag", key, ["tag"]),
                  rule(f"{key}_clue", key, ["clue"]), rule(f"{key}_and", f"{key} AND mit", ["notice"]),
                  rule(f"{key}_with", f"{key} WITH some-exception", ["reference"])]
    return licences, rules


def test_retrieval_queries_are_single_licence_notices_and_references_judged_by_their_licence() -> None:
    licences, rules = retrieval_inputs()
    _, splits = ds.retrieval_task(licences, rules, ["Permissive", "Copyleft"], 0.2, 0.2, None, NO_CAPS, seed=0)
    queries = [q for split in splits.values() for q in split]
    # texts, tags, clues, compound expressions and the category not asked for (cla-x) are all dropped
    assert sorted(q["id"] for q in queries) == sorted(f"{lic['key']}_{kind}" for lic in licences[:20]
                                                      for kind in ("notice", "ref"))
    for q in queries:
        assert set(q) == {"id", "text", "qrels"}
        assert q["qrels"] == {q["id"].rsplit("_", 1)[0]: 1} and q["text"] == f"text of {q['id']}"


def test_retrieval_keeps_a_licences_queries_in_one_split_and_is_deterministic() -> None:
    licences, rules = retrieval_inputs()
    args = (licences, rules, ["Permissive", "Copyleft"], 0.2, 0.2, None, NO_CAPS)
    _, splits = ds.retrieval_task(*args, seed=0)
    split_of: dict[str, set[str]] = {}
    for split, queries in splits.items():
        assert queries, split
        for q in queries:
            split_of.setdefault(next(iter(q["qrels"])), set()).add(split)
    assert len(split_of) == 20 and all(len(s) == 1 for s in split_of.values())
    # stratified by category: each split asks for licences of both
    assert all({next(iter(q["qrels"]))[0] for q in splits[s]} == {"p", "c"} for s in ("dev", "test"))
    assert ds.retrieval_task(*args, seed=0)[1] == splits
    assert ds.retrieval_task(*args, seed=1)[1] != splits


def test_retrieval_corpus_holds_every_licence_sorted_by_key() -> None:
    licences, rules = retrieval_inputs()
    corpus, _ = ds.retrieval_task(list(reversed(licences)), rules, ["Permissive"], 0.2, 0.2, None, NO_CAPS, seed=0)
    # Copyleft and CLA licences have no queries here, but they are part of the search space
    assert corpus == [{"id": lic["key"], "title": "", "text": lic["text"]}
                      for lic in sorted(licences, key=lambda lic: lic["key"])]
    named = [{"key": "mit", "category": "Permissive", "text": "MIT", "name": "MIT License"}]
    assert ds.retrieval_corpus(named) == [{"id": "mit", "title": "MIT License", "text": "MIT"}]


def test_retrieval_judges_a_licence_with_the_same_text_relevant_too() -> None:
    licences, rules = retrieval_inputs()
    licences.append({"key": "p-0-copy", "category": "Permissive", "text": "Permissive licence 0"})  # p-0's text
    _, splits = ds.retrieval_task(licences, rules, ["Permissive", "Copyleft"], 0.2, 0.2, None, NO_CAPS, seed=0)
    judged = {q["id"]: q["qrels"] for split in splits.values() for q in split}
    assert judged["p-0_notice"] == {"p-0": 1, "p-0-copy": 1} and judged["p-1_notice"] == {"p-1": 1}


def test_retrieval_caps_queries_like_the_classification_task() -> None:
    licences, rules = retrieval_inputs()
    caps = {"train": 5, "dev": None, "test": None}
    _, splits = ds.retrieval_task(licences, rules, ["Permissive", "Copyleft"], 0.2, 0.2, 1, caps, seed=0)
    assert len(splits["train"]) == 5
    per_licence = Counter(next(iter(q["qrels"])) for split in splits.values() for q in split)
    assert set(per_licence.values()) == {1}  # max_per_licence=1 of each licence's notice and reference
    with pytest.raises(ValueError, match=r"caps has keys \['dev', 'train'\]; expected exactly train, dev and test"):
        ds.retrieval_task(licences, rules, ["Permissive"], 0.2, 0.2, None, {"train": 1, "dev": 1}, seed=0)


def test_retrieval_drops_a_query_text_shared_by_two_licences() -> None:
    licences, rules = retrieval_inputs()
    rules += [rule("p-0_gpl", "p-0", ["reference"], "GPL"), rule("c-0_gpl", "c-0", ["reference"], "GPL")]
    _, splits = ds.retrieval_task(licences, rules, ["Permissive", "Copyleft"], 0.2, 0.2, None, NO_CAPS, seed=0)
    assert "GPL" not in {q["text"] for split in splits.values() for q in split}


# ---------------------------------------------------------------------------------------------------
# reading a wheel-shaped zip

WIKI_XML = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10">
  <siteinfo><sitename>Wikipedia</sitename></siteinfo>
  <page>
    <title>Albedo</title>
    <ns>0</ns>
    <id>39</id>
    <revision><id>1</id><text xml:space="preserve">{{Other uses}}
'''Albedo''' ({{IPA-en|ælˈbiːdoʊ}}) is the ''reflectivity'' of a [[surface]].&lt;ref&gt;A cited source.&lt;/ref&gt;
[[File:Albedo.svg|thumb|A caption]]

== Terrestrial albedo ==
Fresh snow   reflects [[light|most light]].
{| class="wikitable"
| cell text
|}

== References ==
{{Reflist}}
* A book.

[[Category:Radiometry]]
</text></revision>
  </page>
  <page>
    <title>AccessibleComputing</title>
    <ns>0</ns>
    <id>10</id>
    <redirect title="Computer accessibility" />
    <revision><id>2</id><text xml:space="preserve">#REDIRECT [[Computer accessibility]]</text></revision>
  </page>
  <page>
    <title>Wikipedia:Sandbox</title>
    <ns>4</ns>
    <id>11</id>
    <revision><id>3</id><text xml:space="preserve">Project page text.</text></revision>
  </page>
</mediawiki>
"""


@pytest.fixture
def wheel(tmp_path: Path) -> Path:
    """A zip with the same member paths as the pinned wheels, holding a few tiny files."""
    path = tmp_path / "tiny.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(ds.LICENCE_DIR + "mit.LICENSE",
                    "---\nkey: mit\ncategory: Permissive\n---\n\nPermission is hereby granted by {{MIT}}.\n")
        zf.writestr(ds.LICENCE_DIR + "unknown.LICENSE", "---\nkey: unknown\ncategory: Unstated License\n---")
        zf.writestr(ds.RULE_DIR + "mit_1.RULE",
                    "---\r\nlicense_expression: mit\r\nis_license_notice: yes\r\nis_license_tag: no\r\n---\r\n\r\n"
                    "Licensed under {{the MIT License}}.\r\nSee LICENSE.\r\n")
        zf.writestr(ds.RULE_DIR + "fp_1.RULE", "---\nis_false_positive: yes\n---\nGPL mentioned in passing\n")
        zf.writestr(ds.RULE_DIR + "ref_2.RULE",
                    "---\nlicense_expression: mit\nis_license_reference: yes\nis_license_clue: yes\n---\nMIT\n")
        zf.writestr(ds.WIKI_MEMBER, bz2.compress(WIKI_XML.encode()))
        zf.writestr(ds.LEE_MEMBER, "First news story.\nSecond  story.\n")
    return path


def test_read_licences_skips_texts_that_are_empty(wheel: Path) -> None:
    assert ds.read_licences(wheel) == [
        {"key": "mit", "name": "", "category": "Permissive", "text": "Permission is hereby granted by MIT."}]


def test_read_licences_rejects_key_not_matching_file_name(tmp_path: Path) -> None:
    path = tmp_path / "bad.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(ds.LICENCE_DIR + "mit.LICENSE", "---\nkey: apache-2.0\ncategory: Permissive\n---\nText\n")
    with pytest.raises(ValueError, match="mit.LICENSE: key 'apache-2.0' does not match"):
        ds.read_licences(path)


def test_read_rules_reads_flags_and_expressions(wheel: Path) -> None:
    assert ds.read_rules(wheel) == [
        {"id": "fp_1", "license_expression": None, "flags": [], "text": "GPL mentioned in passing"},
        {"id": "mit_1", "license_expression": "mit", "flags": ["notice"],
         "text": "Licensed under the MIT License.\nSee LICENSE."},
        {"id": "ref_2", "license_expression": "mit", "flags": ["clue", "reference"], "text": "MIT"},
    ]


def test_read_rules_names_the_wheel_when_data_is_missing(tmp_path: Path) -> None:
    path = tmp_path / "other.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("other/file.txt", "x")
    with pytest.raises(ValueError, match="other.whl: no licensedcode/data/rules/"):
        ds.read_rules(path)


def test_read_lee_and_wikipedia_name_the_wheel_when_data_is_missing(tmp_path: Path) -> None:
    path = tmp_path / "other.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("other/file.txt", "x")
    with pytest.raises(ValueError, match="other.whl: no gensim/test/test_data/lee_background.cor"):
        ds.read_lee(path)
    with pytest.raises(ValueError, match="other.whl: no gensim/test/test_data/enwiki-latest"):
        ds.read_wikipedia(path)


def test_domain_documents_lists_licences_then_rules(wheel: Path) -> None:
    docs = ds.domain_documents(ds.read_licences(wheel), ds.read_rules(wheel))
    assert [d["id"] for d in docs] == ["licence:mit", "rule:fp_1", "rule:mit_1", "rule:ref_2"]
    assert docs[0]["text"] == "Permission is hereby granted by MIT."


def test_read_wikipedia_keeps_article_prose_only(wheel: Path) -> None:
    assert ds.read_wikipedia(wheel) == [{
        "id": "wiki:Albedo",
        "text": "Albedo is the reflectivity of a surface.\n\nTerrestrial albedo\nFresh snow reflects most light.",
    }]


def test_read_lee_gives_one_document_per_line(wheel: Path) -> None:
    assert ds.read_lee(wheel) == [{"id": "lee:1", "text": "First news story."},
                                  {"id": "lee:2", "text": "Second  story."}]


# ---------------------------------------------------------------------------------------------------
# fetching


def pin_for(content: bytes) -> ds.WheelPin:
    return ds.WheelPin(name="demo", version="1.0", filename="demo-1.0-py3-none-any.whl",
                       sha256=hashlib.sha256(content).hexdigest())


def fake_pip(content: bytes, returncode: int = 0, calls: list | None = None):
    """A stand-in for subprocess.run that 'downloads' `content` into pip's --dest folder."""
    def run(cmd: list[str], check: bool = False) -> subprocess.CompletedProcess:
        if calls is not None:
            calls.append(cmd)
        dest = Path(cmd[cmd.index("--dest") + 1])
        if returncode == 0:
            (dest / "demo-1.0-py3-none-any.whl").write_bytes(content)
        return subprocess.CompletedProcess(cmd, returncode)
    return run


def test_fetch_wheel_reuses_a_cached_file_with_the_right_hash(tmp_path: Path, monkeypatch) -> None:
    pin = pin_for(b"good wheel")
    (tmp_path / pin.filename).write_bytes(b"good wheel")
    calls: list = []
    monkeypatch.setattr(ds.subprocess, "run", fake_pip(b"unused", calls=calls))
    assert ds.fetch_wheel(pin, tmp_path) == tmp_path / pin.filename
    assert calls == []


def test_fetch_wheel_replaces_a_stale_file_after_download(tmp_path: Path, monkeypatch) -> None:
    pin = pin_for(b"good wheel")
    (tmp_path / pin.filename).write_bytes(b"truncated")
    calls: list = []
    monkeypatch.setattr(ds.subprocess, "run", fake_pip(b"good wheel", calls=calls))
    path = ds.fetch_wheel(pin, tmp_path)
    assert path.read_bytes() == b"good wheel"
    assert calls[0][-1] == "demo==1.0"
    assert sorted(p.name for p in tmp_path.iterdir()) == [pin.filename]  # temporary folder gone


def test_fetch_wheel_rejects_a_download_with_the_wrong_hash(tmp_path: Path, monkeypatch) -> None:
    pin = pin_for(b"good wheel")
    (tmp_path / pin.filename).write_bytes(b"tampered")
    monkeypatch.setattr(ds.subprocess, "run", fake_pip(b"tampered"))
    actual = hashlib.sha256(b"tampered").hexdigest()
    with pytest.raises(ValueError, match=f"{pin.filename}: sha256 mismatch: expected {pin.sha256}, got {actual}"):
        ds.fetch_wheel(pin, tmp_path)
    assert (tmp_path / pin.filename).read_bytes() == b"tampered"  # nothing unverified was moved into place


def test_fetch_wheel_reports_pip_failure(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(ds.subprocess, "run", fake_pip(b"", returncode=2))
    with pytest.raises(RuntimeError, match=r"exit code 2: .* -m pip download .*demo==1.0"):
        ds.fetch_wheel(pin_for(b"good wheel"), tmp_path / "cache")


def test_pip_command_pins_interpreter_and_platform(tmp_path: Path) -> None:
    cmd = ds.pip_download_command(ds.WHEELS["gensim"], tmp_path)
    assert cmd[-1] == "gensim==4.4.0"
    assert cmd[cmd.index("--platform") + 1] == "manylinux_2_28_x86_64"
    assert cmd[cmd.index("--python-version") + 1] == "3.11"
    assert "--platform" not in ds.pip_download_command(ds.WHEELS["scancode"], tmp_path)
