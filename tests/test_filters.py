"""Cleaning blocks: each drop reason on one-line inputs, each normaliser on what it must fix, the registry."""

import pickle

import numpy as np
import pytest
from datatrove.data import Document

from dapt.cleaning import filters
from dapt.cleaning.filters import (
    PRESETS,
    Boilerplate,
    Decontaminate,
    LanguageIDFilter,
    LengthFilter,
    Normalise,
    SizeFilter,
    StripMarkup,
    build_steps,
    check_steps,
    fingerprint,
    hashed_words,
    longer_ngrams,
    ngrams,
    plain_row,
    preset_steps,
    word_hashes,
)


def doc(text: str) -> Document:
    return Document(text=text, id="x")


def test_normalise_fixes_mojibake_unicode_forms_controls_and_spacing():
    n = Normalise()
    assert n.format("The licensorâ€™s rights") == "The licensor's rights"  # UTF-8 read as cp1252, fixed by ftfy
    assert n.format("cafe\u0301") == "caf\u00e9"  # NFC
    assert n.format("  a\u00a0 b\t\tc \x07\r\n\r\n\r\n\r\nd  ") == "a b c\n\nd"
    assert n.format("AT&amp;T") == "AT&T"  # an ASCII text with an HTML entity still goes through ftfy
    assert n.format("lone \udc80 surrogate") == "lone \ufffd surrogate"  # cannot be written as UTF-8 otherwise
    assert Normalise(form="NFKC").format("ﬁle") == "file"
    with pytest.raises(ValueError, match="NFC or NFKC"):
        Normalise(form="NFD")


@pytest.mark.parametrize("text", [
    "Copyright Â© 2020 the authors\nAll rights reserved.\nThe â€œSoftwareâ€\x9d is provided &amp; so on.\n",
    "Tom &amp; Jerry\n<p>a &lt;tag&gt; line</p>\nafter it: caf\u00e9 &amp; more\nplain &amp; ascii\n",
    "a &lt; b\nthen &amp; c\n",  # an entity that becomes "<" does not stop the unescaping
    "ﬁne print\r\nCRLF line\r\n\x1b[31mred\x1b[0m text\nno newline at the end Ã©",
    "caf\u00e9 and \u201cquotes\u201d\nÂ at a line's start is mojibake only there\n",  # "^" in ftfy's patterns
    "",
])
def test_fix_text_is_ftfy_on_the_lines_it_can_change(text):
    import ftfy

    assert filters.fix_text(text) == ftfy.fix_text(text)


# mojibake pieces, the characters ftfy's other fixers act on, curly quotes and plain accented letters
_FTFY_POOL = ["a", "b", "Z", " ", " ", ".", "Ã", "Â", "©", "’", "‘", "“", "”", "é", "è", "€", "™", "Ø", "Ù", "В", "Ђ",
              "Ў", "ﬁ", "\x85", "\x9d", "&amp;", "&", "<", "°", "ā", "β", "Γ", "√", "±", "â€", "Ã©", "\u2028", "\uff21",
              "\x07", "\xa0", "\u0301", "ʼ", "\x1b[31m"]


def test_fix_text_equals_ftfy_on_generated_mojibake():
    import random

    import ftfy
    from ftfy.badness import is_bad

    rng = random.Random(0)
    for _ in range(2000):
        line = "".join(rng.choice(_FTFY_POOL) for _ in range(rng.randint(1, 25)))
        assert filters.looks_like_mojibake(line) == is_bad(line), repr(line)
        text = "\n".join([line, line.upper(), "plain ascii"])
        assert filters.fix_text(text) == ftfy.fix_text(text), repr(text)


def test_mojibake_search_is_windowed_for_this_ftfy():
    assert filters._MOJIBAKE_REACH is not None  # else every line is searched whole: correct, only slower


