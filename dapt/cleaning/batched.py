"""datatrove's filter and formatter loops with their counters updated once per batch instead of once per document.

datatrove's `BaseFilter.run` and `BaseFormatter.run` update statistics for every document: a counter or a timer
(`total`, `forwarded`, `dropped_<reason>`) and the running mean and variance of `doc_len` for every document a
filter keeps. On the demo that came to about 3 µs per document and step, 0.9 s of the 11 s the chain takes. These
loops give the same counter totals (all that `stages.clean` reads, `step_stats`) from one update per batch, and
hand the same documents on in the same order; they keep no `doc_len` statistics.
"""

from __future__ import annotations

import contextlib
from collections import Counter

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.filters.base_filter import BaseFilter, get_filter_result
from datatrove.pipeline.formatters.base import BaseFormatter
from datatrove.utils.batching import batched
from datatrove.utils.typeshelper import StatHints


class BatchedFilter(BaseFilter):
    """A filter whose `run` counts per batch; put it first among the bases of a datatrove filter subclass."""

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        with self.exclusion_writer if self.exclusion_writer else contextlib.nullcontext() as writer:
            for batch in batched(data, self.batch_size):
                with self.track_time("batch"):
                    results = [get_filter_result(r) for r in self.filter_batch(batch)]
                reasons = Counter(reason for keep, reason in results if not keep)  # first seen first, as datatrove
                dropped = reasons.total()
                for key, n in (("batches", 1), (StatHints.total, len(batch)),
                               (StatHints.forwarded, len(batch) - dropped), (StatHints.dropped, dropped),
                               *((f"dropped_{r}", n) for r, n in reasons.items() if r)):
                    if n:  # datatrove creates a counter only when it counts something
                        self.stat_update(key, value=n)
                for doc, (keep, reason) in zip(batch, results):
                    if keep:
                        yield doc
                    elif writer:
                        if reason:
                            doc.metadata["filter_reason"] = reason
                        writer.write(doc, rank)


class BatchedFormatter(BaseFormatter):
    """A formatter whose `run` counts and times per batch of `batch_size` documents."""

    batch_size = 256

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for batch in batched(data, self.batch_size):
            self.stat_update(StatHints.total, value=len(batch))
            with self.track_time("batch"):
                for doc in batch:
                    doc.text = self.format(doc.text)
            yield from batch
