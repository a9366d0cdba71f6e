"""adapt_tokenizer: extend the base tokenizer with domain vocabulary and initialise the new embeddings.

1. Train a tokenizer of the base model's family on the clean domain training text (`tokenizers`, via
   `train_new_from_iterator`, streamed from its Parquet shards) and segment every domain word with it.
2. Its pieces that the base vocabulary lacks are the candidates, ranked by the tokens they save on the domain
   corpus (frequency x (base pieces - 1)); the best `max_new_tokens` seen at least `min_frequency` times stay.
3. Extend the tokenizer *model*, not `add_tokens` (whose added tokens match inside other words and ignore
   WordPiece's `##` rules). WordPiece: word-initial and `##` continuation pieces join the vocabulary.
   Byte-level BPE (RoBERTa, ModernBERT): whole words join the vocabulary together with the merges that build
   them from their base pieces, ranked after every base merge. Every existing id keeps its id.
4. Resize the MLM model's embeddings (padded to a multiple of 64; the tied decoder and its bias follow) and
   initialise each new row from the base embeddings of the pieces the base tokenizer splits it into
   (FVT-style `mean`), or `mean_all` / `random`.

Writes the adapted model + tokenizer to `models/domain_init`, and the base model with the same MLM head to
`models/domain_novocab_init` (the ablation: continued pretraining without new vocabulary); tokens per word
before/after to the metrics, the new tokens to `reports/new_tokens.tsv`.

Run: `dvc repro adapt_tokenizer` (or `python -m stages.adapt_tokenizer`).
"""

from __future__ import annotations

import copy
import itertools
import json
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from tqdm.auto import tqdm
from transformers import AutoModelForMaskedLM, AutoTokenizer, PreTrainedTokenizerBase, set_seed

from dapt import tracking
from dapt.common import (
    Paths,
    Section,
    atomic_path,
    iter_texts,
    load_params,
    load_paths,
    log,
    read_jsonl,
    setup_stage,
    text_shards,
    write_json,
    write_text,
)


class AdaptTokenizerParams(Section):
    max_new_tokens: int = Field(ge=0)
    min_frequency: int = Field(ge=1)
    domain_vocab_size: int = Field(ge=100)
    init: Literal["mean", "mean_all", "random"] = "mean"
    seed: int = 0


Pieces = Callable[[str], list[str]]

# ---------------------------------------------------------------------------------------------------
# the tokenizer families


def family(tok: PreTrainedTokenizerBase) -> str:
    """`wordpiece` or `bytelevel_bpe`; anything else cannot be extended, and the message says what to do."""
    spec = json.loads(tok.backend_tokenizer.to_str())
    kind = spec["model"]["type"]
    if kind == "WordPiece":
        return "wordpiece"
    if kind == "BPE" and '"ByteLevel"' in json.dumps(spec.get("pre_tokenizer")) \
            and not spec["model"].get("continuing_subword_prefix") and not spec["model"].get("end_of_word_suffix"):
        return "bytelevel_bpe"
    raise ValueError(f"adapt_tokenizer: vocabulary extension supports WordPiece (BERT) and byte-level BPE (RoBERTa, "
                     f"ModernBERT) tokenizers; this one is a {kind} model "
                     f"({'byte-level' if 'ByteLevel' in json.dumps(spec.get('pre_tokenizer')) else 'not byte-level'}). "
                     f"Set adapt_tokenizer.max_new_tokens: 0 to keep its vocabulary.")


def base_pieces(tok: PreTrainedTokenizerBase) -> Pieces:
    """How the base tokenizer splits a vocabulary entry in its own position.

    BPE: the model's merges on the entry. WordPiece: greedy longest match, with `##` pieces throughout for a
    continuation entry (`tokenizers` only exposes the word-initial case).
    """
    model = tok.backend_tokenizer.model
    if family(tok) == "bytelevel_bpe":
        return lambda entry: [t.value for t in model.tokenize(entry)]
    vocab, prefix, unk = tok.get_vocab(), model.continuing_subword_prefix, model.unk_token

    def wordpiece(entry: str) -> list[str]:
        continuation = entry.startswith(prefix)
        span = entry.removeprefix(prefix) if continuation else entry
        pieces, start = [], 0
        while start < len(span):
            for end in range(len(span), start, -1):
                piece = (prefix if start or continuation else "") + span[start:end]
                if piece in vocab:
                    break
            else:
                return [unk]
            pieces.append(piece)
            start = end
        return pieces

    return wordpiece