def test_markup_is_stripped_only_where_present():
    m = StripMarkup()
    html = "<html><body><h1>MIT License</h1><p>Permission is <b>hereby</b> granted.</p><script>x()</script></body>"
    out = m.format(html)
    assert "MIT License" in out and "Permission is hereby granted." in out and "<" not in out and "x()" not in out
    assert m.format("'''GPL''' is a [[copyleft]] licence.") == "GPL is a copyleft licence."
    assert m.format("== Terms ==\nUse it freely.") == " Terms \nUse it freely."  # each wiki form is detected
    assert m.format("{{Infobox licence}}Use it freely.") == "Use it freely."
    plain = "Copyright <year> <name of author>. Replace the <fields> above."
    assert m.format(plain) == plain  # angle-bracket placeholders are licence text, not HTML


def test_boilerplate_removes_whole_matching_lines_only():
    b = Boilerplate(["share( this)?", "we use cookies.*"])
    assert b.format("Share\nThe licensee may share the software.\nWe use cookies to track you") == \
        "The licensee may share the software."


@pytest.mark.parametrize("text,reason", [("", "empty"), ("   \n ", "empty"), ("x" * 101, "too_large")])
def test_size_filter_reasons(text, reason):
    assert SizeFilter(max_chars=100).filter(doc(text)) == (False, reason)


def test_length_filter_reasons():
    f = LengthFilter(min_words=3, max_words=5)
    assert f.filter(doc("one two")) == (False, "too_short")
    assert f.filter(doc("a b c d e f")) == (False, "too_long")
    assert f.filter(doc("one two three")) is True
    with pytest.raises(ValueError, match="min_words \\(9\\) exceeds max_words \\(3\\)"):
        LengthFilter(min_words=9, max_words=3)


