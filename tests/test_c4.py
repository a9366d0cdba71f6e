"""dapt.cleaning.c4: the fast C4 filter keeps the same lines, decides the same and counts the same totals as
datatrove's."""

from __future__ import annotations

import random

import pytest
from datatrove.data import Document
from datatrove.pipeline.filters import C4QualityFilter

from dapt.cleaning.c4 import FastC4QualityFilter

# short and long lines, and what makes datatrove's per-line loop matter: citations, over-long words, "javascript",
# "lorem ipsum", curly brackets, policy phrases, and line breaks that `splitlines` knows but "\n" is not
_PIECES = ["the", "licensee", "may", "copy", "and", "distribute", "it.", "Software", "[1]", "[edit]", "[", "x" * 40,
           "JavaScript", "lorem", "ipsum", "Lorem Ipsum", "{year}", "terms of use", "Privacy Policy", "\u2028", "\x0c",
           "  ", "\t", "!", "?"]


def _document(rng: random.Random) -> str:
    lines = [" ".join(rng.choice(_PIECES) if rng.random() < 0.15 else rng.choice(_PIECES[:8])
                      for _ in range(rng.randint(0, 12))) for _ in range(rng.randint(0, 15))]
    return rng.choice(["\n", "\n\n", "\r\n"]).join(lines)


def _totals(f) -> dict[str, float]:
    return {k: v.total for k, v in f.stats.stats.items()}


@pytest.mark.parametrize("options", [
    # the demo's params.yaml settings, and a short max_word_length so that over-long words occur
    dict(filter_no_terminal_punct=False, min_num_sentences=-1, filter_curly_bracket=False, filter_policy=False),
    dict(filter_no_terminal_punct=False, min_num_sentences=-1, max_word_length=30),
    dict(filter_no_terminal_punct=False, min_num_sentences=-1, max_word_length=0),  # every word is too long
    dict(filter_no_terminal_punct=False, min_num_sentences=-1, min_words_per_line=-1, remove_citations=False,
         filter_lorem_ipsum=False, filter_javascript=False),
])
def test_fast_c4_equals_datatrove(options):
    rng = random.Random(0)
    fast, slow = FastC4QualityFilter(**options), C4QualityFilter(**options)
    shortcuts = 0
    for i in range(1500):
        text = _document(rng)
        shortcuts += not fast._needs_line_loop(text)
        a, b = Document(text=text, id=str(i)), Document(text=text, id=str(i))
        assert fast.filter(a) == slow.filter(b), repr(text)
        assert a.text == b.text, repr(text)
    assert _totals(fast) == _totals(slow)
    if options.get("max_word_length", 1) > 0:
        assert 100 < shortcuts < 1400  # both paths were compared
