"""Shared fixtures: tiny models and tokenizers built locally (never from a hub), a scratch project dir."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast, RobertaConfig, RobertaForMaskedLM

from dapt.common import Paths, write_text_shards

CORPUS = [
    "The licensor grants the licensee a perpetual licence to redistribute the software.",
    "Redistribution and use in source and binary forms, with or without modification, are permitted.",
    "The software is provided as is, without warranty of any kind, express or implied.",
    "In no event shall the licensor be liable for any claim, damages or other liability.",
    "The cat sat on the mat and the dog slept by the fire while it rained outside.",
    "Permission is hereby granted, free of charge, to any person obtaining a copy of this software.",
] * 4


def wordpiece_tokenizer(texts: list[str] = CORPUS, vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A BERT-style uncased WordPiece tokenizer for `texts`: every character, alone and as a `##` piece, then
    their most frequent words whole, up to `vocab_size`; other words split into pieces.

    Built rather than trained: `WordPieceTrainer` breaks ties between equally frequent pairs differently from one
    process to the next, so a trained vocabulary, and any assertion on how it splits a word, is not repeatable.
    """
    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = Counter(w for t in texts for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(t)))
    chars = sorted({c for w in words for c in w})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars]
    vocab += [w for w, _ in sorted(words.items(), key=lambda wc: (-wc[1], wc[0])) if len(w) > 1]
    tok = Tokenizer(models.WordPiece({p: i for i, p in enumerate(vocab[:vocab_size])}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre_tokenizer, decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def bpe_tokenizer(texts: list[str] = CORPUS, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A RoBERTa-style byte-level BPE tokenizer trained on `texts`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.RobertaProcessing(("</s>", tok.token_to_id("</s>")),
                                                      ("<s>", tok.token_to_id("<s>")))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", cls_token="<s>", sep_token="</s>", mask_token="<mask>")


def modernbert_tokenizer(texts: list[str] = CORPUS, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A ModernBERT-style byte-level BPE tokenizer ([CLS] ... [SEP], GPT-NeoX/OLMo pre-tokenizer) trained on `texts`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    special = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=130)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A tiny random BertModel (with pooler, like a hub BERT) and its WordPiece tokenizer, saved locally."""
    path = tmp_path_factory.mktemp("tiny-bert")
    tok = wordpiece_tokenizer()
    BertModel(BertConfig(vocab_size=len(tok), **TINY)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_roberta(tmp_path_factory) -> Path:
    """A tiny random RoBERTa MLM and its byte-level BPE tokenizer, saved locally."""
    path = tmp_path_factory.mktemp("tiny-roberta")
    tok = bpe_tokenizer()
    config = RobertaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id, **{**TINY, "max_position_embeddings": 140})
    RobertaForMaskedLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def write_parquet_shards(path: Path, rows: list[dict], shard_docs: int = 1000) -> None:
    """Training text as clean hands it on: a folder of Parquet shards of {"id", "text"} rows."""
    write_text_shards(path, rows, shard_docs)


@pytest.fixture
def project(tmp_path, monkeypatch) -> Paths:
    """A scratch project directory as cwd, with its own MLflow store; returns its `Paths`."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("DAPT_MLFLOW_PARENT_RUN_ID", raising=False)
    return Paths(raw_domain=Path("data/raw/domain"), raw_general=Path("data/raw/general.jsonl"),
                 task=Path("data/task"), domain_train=Path("data/clean/domain_train"),
                 domain_valid=Path("data/clean/domain_valid.jsonl"),
                 general_valid=Path("data/clean/general_valid.jsonl"),
                 general_train=Path("data/clean/general_train"), checkpoints=Path("checkpoints"),
                 models=Path("models"), finetune=Path("results/finetune"), reports=Path("reports"),
                 metrics=Path("metrics"))