def test_length_filter_counts_as_far_as_it_needs_to():
    import itertools

    # every text of up to 12 characters from a word, two kinds of whitespace and a newline, at the bounds
    for min_words, max_words in ((0, 0), (1, 1), (2, 3), (3, 5)):
        f = LengthFilter(min_words=min_words, max_words=max_words)
        for size in range(13):
            for chars in itertools.product("a \t\n", repeat=size) if size < 8 else [("a ", " a\t") * (size // 2)]:
                text = "".join(chars)
                n = len(text.split())
                expected = (False, "too_short") if n < min_words else n <= max_words or (False, "too_long")
                assert f.filter(doc(text)) == expected, (text, min_words, max_words)


def test_language_filter_uses_the_packaged_model():
    f = LanguageIDFilter(["en"], threshold=0.65)
    english = doc("Permission is hereby granted, free of charge, to any person obtaining a copy of this software.")
    assert f.filter(english) is True and english.metadata["language"] == "en"
    german = doc("Hiermit wird unentgeltlich jeder Person, die eine Kopie der Software erhält, die Erlaubnis erteilt.")
    assert f.filter(german) == (False, "not_en") and german.metadata["language"] == "de"


def test_decontamination_reasons():
    test_text = ("the licensee shall not use the name of the licensor to endorse or promote products derived from "
                 "this software without specific prior written permission of the licensor. the licensee may copy "
                 "and distribute verbatim copies of the program source code as received, in any medium, provided "
                 "that each copy carries an appropriate copyright notice and a disclaimer of warranty.")
    boiler = "provided as is without warranty of any kind express or implied including but not limited to the"
    d = Decontaminate([test_text, f"{boiler} warranties of merchantability"], train_texts=[f"{boiler} fitness"],
                      ngram=13, near_threshold=0.8)
    assert d.filter(doc(test_text.upper().replace(" ", "  "))) == (False, "contaminated_exact")
    near = test_text.replace("verbatim", "exact")  # one word changed: it still shares runs of 13 words
    assert d.filter(doc(near)) == (False, "contaminated_ngram")
    # where the task's training texts have every run it shares too, its 5-gram Jaccard with the test text decides
    # (the first evaluation text shares half of the test text's 5-grams: each text keeps its own)
    half = " ".join(test_text.split()[:30])
    only_near = Decontaminate([half, test_text], train_texts=[test_text], ngram=13, near_threshold=0.8)
    assert only_near.filter(doc(near)) == (False, "contaminated_near")
    assert only_near.filter(doc(test_text.replace("verbatim copies", "copies").replace("any", "every"))) is True
    embeds = "Preamble. " * 50 + " ".join(test_text.split()[:14]) + " and much more text of another licence " * 20
    assert d.filter(doc(embeds)) == (False, "contaminated_ngram")
    # 13 words that the task's training texts share are boilerplate, not leakage
    assert d.filter(doc(f"intro words here {boiler} something else entirely different")) is True
    # the index is rebuilt after pickling
    assert pickle.loads(pickle.dumps(only_near)).filter(doc(near)) == (False, "contaminated_near")
    # a batch, in chunks of a few texts (`hashed_words`), decides as one text at a time
    texts = [test_text.upper(), near, embeds, boiler, "", "short text", test_text[:40]] * 3
    assert d.reasons(texts) == [d.reasons([t])[0] for t in texts]
    assert [d.filter(doc(t)) for t in texts] == d.filter_batch([doc(t) for t in texts])


def test_word_hashes_split_words_as_python_regex_does():
    r"""Decontamination's words are `re.findall(r"\w+", text.lower())`: same split, equal hashes for equal words."""
    import re

    texts = ["Else, ELSE else_2 l'élan İstanbul naïve cafe\u0301 x²³ ٣٤ 漢字かな 👍🏽 a\tb\nc",
             "lone \udc80 surrogate", "", "   ", "one", "snake_case and CamelCase, 1,000.50 €", "bold 𝐀𝐁c 𝟙 words"] * 2
    hashes = word_hashes(texts)
    seen: dict[str, int] = {}
    for text, h in zip(texts, hashes):
        words = re.findall(r"\w+", text.lower())
        assert len(h) == len(words)
        for w, value in zip(words, h.tolist()):
            assert seen.setdefault(w, value) == value
    assert len(set(seen.values())) == len(seen)  # different words, different hashes
    # chunking (a few characters at a time) changes nothing
    small = [h for chunk, firsts in hashed_words(texts, max_chars=20) for h in np.split(chunk, firsts[1:-1])]
    assert all(np.array_equal(a, b) for a, b in zip(small, hashes)) and len(small) == len(texts)


@pytest.mark.parametrize("n", [5, 8, 13, 20])
def test_longer_ngrams_from_5_grams_are_the_word_n_grams(n):
    """Decontamination keys its n-gram runs by the 5-grams that cover them: equal keys iff equal n-grams."""
    words = ("a b c d e f g h a b c d e f g h i a b c d e f g h " * 3).split()
    keys = list(longer_ngrams(ngrams(word_hashes([" ".join(words)])[0], 5), 5, n))
    runs = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    assert len(keys) == len(runs)
    assert all((keys[i] == keys[j]) == (runs[i] == runs[j]) for i in range(len(runs)) for j in range(len(runs)))
    assert list(longer_ngrams(ngrams(word_hashes([" ".join(words[:n - 1])])[0], 5), 5, n)) == []  # too short


def test_decontamination_ngram_shorter_than_a_shingle_is_refused():
    for bad in (3, -1):
        with pytest.raises(ValueError, match=f"ngram must be 0 .off. or at least 5 words, got {bad}"):
            Decontaminate(["some text"], [], ngram=bad)
    assert Decontaminate(["some text"], [], ngram=0).filter(doc("other words entirely")) is True


def test_rows_are_datatroves_without_the_deep_copy(tmp_path):
    from datatrove.pipeline.writers import JsonlWriter

    writer = JsonlWriter(str(tmp_path))
    for d in (Document(text="t", id="1", metadata={"language": "en", "nested": {"a": [1, 2]}}),
              Document(text="t", id="2")):
        assert plain_row(writer, d) == writer._default_adapter(d)
        assert list(plain_row(writer, d)) == list(writer._default_adapter(d))  # same key order, same JSON line


def test_decontamination_index_is_built_once_per_process(monkeypatch):
    built = []
    index_of = Decontaminate._index_of
    monkeypatch.setattr(filters, "_INDEXES", {})
    monkeypatch.setattr(Decontaminate, "_index_of", lambda self: built.append(self) or index_of(self))
    text = "the licensee may copy and distribute verbatim copies of the program source code as received"
    first = Decontaminate([text], [], ngram=8)
    second = pickle.loads(pickle.dumps(first))  # what each datatrove task of a worker gets
    assert first.filter(doc(text)) == second.filter(doc(text)) == (False, "contaminated_exact")
    assert len(built) == 1
    other = Decontaminate([text], [], ngram=13)  # other settings, another index
    assert other.filter(doc(text.upper())) == (False, "contaminated_exact") and len(built) == 2


def test_fingerprint_ignores_case_and_spacing():
    assert fingerprint("The  Licensor\nshall") == fingerprint("the licensor shall")
    assert fingerprint("the licensor") != fingerprint("the licensee")


def test_steps_are_built_in_params_order_and_can_be_switched_off(tmp_path):
    steps = {"size": {"max_chars": 10}, "length": {"min_words": 1, "enabled": False}, "normalise": None}
    blocks = build_steps(steps, {}, tmp_path, 5)
    assert [b.name for b in blocks] == ["size", "normalise"]
    assert blocks[0].exclusion_writer is not None and blocks[0].stats.name == "size"


@pytest.mark.parametrize("steps,message", [
    ({"lenght": {}}, "clean.steps.lenght: unknown step"),
    ({"length": {"min_wrods": 3}}, "clean.steps.length: .*unexpected keyword argument 'min_wrods'"),
    ({"gopher_quality": {"min_doc_word": 3}}, "clean.steps.gopher_quality: .*min_doc_word"),
])
def test_bad_step_params_name_the_key(steps, message):
    with pytest.raises(ValueError, match=message):
        check_steps(steps)


# ---------------------------------------------------------------------------------------------------
# presets

QUALITY = {"normalise": {}, "length": {}, "language": {"languages": ["en"]}, "gopher_repetition": {},
           "gopher_quality": {}, "c4": {}, "fineweb": {}}


def first_drop(preset: str, text: str) -> str | None:
    """`step/reason` of the first quality step of `preset` that drops `text`, or None when all keep it."""
    d = doc(text)
    for block in build_steps(preset_steps(preset, QUALITY), {}, None, 0):
        if hasattr(block, "format"):
            d.text = block.format(d.text)
            continue
        result = block.filter(d)
        if result is not True:
            return f"{block.name}/{result[1]}"
    return None


def test_preset_fills_the_listed_steps_and_params_override_it_key_by_key():
    steps = {"length": {"min_words": 3}, "gopher_quality": None, "c4": {"enabled": False}}
    resolved = preset_steps("legal", steps)
    assert list(resolved) == ["length", "gopher_quality", "c4"]  # params order; the preset adds no step
    assert resolved["length"] == {"min_words": 3, "max_words": 100_000}
    assert resolved["gopher_quality"]["min_doc_words"] == 8 and resolved["gopher_quality"]["min_stop_words"] == 1
    assert [b.name for b in build_steps(resolved, {}, None, 0)] == ["length", "gopher_quality"]
    assert preset_steps("web", {"size": {"max_chars": 9}}) == {"size": {"max_chars": 9}}  # no preset values
    with pytest.raises(ValueError, match="clean.preset: unknown preset 'news'; known: web, scientific, legal"):
        preset_steps("news", steps)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_builds_and_a_bad_key_is_still_named(preset):
    check_steps(preset_steps(preset, QUALITY))
    with pytest.raises(ValueError, match="clean.steps.gopher_quality: .*min_doc_word"):
        check_steps(preset_steps(preset, {**QUALITY, "gopher_quality": {"min_doc_word": 3}}))


def test_legal_preset_is_what_the_demo_was_tuned_with():
    # the thresholds params.yaml held before presets: the demo's cleaned output must not change
    resolved = preset_steps("legal", QUALITY)
    assert resolved["language"] == {"languages": ["en"], "threshold": 0.65}
    assert resolved["gopher_repetition"]["min_top_count"] == 2
    assert {k: resolved["gopher_quality"][k] for k in ("min_doc_words", "max_avg_word_length",
                                                        "max_symbol_word_ratio", "min_stop_words")} == \
        {"min_doc_words": 8, "max_avg_word_length": 12, "max_symbol_word_ratio": 0.3, "min_stop_words": 1}
    assert {k: resolved["c4"][k] for k in ("filter_no_terminal_punct", "min_num_sentences", "filter_curly_bracket",
                                           "filter_policy")} == \
        {"filter_no_terminal_punct": False, "min_num_sentences": -1, "filter_curly_bracket": False,
         "filter_policy": False}
    assert {k: resolved["fineweb"][k] for k in ("line_punct_thr", "char_duplicates_ratio", "new_line_ratio")} == \
        {"line_punct_thr": 0.0, "char_duplicates_ratio": 0.1, "new_line_ratio": 0.5}


# normal abstracts that the published (web) thresholds drop, and junk every preset drops
ABSTRACTS = {
    "statistics": ("Early mobilisation after knee ligament repair.\nWe followed 48 patients aged 16-45 "
                   "(average 25 +/- 9) for 12 wk. Flexion rose from 62 +/- 14 to 118 +/- 11 degrees (P < .001) and "
                   "pain fell by 3.1 points (95% CI 2.2-4.0; n = 48). Two patients (4%) needed a second repair. "
                   "Early mobilisation was safe.", "gopher_quality/gopher_below_alpha_threshold"),
    "title_restated": ("A two-year experience with cromolyn sodium in children with asthma.\nA two-year experience "
                       "with cromolyn sodium in children with asthma from an inner city population is presented. The "
                       "response to the drug at six weeks was excellent, but over two years it was only moderate. "
                       "Possible reasons are discussed.", "gopher_repetition/top_4_gram"),
    "terminology": ("Chemical constituents of Echites hirsuta (Apocynaceae).\nA phytochemical investigation of an "
                    "ethanolic extract of the whole plant of Echites hirsuta yielded the flavonoids naringenin, "
                    "aromadendrin and kaempferol, the coumarin fraxetin, the triterpene ursolic acid and sitosteryl "
                    "glucoside.", "language/not_en"),  # lid.176 scores it 0.55 English
}
JUNK = {
    "table": ("Table 2. Serum levels by week.\n12.1 13.4 15.6 18.2 19.9 21.0\n0.45 0.51 0.62 0.70 0.74 0.81\n"
              "102 118 131 140 152 167\n3.3 3.9 4.4 5.0 5.6 6.1\n7 9 12 15 18 22",
              "gopher_quality/gopher_below_alpha_threshold"),
    "german": ("Frühe Mobilisation nach Kreuzbandplastik.\nWir untersuchten 48 Patienten im Alter von 16 bis 45 "
               "Jahren. Die Beugung des Knies verbesserte sich deutlich, und die Schmerzen nahmen nach sechs "
               "Wochen ab. Zwei Patienten benötigten eine zweite Operation. Die frühe Mobilisation war sicher "
               "und wirksam.",
               "language/not_en"),
    "errata": ("Erratum regarding previously published articles.\n"
               + "".join(f"[This corrects the article DOI: 10.1016/j.jx.2020.1001{i:02d}.]" for i in range(10)),
               "gopher_repetition/top_3_gram"),
    "spam": ("Buy cheap meds online. Cheap meds online now. Buy cheap meds online today. Cheap meds online best "
             "price. Buy cheap meds online fast. Cheap meds online here. Buy cheap meds online.",
             "gopher_repetition/top_2_gram"),
}


@pytest.mark.parametrize("name", sorted(ABSTRACTS))
def test_scientific_preset_keeps_abstracts_the_web_thresholds_drop(name):
    text, web_reason = ABSTRACTS[name]
    assert first_drop("web", text) == web_reason
    assert first_drop("scientific", text) is None


@pytest.mark.parametrize("name", sorted(JUNK))
def test_scientific_preset_still_drops_junk(name):
    text, reason = JUNK[name]
    assert first_drop("scientific", text) == reason


def test_a_title_alone_is_not_an_abstract():
    title = "Early mobilisation after knee ligament repair in young adults: a randomised controlled trial."
    assert first_drop("scientific", title) == "gopher_quality/gopher_short_doc"


class _Excluded:
    """A stand-in exclusion writer that records what it is given."""

    def __init__(self):
        self.docs = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def write(self, doc, rank):
        self.docs.append((doc.id, doc.metadata.get("filter_reason")))


def test_batched_loops_count_and_forward_as_datatroves_do():
    """`dapt.cleaning.batched` counts per batch: the same counter totals, documents and exclusions as datatrove's
    loops."""
    from datatrove.pipeline.filters.base_filter import BaseFilter
    from datatrove.pipeline.formatters.base import BaseFormatter

    texts = ["one two", "w " * 20, "a  b\u00a0c " * 5, "", "x " * 200] * 60  # 300 documents, batches of 7

    def docs() -> list[Document]:
        return [Document(text=t, id=str(i)) for i, t in enumerate(texts)]

    results = []
    for run in (BaseFilter.run, None):
        length = LengthFilter(min_words=3, max_words=100, exclusion_writer=_Excluded())
        length.batch_size = 7
        kept = [(d.id, d.text) for d in (run or type(length).run)(length, docs())]
        counts = {k: v.total for k, v in length.stats.stats.items() if k != "doc_len"}  # not kept per batch
        results.append((kept, length.exclusion_writer.docs, counts))
    assert results[0] == results[1]
    assert results[1][2]["dropped_too_short"] == 120 and results[1][2]["dropped_too_long"] == 60
    formatted = []
    for run in (BaseFormatter.run, None):
        norm = Normalise()
        norm.batch_size = 7
        out = [(d.id, d.text) for d in (run or type(norm).run)(norm, docs())]
        formatted.append((out, {k: v.total for k, v in norm.stats.stats.items() if k != "time"}))
    assert formatted[0] == formatted[1] and formatted[1][1]["total"] == 300


@pytest.mark.parametrize("precision,diacritics", [(64, False), (32, True)])
def test_fast_minhash_signature_is_datatroves(tmp_path, precision, diacritics):
    """Same shingles and signatures as datatrove's step with whitespace words, for any 64-bit shingle."""
    from datatrove.pipeline.dedup import MinhashConfig, MinhashDedupSignature
    from datatrove.utils.hashing import HashConfig
    from datatrove.utils.text import TextNormConfig

    from dapt.cleaning.filters import FastMinhashSignature
    from dapt.cleaning.gopher import WhitespaceWordTokenizer

    config = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8, hash_config=HashConfig(precision=precision),
                           norm_config=TextNormConfig(norm_unicode_diacritics=diacritics))
    ours = FastMinhashSignature(str(tmp_path / "ours"), config)
    theirs = MinhashDedupSignature(str(tmp_path / "theirs"), config, language=WhitespaceWordTokenizer())
    texts = ["", "too short here", "Permission is hereby granted, free of charge, to any person obtaining a copy",
             "Ünïcödé wörds, ünïcödé WÖRDS; and the same five words again: and the same five words again",
             # whitespace that the collapsing regex and str.split() must agree on, punctuation that becomes space
             " lead\ttab\u00a0nbsp\u2000quad\u3000ideo\x1cfs\x1funit\u2028line  (1) a--b; c.d/e 3,000.5 end\n"]
    for text in texts:
        assert np.array_equal(ours.get_shingles(text), theirs.get_shingles(text)), text
    rng = np.random.default_rng(0)
    edge = [0, 1, (1 << 61) - 2, (1 << 61) - 1, 1 << 61, (1 << 64) - 1]
    # shingles whose a * s + b (mod 2**64) is exactly 2**61 - 1, which reduces to 0: the rare second subtraction
    a, b = (x.ravel().tolist() for x in theirs.parameters)
    edge += [((1 << 61) - 1 - bj) * pow(aj, -1, 1 << 64) % (1 << 64) for aj, bj in zip(a, b) if aj % 2]
    edge = np.array(edge, np.uint64)
    for shingles in (edge, rng.integers(0, 1 << 64, 5000, np.uint64, endpoint=False)):
        shingles = shingles.reshape(-1, 1)
        assert ours.get_signature(shingles) == theirs.get_signature(shingles)
