"""Pretraining text as token blocks through 🤗 datasets: tokenised once into Arrow files, read lazily.

`tokenize_corpus` tokenises a corpus (a folder of Parquet shards as `clean` writes it, a JSONL file, or several
of these read as one stream) with
`Dataset.map(batched=True, num_proc=...)` over its row groups, each read straight from its shard, into Arrow files:
each document's token ids followed by a separator, in corpus order, as uint16 where the vocabulary fits (2 bytes
a token). The folder is keyed by a hash of the tokenizer, this module and every input file, each hashed as a
stream.

`TokenBlocks` serves block i as `[CLS] + stream[i * (L - 1) : (i + 1) * (L - 1)]`, a fixed window over the
concatenated token stream: the same blocks `mlm.pack` builds in memory (documents joined by one separator, no
other special tokens, the ragged tail dropped), but read from the memory-mapped Arrow files only when asked for.
Memory stays flat in the corpus size, every process of a multi-GPU run maps the same files (the page cache
holds them once), and a rank reads only the blocks its sampler gives it. The block length is not part of the
cache: changing `max_seq_length` re-uses the tokens.

Written here rather than with `run_mlm.py`'s `group_texts`, which packs each `map` batch on its own and drops
every batch's remainder: a window over the whole stream gives the blocks the in-memory recipe gives.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from datasets import Dataset, Features, List, Value, concatenate_datasets
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase

from dapt.common import atomic_path, file_digest, iter_jsonl, text_parquet, text_shards

log = logging.getLogger("dapt")

MANIFEST = "tokens.json"


# ---------------------------------------------------------------------------------------------------
# the corpus: units of work (a Parquet row group, or a JSONL file), a hash that streams


def work_units(files: list[Path]) -> list[dict]:
    """What one `map` call reads: a row group of a Parquet shard (`clean` writes 1,000 documents a group), or a
    whole JSONL file (the validation sets); each with the number of its first row in its file. An empty shard is
    an error that names it."""
    units = []
    for f in files:
        if f.suffix == ".parquet":
            meta = pq.ParquetFile(f).metadata
            first = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]).tolist()
            units += [{"file": str(f), "group": g, "first_row": first[g]} for g in range(meta.num_row_groups)
                      if first[g + 1] > first[g]]
            if meta.num_rows == 0:
                raise ValueError(f"pretrain: {f}: empty shard (no documents); remove it or rerun clean")
        else:
            units.append({"file": str(f), "group": -1, "first_row": 0})
    return units


def corpus_key(tok: PreTrainedTokenizerBase, files: list[Path]) -> str:
    """A hash of the tokenizer, this module's code and each file's name and bytes, read in chunks."""
    h = hashlib.sha1(tok.backend_tokenizer.to_str().encode())
    h.update(Path(__file__).read_bytes())
    for f in files:
        h.update(f.name.encode())
        h.update(file_digest(f))
    return h.hexdigest()[:16]


def read_unit(file: str, group: int) -> list:
    """The `text` of every document of one unit, as stored (checked by the caller)."""
    if group < 0:
        rows = list(iter_jsonl(Path(file)))
        if not rows:
            raise ValueError(f"pretrain: {file}: empty shard (no documents)")
        for i, row in enumerate(rows):
            if "text" not in row:
                raise ValueError(f"pretrain: {file}: row {i + 1}: no 'text' field (fields: {', '.join(row)})")
        return [row["text"] for row in rows]
    return text_parquet(Path(file)).read_row_group(group, columns=["text"]).column("text").to_pylist()


# ---------------------------------------------------------------------------------------------------
# tokenising: Dataset.map over the units in parallel, into Arrow files


def token_dtype(tok: PreTrainedTokenizerBase) -> str:
    """uint16 when every id fits (BERT's 30k, RoBERTa's 50k, ModernBERT's 50k): half the disk of int32."""
    return "uint16" if max(tok.get_vocab().values()) < 2**16 else "uint32"


def separator_ids(tok: PreTrainedTokenizerBase) -> tuple[int, int]:
    """The block's first token and the separator between documents: [CLS]/[SEP] (BERT), <s>/</s> (RoBERTa)."""
    cls_id = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
    sep_id = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
    return cls_id, sep_id


def encoder(tok: PreTrainedTokenizerBase) -> Tokenizer:
    """The tokenizer's Rust core, as `tok(texts, add_special_tokens=False)` runs it (no truncation or padding):
    its ids without the BatchEncoding's masks and offsets, a fifth faster."""
    core = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    core.no_truncation()
    core.no_padding()
    return core


def tokenize_units(batch: dict, core: Tokenizer, sep: int) -> dict:
    """Token ids of each document of the batch's units, separator appended, one row a document; an empty text
    adds nothing (no doubled separator). A text that is not a string is an error naming its file and row."""
    out = []
    for file, group, first in zip(batch["file"], batch["group"], batch["first_row"]):
        texts = read_unit(file, group)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"pretrain: {file}: row {first + i + 1}: 'text' is {type(text).__name__}, "
                                 f"not a string")
        out += [e.ids + [sep] for e in core.encode_batch_fast(texts, add_special_tokens=False) if e.ids]
    return {"ids": out}


