"""A faster drop-in equivalent of datatrove's `C4QualityFilter` (same parameters, decisions, reasons and text).

datatrove's filter walks every line in Python and updates its statistics once per line (half of its time on our
corpus). Here the document-level questions are asked once, at C speed, and the per-line checks that cannot
change anything are skipped:

- a line has a word longer than `max_word_length` only if the text has a run of that many non-space characters,
  which holds a whole block of half that length (counted from the start of the text) without a space;
- "lorem ipsum", "javascript", "{", the policy phrases and citations can only be in a line if they are in the text
  (none of them spans a line break).

A text that trips one of these goes through datatrove's own per-line loop (the parent's `filter`). Line counters
(`line-total`, `line-kept`, `line-filter-*`) are added once per document: the same totals, counted per document.
`tests/test_c4.py` checks text, decision, reason and counter totals against the parent on generated documents.
"""

from __future__ import annotations

import re

from datatrove.data import Document
from datatrove.pipeline.filters.c4_filters import CITATION_REGEX, POLICY_SUBSTRINGS, C4QualityFilter

from dapt.cleaning.batched import BatchedFilter

_SPACE = re.compile(r"\s")


class FastC4QualityFilter(BatchedFilter, C4QualityFilter):
    """`C4QualityFilter` with the per-line work done only where it can change the result."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._long_word = re.compile(rf"\S{{{self.max_word_length + 1},}}") if self.max_word_length >= 1 else None

    def _has_long_word(self, text: str) -> bool:
        if self.max_word_length == -1:
            return False
        if self._long_word is None:  # every word, or every line with a word, is too long: datatrove's loop decides
            return True
        # the regex alone tries every position of every word; first look for a space-free block, far cheaper
        block = (self.max_word_length + 1) // 2
        return any(not _SPACE.search(text, i, i + block) for i in range(0, len(text) - block + 1, block)) and \
            self._long_word.search(text) is not None

    def _needs_line_loop(self, text: str) -> bool:
        """True when a line could be cut or the document dropped by more than the word count of its lines."""
        if not self.split_paragraph or self.filter_no_terminal_punct or self.min_num_sentences != -1:
            return True
        if self._has_long_word(text):
            return True
        if self.remove_citations and "[" in text and CITATION_REGEX.search(text):
            return True
        if self.filter_curly_bracket and "{" in text:
            return True
        lower = text.lower()
        return (self.filter_lorem_ipsum and "lorem ipsum" in lower) or (
            self.filter_javascript and "javascript" in lower) or (
            self.filter_policy and any(p in lower for p in POLICY_SUBSTRINGS))

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if self._needs_line_loop(doc.text):
            return super().filter(doc)
        lines = [line.strip() for line in doc.text.splitlines()]
        kept = [line for line in lines if len(line.split()) >= self.min_words_per_line]
        if lines:
            self.stat_update("line-total", value=len(lines))
        if len(lines) > len(kept):
            self.stat_update("line-filter-too_few_words", value=len(lines) - len(kept))
        if kept:
            self.stat_update("line-kept", value=len(kept))
        doc.text = "\n".join(kept).strip()
        return True
