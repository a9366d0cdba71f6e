"""adapt_tokenizer: real WordPiece and byte-level BPE extensions, FVT initialisation, fertility, and the stage."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForMaskedLM,
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    ModernBertConfig,
    ModernBertForMaskedLM,
    PreTrainedTokenizerFast,
    RobertaConfig,
    RobertaForMaskedLM,
)

from stages.adapt_tokenizer import (
    AdaptTokenizerParams,
    base_pieces,
    candidate_counts,
    extend,
    family,
    fertility,
    rank_candidates,
    resize_and_init,
    run,
    word_counts,
)
from tests.conftest import (
    CORPUS,
    TINY,
    bpe_tokenizer,
    modernbert_tokenizer,
    wordpiece_tokenizer,
    write_jsonl,
    write_parquet_shards,
)

PLAIN = "The cat sat on the mat and the dog slept by the fire."  # only corpus words: no new token may touch it


@pytest.fixture(scope="module")
def wordpiece():
    return wordpiece_tokenizer(vocab_size=120)  # small: domain words are split into several pieces


@pytest.fixture(scope="module", params=["roberta", "modernbert"])
def bytelevel(request):
    return bpe_tokenizer(vocab_size=500) if request.param == "roberta" else modernbert_tokenizer(vocab_size=500)


def check_extension(base, ext, new_word: str, shown: str) -> None:
    """The issue's contract for an extended tokenizer, on one new word (`shown` is how it reads in text)."""
    assert {t: ext.get_vocab()[t] for t in base.get_vocab()} == base.get_vocab()  # every old id kept
    assert ext(PLAIN)["input_ids"] == base(PLAIN)["input_ids"]
    text = f"The licensor shall {shown} the licensee."
    assert new_word in ext.tokenize(text) and new_word not in base.tokenize(text)
    assert len(ext.tokenize(text)) < len(base.tokenize(text))
    assert ext.decode(ext(text)["input_ids"], skip_special_tokens=True).strip() == base.decode(
        base(text)["input_ids"], skip_special_tokens=True).strip()


def test_wordpiece_extension_keeps_ids_and_tokenization(wordpiece, tmp_path):
    assert len(wordpiece.tokenize("indemnify")) > 1
    ext, added = extend(wordpiece, ["indemnify"])
    assert added == ["indemnify"] and ext.convert_tokens_to_ids("indemnify") == len(wordpiece)
    check_extension(wordpiece, ext, "indemnify", "indemnify")
    ext.save_pretrained(tmp_path)
    text = "The Licensee shall indemnify the licensor."
    assert ext.decode(ext(text)["input_ids"], skip_special_tokens=True) == text.lower()  # uncased: lower-cased
    assert AutoTokenizer.from_pretrained(tmp_path)(text)["input_ids"] == ext(text)["input_ids"]


def test_wordpiece_continuation_piece(wordpiece):
    ext, _ = extend(wordpiece, ["##ability"])
    assert ext.tokenize("merchantability")[-1] == "##ability"
    assert "##ability" not in wordpiece.tokenize("merchantability")
    assert ext.tokenize("ability") == wordpiece.tokenize("ability")  # a continuation piece never starts a word


def test_wordpiece_extension_does_not_match_inside_words(wordpiece):
    ext, _ = extend(wordpiece, ["indemnify"])
    # `add_tokens` would cut "reindemnify" into "re" + "indemnify"; a vocabulary entry is a word-initial
    # piece, so the word keeps its base tokenization
    assert ext.tokenize("reindemnify") == wordpiece.tokenize("reindemnify")
    assert ext.tokenize("indemnify") == ["indemnify"]


def test_bytelevel_bpe_extension_adds_vocabulary_and_merges(bytelevel, tmp_path):
    assert family(bytelevel) == "bytelevel_bpe"
    pieces = base_pieces(bytelevel)("Ġindemnify")
    assert len(pieces) > 2
    ext, added = extend(bytelevel, ["Ġindemnify"])
    check_extension(bytelevel, ext, "Ġindemnify", "indemnify")
    # the merge chain's intermediate entries come along, after every old id
    assert added[-1] == "Ġindemnify" and len(added) == len(pieces) - 1
    assert min(ext.convert_tokens_to_ids(added)) > max(bytelevel.get_vocab().values())
    old = json.loads(bytelevel.backend_tokenizer.to_str())["model"]["merges"]
    new = json.loads(ext.backend_tokenizer.to_str())["model"]["merges"]
    assert new[: len(old)] == old and len(new) == len(old) + len(pieces) - 1  # base merges keep their ranks
    assert ext.tokenize("indemnify the")[0] != "Ġindemnify"  # no space before it: another word
    text = "The licensor shall indemnify, and indemnify again."
    assert ext.decode(ext(text)["input_ids"], skip_special_tokens=True) == text  # byte-level: exact round trip
    ext.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)(text)["input_ids"] == ext(text)["input_ids"]