def tokenize_corpus(tok: PreTrainedTokenizerBase, source: Path | Sequence[Path], cache: Path,
                    num_proc: int | None = None) -> Path:
    """Tokenise `source` once into `cache/<key>/` (Arrow files and a manifest); later calls return that folder.
    Several sources are one stream, in the order given (TAPT's task text: a task's train set and its collection).

    `Dataset.map` runs over the corpus's units (`work_units`), each worker reading its own straight from the
    shards: no Arrow copy of the text is made, and a worker holds one row group at a time. Under several
    processes, one calls it and the others wait (`stages.pretrain.shared_blocks`).
    """
    sources = [source] if isinstance(source, (str, Path)) else list(source)
    files = [f for s in sources for f in text_shards(s)]
    name = ", ".join(map(str, sources))  # what the manifest and the messages name
    folder = cache / corpus_key(tok, files)
    if (folder / MANIFEST).exists():
        return folder
    units = work_units(files)
    num_proc = max(1, min(num_proc or os.cpu_count() or 1, len(units)))
    log.info("pretrain: tokenising %s (%d files, %d units) into %s, %d processes", name, len(files), len(units),
             folder, num_proc)
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        # map's workers are forked: the garbage collector would touch, and so copy into each of them, every object
        # this process holds (torch, transformers); frozen, it leaves them shared (measured on 11 M tokens, two
        # workers: 604 MB at the peak without, 476 MB with)
        gc.collect()
        gc.freeze()
        try:
            tokens = Dataset.from_list(units).map(
                tokenize_units, batched=True, batch_size=1, num_proc=num_proc, remove_columns=list(units[0]),
                features=Features({"ids": List(Value(token_dtype(tok)))}),
                fn_kwargs={"core": encoder(tok), "sep": separator_ids(tok)[1]},
                cache_file_name=str(tmp / "tokens.arrow"), desc="tokenising")
        finally:
            gc.unfreeze()
        n_tokens = sum(len(c.values) for c in tokens.data.column("ids").chunks)
        arrow = sorted(Path(f["filename"]).name for f in tokens.cache_files)
        (tmp / MANIFEST).write_text(json.dumps({"files": arrow, "documents": len(tokens), "tokens": n_tokens,
                                                "source": name}))
    return folder


# ---------------------------------------------------------------------------------------------------
# blocks: windows over the token stream, read from memory-mapped files


class TokenBlocks(torch.utils.data.Dataset):
    """Fixed-length blocks over a tokenised corpus (`tokenize_corpus`): `[CLS]` + `block - 1` stream tokens each.

    Holds only the paths; each process maps the files itself on first use (a pickled copy, e.g. for a dataloader
    worker, maps its own), so nothing of the corpus is copied between processes.
    """

    def __init__(self, folder: Path, block: int, cls_id: int):
        self.folder, self.block, self.cls_id = Path(folder), block, cls_id
        manifest = json.loads((self.folder / MANIFEST).read_text())
        self.tokens = manifest["tokens"]
        self._n = self.tokens // (block - 1)
        if self._n == 0:
            raise ValueError(f"pretrain: {manifest['source']}: {self.tokens} tokens are not enough for one block "
                             f"of {block}")
        self._files = [self.folder / f for f in manifest["files"]]
        self._chunks: list[np.ndarray] | None = None

    def _open(self) -> None:
        table = concatenate_datasets([Dataset.from_file(str(f)) for f in self._files]).data.column("ids")
        # each record batch's token values, zero-copy views of the mapped files
        self._chunks = [c.flatten().to_numpy(zero_copy_only=True) for c in table.chunks if len(c)]
        self._starts = np.cumsum([0] + [len(c) for c in self._chunks])

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self._n:
            raise IndexError(f"block {i} of {self._n}")
        if self._chunks is None:
            self._open()
        body = self.block - 1
        lo, hi = i * body, (i + 1) * body
        first = int(np.searchsorted(self._starts, lo, side="right")) - 1
        parts, c = [], first
        while self._starts[c] < hi:
            parts.append(self._chunks[c][max(lo - self._starts[c], 0):hi - self._starts[c]])
            c += 1
        out = torch.empty(self.block, dtype=torch.long)
        out[0] = self.cls_id
        out[1:] = torch.from_numpy(np.concatenate(parts).astype(np.int64))
        return out

    def head(self, n: int) -> torch.Tensor:
        """The first `n` blocks (or all) as one tensor: validation sets."""
        return torch.stack([self[i] for i in range(min(n, self._n))])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_chunks": None}


def token_blocks(tok: PreTrainedTokenizerBase, source: Path | Sequence[Path], block: int, cache: Path,
                 num_proc: int | None = None) -> TokenBlocks:
    """`TokenBlocks` of `source`, tokenised into `cache` unless already there; in one process (several share the
    work through `stages.pretrain.shared_blocks`)."""
    return TokenBlocks(tokenize_corpus(tok, source, cache, num_proc), block, separator_ids(tok)[0])