# ---------------------------------------------------------------------------------------------------
# candidates


def word_counts(tok: PreTrainedTokenizerBase, texts: Iterable[str]) -> Counter:
    """Words as the tokenizer itself sees them (after its normaliser and pre-tokenizer: "Ġword" in byte-level BPE)."""
    backend = tok.backend_tokenizer
    counts: Counter = Counter()
    # a stream has no length: the bar shows only when counting takes a while
    for text in tqdm(texts, desc="counting words", unit="doc", mininterval=2, delay=5):
        norm = backend.normalizer.normalize_str(text) if backend.normalizer else text
        counts.update(w for w, _ in backend.pre_tokenizer.pre_tokenize_str(norm))
    return counts


def candidate_counts(domain: PreTrainedTokenizerBase, base: PreTrainedTokenizerBase, counts: Counter) -> Counter:
    """How often the domain tokenizer uses each piece the base vocabulary lacks, over the corpus's words.

    WordPiece: any alphabetic piece, word-initial or `##` continuation. Byte-level BPE: whole words after a
    space ("Ġword") only: their merges can then only apply at the start of a word (see `extend_model_spec`).
    """
    model, base_vocab = domain.backend_tokenizer.model, base.get_vocab()
    wordpiece = family(base) == "wordpiece"
    found: Counter = Counter()
    for word, n in counts.items():
        pieces = [t.value for t in model.tokenize(word)]
        if wordpiece:
            pieces = [p for p in pieces if p.removeprefix(model.continuing_subword_prefix).isalpha()]
        elif not (len(pieces) == 1 and word.startswith("Ġ") and word[1:].isalpha()):
            continue
        found.update({p: n for p in pieces if p not in base_vocab})
    return found


def rank_candidates(found: Counter, pieces: Pieces, min_frequency: int, max_new: int) -> list[dict]:
    """Candidates ranked by tokens saved on the corpus, frequency x (base pieces - 1); ties by name."""
    ranked = []
    for token, freq in found.items():
        n = len(pieces(token))
        if freq >= min_frequency and n > 1:
            ranked.append({"token": token, "frequency": freq, "base_pieces": n, "tokens_saved": freq * (n - 1)})
    ranked.sort(key=lambda r: (-r["tokens_saved"], r["token"]))
    return ranked[:max_new]


# ---------------------------------------------------------------------------------------------------
# extension


def extend_model_spec(model: dict, tokens: Sequence[str], pieces: Pieces, first_id: int) -> list[str]:
    """Append `tokens` to a `tokenizer.json` model (in place) with ids from `first_id`; returns every vocabulary
    entry added, in id order.

    A BPE token ("Ġword") also needs a chain of merges from its base pieces, left to right: ("Ġind", "em"), then
    ("Ġindem", "n"), ... Each step's result is a vocabulary entry, so (pieces - 2) intermediate entries come
    with it. Ranked after every base merge, the chain starts on the base tokenization of a word; since only a
    word's first piece starts with "Ġ", only one new merge can apply at a time, left to right: the word
    becomes its token, and a word that shares its first base pieces (and only such a word) gets as far along
    the chain as they agree, as with a BPE trained on the domain.
    """
    vocab = model["vocab"]
    already = [t for t in tokens if t in vocab]
    if already:
        raise ValueError(f"token {already[0]!r} is already in the vocabulary")
    next_id = first_id
    added: list[str] = []

    def add(entry: str) -> None:
        nonlocal next_id
        if entry not in vocab:
            vocab[entry] = next_id
            next_id += 1
            added.append(entry)

    if model["type"] == "WordPiece":
        for token in tokens:
            add(token)
        return added
    merges = model["merges"]
    as_text = bool(merges) and isinstance(merges[0], str)  # older tokenizer.json: "a b" strings
    known = {tuple(m.split(" ", 1)) if as_text else tuple(m) for m in merges}
    for token in tokens:  # a token may already be an earlier chain's step: its merges are then all there is to add
        parts = pieces(token)
        current = parts[0]
        for part in parts[1:]:
            if (current, part) not in known:
                known.add((current, part))
                merges.append(f"{current} {part}" if as_text else [current, part])
            current += part
            add(current)
    return added


