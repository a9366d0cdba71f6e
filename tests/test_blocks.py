"""dapt.pretraining.blocks: token blocks through 🤗 datasets equal the in-memory packing, are cached, fail clearly, and
split between processes without overlap."""

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dapt.pretraining import blocks
from dapt.pretraining.blocks import TokenBlocks, token_blocks, tokenize_corpus
from dapt.pretraining.mlm import pack
from tests.conftest import CORPUS, bpe_tokenizer, wordpiece_tokenizer, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [f"{t} clause {i}" for i, t in enumerate(CORPUS * 30)]


def parquet_shards(folder: Path, texts: list, per_shard: int) -> Path:
    folder.mkdir(parents=True)
    for n, start in enumerate(range(0, len(texts), per_shard)):
        rows = [{"id": str(start + i), "text": t} for i, t in enumerate(texts[start:start + per_shard])]
        pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([("id", pa.string()), ("text", pa.string())])),
                       folder / f"part-{n:05d}.parquet")
    return folder


def all_blocks(b: TokenBlocks) -> torch.Tensor:
    return torch.stack([b[i] for i in range(len(b))])


@pytest.mark.parametrize("make_tok", [wordpiece_tokenizer, bpe_tokenizer])
def test_blocks_equal_the_in_memory_packing(tmp_path, make_tok):
    """Shards read in parallel give exactly `mlm.pack`'s blocks: one separator between documents, [CLS] (or <s>)
    first, windows that cross documents, shards and map processes, the ragged tail dropped."""
    tok = make_tok()
    source = parquet_shards(tmp_path / "shards", TEXTS, per_shard=250)
    got = token_blocks(tok, source, 16, tmp_path / "cache", num_proc=2)
    expected = pack(tok, TEXTS, 16)
    assert len(got) == len(expected) > 300 and torch.equal(all_blocks(got), expected)
    assert torch.equal(got.head(5), expected[:5]) and len(got.head(10**6)) == len(got)
    with pytest.raises(IndexError):
        got[len(got)]
    # the same text as one JSONL file, and a longer block over the same cached tokens
    write_jsonl(tmp_path / "c.jsonl", [{"id": str(i), "text": t} for i, t in enumerate(TEXTS)])
    assert torch.equal(all_blocks(token_blocks(tok, tmp_path / "c.jsonl", 16, tmp_path / "cache2", num_proc=1)),
                       expected)
    assert torch.equal(all_blocks(TokenBlocks(got.folder, 40, got.cls_id)), pack(tok, TEXTS, 40))


def test_tokens_are_cached_per_tokenizer_and_text_and_stored_small(tmp_path, monkeypatch):
    tok = wordpiece_tokenizer()
    source = parquet_shards(tmp_path / "shards", TEXTS, per_shard=500)
    first = tokenize_corpus(tok, source, tmp_path / "cache", num_proc=1)
    with monkeypatch.context() as m:
        m.setattr(blocks, "tokenize_units", lambda *a, **k: pytest.fail("tokenised again"))
        assert tokenize_corpus(tok, source, tmp_path / "cache", num_proc=1) == first
    assert {f.name for f in first.iterdir()} == {"tokens.json", "tokens.arrow"}  # no copy of the text
    tokens = json.loads((first / "tokens.json").read_text())["tokens"]
    assert (first / "tokens.arrow").stat().st_size < 2.2 * tokens + 20_000  # uint16 ids (+ list offsets)
    assert tokenize_corpus(bpe_tokenizer(), source, tmp_path / "cache", num_proc=1) != first
    parquet_shards(tmp_path / "other", list(reversed(TEXTS)), per_shard=500)
    assert tokenize_corpus(tok, tmp_path / "other", tmp_path / "cache", num_proc=1) != first


