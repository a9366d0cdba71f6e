"""adapt_tokenizer: a real WordPiece extension, FVT initialisation, fertility, and the stage."""

import json

import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer

from stages.adapt_tokenizer import AdaptTokenizerParams, extend_wordpiece, fertility, init_new_rows, \
    rank_candidates, run, word_counts
from tests.conftest import CORPUS, wordpiece_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def base():
    return wordpiece_tokenizer(vocab_size=120)  # small: domain words are split into several pieces


def test_extension_keeps_ids_and_tokenization(base, tmp_path):
    new_word = "indemnify"  # not in the training corpus: several pieces in the base vocabulary
    assert len(base.tokenize(new_word)) > 1
    ext = extend_wordpiece(base, [new_word])
    assert {t: ext.get_vocab()[t] for t in base.get_vocab()} == base.get_vocab()  # every old id kept
    assert ext.convert_tokens_to_ids(new_word) == len(base)
    plain = "the cat sat on the mat"
    assert ext(plain)["input_ids"] == base(plain)["input_ids"]
    text = f"The {new_word} shall pay."
    assert new_word in ext.tokenize(text) and new_word not in base.tokenize(text)
    assert ext.decode(ext(text)["input_ids"], skip_special_tokens=True) == text.lower()
    ext.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(text)["input_ids"] == ext(text)["input_ids"]


def test_extension_does_not_match_inside_words(base):
    assert "indemnify" not in base.get_vocab()
    ext = extend_wordpiece(base, ["indemnify"])
    # `add_tokens` would cut "reindemnify" into "re" + "indemnify"; a vocabulary entry is a word-initial
    # piece, so the word keeps its base tokenization
    assert ext.tokenize("reindemnify") == base.tokenize("reindemnify")
    assert ext.tokenize("indemnify") == ["indemnify"]


def test_rank_by_tokens_saved(base):
    counts = word_counts(base, ["Indemnify indemnify indemnify merchantability the"] * 10)
    ranked = rank_candidates(["indemnify", "merchantability", "the"], base, counts, min_frequency=5, max_new=10)
    saved = {r["token"]: r["tokens_saved"] for r in ranked}
    assert saved["indemnify"] == 30 * (len(base.tokenize("indemnify")) - 1)
    assert saved["merchantability"] == 10 * (len(base.tokenize("merchantability")) - 1)
    assert "the" not in saved  # already one token: nothing to save
    assert [r["tokens_saved"] for r in ranked] == sorted(saved.values(), reverse=True)
    assert rank_candidates(["indemnify"], base, counts, min_frequency=31, max_new=10) == []


def test_fertility(base):
    one = fertility(base, ["the the the"])
    assert one == {"tokens_per_word": 1.0, "split_3plus": 0.0}
    word = "indemnify"
    pieces = len(base.tokenize(word))
    assert fertility(base, [f"the {word}"])["tokens_per_word"] == (1 + pieces) / 2


def test_mean_initialisation_with_tied_decoder(tiny_bert):
    base = AutoTokenizer.from_pretrained(tiny_bert)
    model = AutoModelForMaskedLM.from_pretrained(tiny_bert)
    word = "licensorship"
    ext = extend_wordpiece(base, [word])
    model.resize_token_embeddings(len(ext), pad_to_multiple_of=64, mean_resizing=False)
    init_new_rows(model, base, [word], len(base), "mean")
    emb = model.get_input_embeddings().weight
    pieces = base(word, add_special_tokens=False)["input_ids"]
    assert torch.allclose(emb[len(base)], emb[pieces].mean(0))
    assert emb.shape[0] % 64 == 0
    assert model.get_output_embeddings().weight.data_ptr() == emb.data_ptr()  # tying preserved


def test_stage_on_wordpiece(project, tiny_bert):
    import shutil

    shutil.copytree(tiny_bert, project.base_model)
    texts = [{"id": str(i), "text": t} for i, t in enumerate(CORPUS * 5)]
    for path in (project.domain_train, project.domain_valid, project.general_valid):
        write_jsonl(path, texts)
    run(AdaptTokenizerParams(max_new_tokens=5, min_frequency=2, domain_vocab_size=400), project)
    metrics = json.loads((project.metrics / "adapt_tokenizer.json").read_text())
    tok = AutoTokenizer.from_pretrained(project.domain_init)
    assert metrics["vocab_size"] == len(tok) == metrics["base_vocab_size"] + metrics["new_tokens"]
    assert metrics["domain_tokens_per_word_after"] <= metrics["domain_tokens_per_word_before"]
    model = AutoModelForMaskedLM.from_pretrained(project.domain_init)
    assert model.get_input_embeddings().weight.shape[0] >= len(tok)
    assert (project.reports / "new_tokens.tsv").read_text().count("\n") == metrics["new_tokens"] + 1


def test_stage_refuses_bpe_extension_clearly(project, tiny_roberta):
    import shutil

    shutil.copytree(tiny_roberta, project.base_model)
    for path in (project.domain_train, project.domain_valid, project.general_valid):
        write_jsonl(path, [{"id": "0", "text": CORPUS[0]}])
    with pytest.raises(ValueError, match="uses BPE.*max_new_tokens: 0"):
        run(AdaptTokenizerParams(max_new_tokens=5, min_frequency=1, domain_vocab_size=400), project)
    run(AdaptTokenizerParams(max_new_tokens=0, min_frequency=1, domain_vocab_size=400), project)
    assert AutoTokenizer.from_pretrained(project.domain_init)(CORPUS[0])["input_ids"] == \
        AutoTokenizer.from_pretrained(tiny_roberta)(CORPUS[0])["input_ids"]