def extend(tok: PreTrainedTokenizerBase, tokens: Sequence[str]) -> tuple[PreTrainedTokenizerBase, list[str]]:
    """A copy of `tok` whose model knows `tokens`; returns it and every vocabulary entry added.

    Goes through `save_pretrained` and `AutoTokenizer.from_pretrained`, so the result is exactly what a user
    reloads (transformers 5's tokenizer classes rebuild their model from arguments, not from an object).
    """
    with tempfile.TemporaryDirectory(prefix="tokenizer-") as tmp:
        tok.save_pretrained(tmp)
        path = Path(tmp) / "tokenizer.json"
        spec = json.loads(path.read_text(encoding="utf-8"))
        if any(t in {a["content"] for a in spec.get("added_tokens", [])} for t in tokens):
            raise ValueError("a new token is already an added (special) token")
        # after every id in use: special tokens can sit above the vocabulary (ModernBERT's do)
        first_id = max([*spec["model"]["vocab"].values(), *(t["id"] for t in spec.get("added_tokens", []))]) + 1
        added = extend_model_spec(spec["model"], tokens, base_pieces(tok), first_id)
        path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
        extended = AutoTokenizer.from_pretrained(tmp)
    wrong = [t for t in tokens if [p.value for p in extended.backend_tokenizer.model.tokenize(t)] != [t]]
    if wrong:
        raise RuntimeError(f"adapt_tokenizer: extended tokenizer does not produce {wrong[:5]} as single tokens")
    return extended, added


def fertility(tok: PreTrainedTokenizerBase, texts: Sequence[str]) -> dict[str, float]:
    """Tokens per word and the share of words split into 3 or more pieces."""
    pieces: list[int] = []
    for enc in tok.backend_tokenizer.encode_batch(list(texts), add_special_tokens=False):
        pieces.extend(Counter(w for w in enc.word_ids if w is not None).values())
    if not pieces:
        return {"tokens_per_word": 0.0, "split_3plus": 0.0}
    return {"tokens_per_word": sum(pieces) / len(pieces), "split_3plus": sum(p >= 3 for p in pieces) / len(pieces)}


# ---------------------------------------------------------------------------------------------------
# model side


@torch.no_grad()
def resize_and_init(model: torch.nn.Module, tok: PreTrainedTokenizerBase, added: Sequence[str], pieces: Pieces,
                    base_ids: Callable[[list[str]], list[int]], how: str) -> None:
    """Make room for the new ids (a multiple of 64 rows) and initialise their rows and MLM output bias.

    `mean`: the mean of the entry's base pieces (FVT); `mean_all`: the mean of all base rows; `random`: the
    model's own initialiser. An untied output layer gets the same treatment as the input embeddings. Padding
    rows (no token has their id) get the lowest base output bias: no likelier than the least likely token.
    """
    ids = tok.convert_tokens_to_ids(list(added))
    if not ids:
        return
    first = min(ids)
    if max(ids) >= model.get_input_embeddings().weight.shape[0]:
        # a multiple of 64 keeps the embedding and output matmuls on fast kernel shapes
        model.resize_token_embeddings(max(ids) + 1, pad_to_multiple_of=64, mean_resizing=False)
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    matrices = [emb] if out is None or out.weight.data_ptr() == emb.data_ptr() else [emb, out.weight]
    bias = getattr(out, "bias", None)
    for row, entry in zip(ids, added, strict=True):
        source = base_ids(pieces(entry)) if how == "mean" else list(range(first))
        for w in matrices:
            if how == "random":
                w[row].normal_(0.0, model.config.initializer_range)
            else:
                w[row] = w[source].mean(0)
        if bias is not None:
            bias[row] = 0.0 if how == "random" else bias[source].mean()
    if bias is not None:  # padding rows no token maps to: as unlikely as the least likely real token
        bias[max(ids) + 1:] = bias[:first].min()