def test_base_pieces_follow_the_tokenizer(wordpiece):
    pieces = base_pieces(wordpiece)
    for word in ("indemnify", "licensor", "merchantability", "the"):
        assert pieces(word) == wordpiece.tokenize(word)
    cont = pieces("##ability")
    assert all(p.startswith("##") for p in cont) and "".join(p[2:] for p in cont) == "ability"


def test_candidates_and_ranking_by_tokens_saved(wordpiece):
    texts = ["Indemnification indemnify indemnify merchantability the"] * 10
    counts = word_counts(wordpiece, texts)
    assert counts["indemnify"] == 20  # the tokenizer's own normaliser: lower-cased
    domain = wordpiece.train_new_from_iterator(texts * 5, vocab_size=200)
    found = candidate_counts(domain, wordpiece, counts)
    assert found["indemnify"] == 20 and "the" not in found and all(t not in wordpiece.get_vocab() for t in found)
    ranked = rank_candidates(found, base_pieces(wordpiece), min_frequency=5, max_new=10)
    saved = {r["token"]: r["tokens_saved"] for r in ranked}
    assert saved["indemnify"] == 20 * (len(wordpiece.tokenize("indemnify")) - 1)
    assert [r["tokens_saved"] for r in ranked] == sorted(saved.values(), reverse=True)
    frequent = rank_candidates(found, base_pieces(wordpiece), min_frequency=21, max_new=10)
    assert "indemnify" not in {r["token"] for r in frequent} and all(r["frequency"] >= 21 for r in frequent)
    assert len(rank_candidates(found, base_pieces(wordpiece), 1, 1)) == 1


def test_bytelevel_candidates_are_whole_words_after_a_space():
    base = bpe_tokenizer(vocab_size=500)
    texts = ["Indemnify the licensee; the licensor shall indemnify and indemnify again."] * 20
    domain = base.train_new_from_iterator(texts, vocab_size=600)
    found = candidate_counts(domain, base, word_counts(base, texts))
    assert found["Ġindemnify"] == 40 and "Indemnify" not in found  # no space before it: not a candidate
    assert all(t.startswith("Ġ") and t[1:].isalpha() for t in found)


def test_fertility(wordpiece):
    assert fertility(wordpiece, ["the the the"]) == {"tokens_per_word": 1.0, "split_3plus": 0.0}
    pieces = len(wordpiece.tokenize("indemnify"))
    assert fertility(wordpiece, ["the indemnify"])["tokens_per_word"] == (1 + pieces) / 2


@pytest.mark.parametrize("how", ["mean", "mean_all", "random"])
@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_initialisation_keeps_tying_and_sets_the_bias(kind, how):
    torch.manual_seed(0)
    if kind == "bert":
        base, word = wordpiece_tokenizer(vocab_size=120), "indemnify"
        model = BertForMaskedLM(BertConfig(vocab_size=len(base), **TINY))
    else:
        base, word = bpe_tokenizer(vocab_size=500), "Ġindemnify"
        model = RobertaForMaskedLM(RobertaConfig(vocab_size=len(base), pad_token_id=base.pad_token_id,
                                                 **{**TINY, "max_position_embeddings": 140}))
    model.get_output_embeddings().bias.data.normal_()  # a trained head's bias is not zero
    old_emb = model.get_input_embeddings().weight.detach().clone()
    lowest_bias = model.get_output_embeddings().bias.detach().min()
    ext, added = extend(base, [word])
    pieces = base_pieces(base)
    resize_and_init(model, ext, added, pieces, base.convert_tokens_to_ids, how)
    emb, out = model.get_input_embeddings().weight, model.get_output_embeddings()
    assert emb.shape[0] % 64 == 0 and emb.shape[0] >= len(ext)
    assert out.weight.data_ptr() == emb.data_ptr() and out.bias.shape[0] == emb.shape[0]  # tying preserved
    assert torch.equal(emb[: len(base)], old_emb)  # old rows untouched
    assert (out.bias[len(ext):] == lowest_bias).all()  # padding rows: no likelier than any real token
    row, source = ext.convert_tokens_to_ids(word), base.convert_tokens_to_ids(pieces(word))
    if how == "mean":
        assert torch.allclose(emb[row], old_emb[source].mean(0))
        assert torch.isclose(out.bias[row], out.bias[source].mean())
    elif how == "mean_all":
        assert torch.allclose(emb[row], old_emb.mean(0), atol=1e-6)
    else:
        assert out.bias[row] == 0 and not torch.allclose(emb[row], old_emb[source].mean(0))