def test_a_bad_row_or_an_empty_shard_is_named(tmp_path):
    tok = wordpiece_tokenizer()
    source = parquet_shards(tmp_path / "shards", TEXTS[:40], per_shard=20)
    pq.write_table(pa.table({"id": ["a", "b", "c", "d"], "text": ["fine text", "more", None, "end"]}),
                   source / "part-00002.parquet", row_group_size=2)  # the bad row opens the second row group
    with pytest.raises(ValueError, match=r"part-00002\.parquet: row 3: 'text' is NoneType"):
        tokenize_corpus(tok, source, tmp_path / "cache", num_proc=2)
    assert not any((tmp_path / "cache").glob("*/tokens.json"))  # nothing half-written is taken for a cache
    pq.write_table(pa.table({"id": pa.array([], pa.string()), "text": pa.array([], pa.string())}),
                   source / "part-00002.parquet")
    with pytest.raises(ValueError, match=r"part-00002\.parquet: empty shard"):
        tokenize_corpus(tok, source, tmp_path / "cache", num_proc=1)
    write_jsonl(tmp_path / "notext.jsonl", [{"id": "0", "body": "x"}])
    with pytest.raises(ValueError, match=r"notext\.jsonl: row 1: no 'text' field \(fields: id, body\)"):
        tokenize_corpus(tok, tmp_path / "notext.jsonl", tmp_path / "cache", num_proc=1)
    with pytest.raises(ValueError, match="not enough for one block"):
        token_blocks(tok, parquet_shards(tmp_path / "tiny", ["the cat"], 1), 64, tmp_path / "cache")


def test_a_pickled_copy_maps_the_files_itself(tmp_path):
    """What a dataloader worker gets: the paths, not the mapped arrays."""
    b = token_blocks(wordpiece_tokenizer(), parquet_shards(tmp_path / "s", TEXTS, 500), 16, tmp_path / "c", 1)
    expected = b[7]
    copy = pickle.loads(pickle.dumps(b))
    assert copy._chunks is None and torch.equal(copy[7], expected) and len(pickle.dumps(b)) < 2000


RANKS = """
import json, sys
from pathlib import Path
import torch
from accelerate import PartialState
from dapt.pretraining.blocks import TokenBlocks
from dapt.pretraining.mlm import Blocks, training_args
from stages.pretrain import PretrainParams, shared_blocks
from transformers import AutoTokenizer, Trainer

class Recorded(TokenBlocks):
    def __getitem__(self, i):
        self.read.append(i)
        return super().__getitem__(i)

p = PretrainParams.model_validate_json(sys.argv[1])
args = training_args(p, Path("out"), 1e-3, 100, 0.0, 0, save=False)  # joins the two processes (gloo)
tok = AutoTokenizer.from_pretrained(sys.argv[2])
data = shared_blocks(tok, {"train": Path(sys.argv[3])}, p, Path("cache"))["train"]
data.__class__, data.read = Recorded, []
trainer = Trainer(model=torch.nn.Linear(1, 1), args=args, train_dataset=Blocks(data, 0), data_collator=lambda rows: {})
batches = sum(1 for _ in trainer.get_train_dataloader())
Path(f"rank{PartialState().process_index}.json").write_text(json.dumps({"read": data.read, "batches": batches}))
"""


def test_two_processes_read_disjoint_shares(tmp_path):
    """Under torchrun (gloo), the first process tokenises, both map its cache, and in an epoch each reads only
    its own blocks: none read twice, none by both, all but the last incomplete batch read."""
    from tests.test_pretrain import P

    tok = wordpiece_tokenizer()
    tok.save_pretrained(tmp_path / "tok")
    source = parquet_shards(tmp_path / "shards", TEXTS, per_shard=250)
    (tmp_path / "ranks.py").write_text(RANKS)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(tmp_path / "ranks.py"), P.model_dump_json(), str(tmp_path / "tok"), str(source)],
                         cwd=tmp_path, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    a, b = (set(r["read"]) for r in ranks)
    n = len(pack(tok, TEXTS, P.max_seq_length))
    assert len(a) == len(ranks[0]["read"]) and len(b) == len(ranks[1]["read"])  # no block read twice
    assert not a & b and len(a) == len(b) == ranks[0]["batches"] * P.batch_size
    assert n - 2 * P.batch_size < len(a | b) <= n  # drop_last: at most one global batch left out
    assert len(list((tmp_path / "cache").glob("*/tokens.json"))) == 1  # tokenised once