# ---------------------------------------------------------------------------------------------------


def run(p: AdaptTokenizerParams, paths: Paths) -> None:
    """Build the adapted tokenizer and the resized model, and the no-new-vocabulary ablation; report fertility."""
    with tracking.stage_run("adapt_tokenizer", p):
        # data: the training text streams from its shards, twice (tokenizer training, word counts)
        text_shards(paths.domain_train)  # a missing or empty folder fails here, before any model loads
        domain_valid = [d["text"] for d in read_jsonl(paths.domain_valid)]
        general_valid = [d["text"] for d in read_jsonl(paths.general_valid)]

        # tokenizer
        base = AutoTokenizer.from_pretrained(paths.base_model)
        new: list[dict] = []
        tok, added = base, []
        if p.max_new_tokens > 0:
            family(base)  # fails early, with what to do, on a family we cannot extend
            domain = base.train_new_from_iterator(iter_texts(paths.domain_train), vocab_size=p.domain_vocab_size)
            found = candidate_counts(domain, base, word_counts(base, itertools.chain.from_iterable(
                iter_texts(paths.domain_train))))
            new = rank_candidates(found, base_pieces(base), p.min_frequency, p.max_new_tokens)
            tok, added = extend(base, [r["token"] for r in new])

        # model: seeded, because a base without an MLM head gets a freshly initialised one here, and the
        # output must be the same bytes on every run or DVC retrains everything downstream
        set_seed(p.seed)
        model = AutoModelForMaskedLM.from_pretrained(paths.base_model)
        novocab = copy.deepcopy(model)  # the ablation: the same weights and head, with the base vocabulary
        resize_and_init(model, tok, added, base_pieces(base), base.convert_tokens_to_ids, p.init)

        # report (and its check, before anything is written)
        metrics: dict = {"base_vocab_size": len(base), "vocab_size": len(tok), "new_tokens": len(new),
                         "new_vocab_entries": len(added),  # BPE: the tokens and their merge chains' intermediates
                         "embedding_rows": model.get_input_embeddings().weight.shape[0]}
        for name, texts in (("domain", domain_valid), ("general", general_valid)):
            for when, t in (("before", base), ("after", tok)):
                for key, value in fertility(t, texts).items():
                    metrics[f"{name}_{key}_{when}"] = value
        if metrics["general_tokens_per_word_after"] > metrics["general_tokens_per_word_before"]:
            raise ValueError(
                f"adapt_tokenizer: the new vocabulary makes general text longer (tokens per word "
                f"{metrics['general_tokens_per_word_before']:.4f} -> {metrics['general_tokens_per_word_after']:.4f}); "
                f"lower adapt_tokenizer.max_new_tokens or raise adapt_tokenizer.min_frequency")

        # save
        with atomic_path(paths.init_dir("domain_novocab")) as tmp:
            novocab.save_pretrained(tmp)
            base.save_pretrained(tmp)
        with atomic_path(paths.init_dir("domain")) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        table = "token\tfrequency\tbase_pieces\ttokens_saved\n" + "".join(
            f"{r['token']}\t{r['frequency']}\t{r['base_pieces']}\t{r['tokens_saved']}\n" for r in new)
        write_text(paths.reports / "new_tokens.tsv", table)
        write_json(paths.metrics / "adapt_tokenizer.json", metrics)
        tracking.log_metrics(metrics)
        tracking.log_artifact(paths.reports / "new_tokens.tsv")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            tracking.log_artifact(paths.init_dir("domain") / name, artifact_path="tokenizer")
        log.info("adapt_tokenizer: %s", metrics)


def main() -> None:
    setup_stage()
    run(load_params("adapt_tokenizer", AdaptTokenizerParams), load_paths())


if __name__ == "__main__":
    main()