def test_unsupported_family_fails_with_what_to_do():
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=100, special_tokens=["<unk>"], unk_token="<unk>")
    tok.train_from_iterator(CORPUS, trainer)
    with pytest.raises(ValueError, match="Unigram.*max_new_tokens: 0"):
        family(PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>"))


# ---------------------------------------------------------------------------------------------------
# the stage, on each family


DOMAIN = CORPUS + ["The licensee shall indemnify and hold harmless the licensor.",
                   "Indemnification obligations survive; the sublicensable rights are irrevocable."] * 10
TRAIN_ROWS = [{"id": str(i), "text": t} for i, t in enumerate(DOMAIN * 3)]


def stage_inputs(project, base_dir) -> None:
    shutil.copytree(base_dir, project.base_model)
    # training text in shards as clean writes them, several, so the stage reads across shard boundaries
    write_parquet_shards(project.domain_train, TRAIN_ROWS, shard_docs=25)
    for path, texts in ((project.domain_valid, DOMAIN), (project.general_valid, CORPUS)):
        write_jsonl(path, [{"id": str(i), "text": t} for i, t in enumerate(texts)])


@pytest.fixture(scope="module")
def tiny_modernbert(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-modernbert")
    tok = modernbert_tokenizer(vocab_size=300)
    config = ModernBertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=64, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                              bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                              cls_token_id=tok.cls_token_id, sep_token_id=tok.sep_token_id)
    ModernBertForMaskedLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("base_fixture", ["tiny_bert", "tiny_roberta", "tiny_modernbert"])
def test_stage(project, base_fixture, request):
    base_dir = request.getfixturevalue(base_fixture)
    stage_inputs(project, base_dir)
    run(AdaptTokenizerParams(max_new_tokens=5, min_frequency=2, domain_vocab_size=600), project)
    metrics = json.loads((project.metrics / "adapt_tokenizer.json").read_text())
    tok = AutoTokenizer.from_pretrained(project.init_dir("domain"))
    assert metrics["new_tokens"] > 0
    assert metrics["vocab_size"] == len(tok) == metrics["base_vocab_size"] + metrics["new_vocab_entries"]
    assert metrics["domain_tokens_per_word_after"] < metrics["domain_tokens_per_word_before"]
    assert metrics["general_tokens_per_word_after"] <= metrics["general_tokens_per_word_before"]
    model = AutoModelForMaskedLM.from_pretrained(project.init_dir("domain"))
    assert model.get_input_embeddings().weight.shape[0] >= len(tok)
    assert (project.reports / "new_tokens.tsv").read_text().count("\n") == metrics["new_tokens"] + 1
    # the ablation: base tokenizer, and the same weights (and MLM head) as the adapted model's old rows
    novocab = project.init_dir("domain_novocab")
    base_tok = AutoTokenizer.from_pretrained(base_dir)
    assert AutoTokenizer.from_pretrained(novocab)(CORPUS[0])["input_ids"] == base_tok(CORPUS[0])["input_ids"]
    ablation = AutoModelForMaskedLM.from_pretrained(novocab)
    adapted = model.state_dict()
    for name, a in ablation.state_dict().items():  # vocabulary-sized tensors: equal on the old rows
        assert torch.equal(adapted[name][: a.shape[0]], a), name


def test_stage_without_new_tokens_keeps_the_base_tokenizer(project, tiny_roberta):
    stage_inputs(project, tiny_roberta)
    run(AdaptTokenizerParams(max_new_tokens=0, min_frequency=1, domain_vocab_size=400), project)
    assert AutoTokenizer.from_pretrained(project.init_dir("domain"))(CORPUS[0])["input_ids"] == \
        AutoTokenizer.from_pretrained(tiny_roberta)(CORPUS[0])["input_ids"]
    assert json.loads((project.metrics / "adapt_tokenizer.json").read_text())["new_tokens"] == 0


def stage_outputs(project) -> list[bytes]:
    return [(project.reports / "new_tokens.tsv").read_bytes(),
            *((project.init_dir("domain") / f).read_bytes() for f in ("tokenizer.json", "model.safetensors"))]


def test_stage_reads_shards_and_a_jsonl_file_alike(project, tiny_roberta):
    stage_inputs(project, tiny_roberta)
    params = AdaptTokenizerParams(max_new_tokens=5, min_frequency=2, domain_vocab_size=600)
    run(params, project)
    sharded = stage_outputs(project)
    write_jsonl(Path("train.jsonl"), TRAIN_ROWS)
    run(params, project.model_copy(update={"domain_train": Path("train.jsonl")}))
    assert stage_outputs(project) == sharded and sharded[0].count(b"\n") == 6


def test_stage_without_training_shards_names_the_folder(project, tiny_roberta):
    stage_inputs(project, tiny_roberta)
    for shard in project.domain_train.iterdir():
        shard.unlink()
    with pytest.raises(FileNotFoundError, match="data/clean/domain_train: a folder with no \\*.parquet shards"):
        run(AdaptTokenizerParams(max_new_tokens=5, min_frequency=2, domain_vocab_size=600), project)
    assert not project.init_dir("domain").exists()
