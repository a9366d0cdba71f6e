"""adapt_tokenizer: extend the base tokenizer with domain vocabulary and initialise the new embeddings.

1. Train a tokenizer of the base model's family on the clean domain training text (`tokenizers`, via
   `train_new_from_iterator`) and take its whole-word tokens that the base vocabulary lacks.
2. Rank them by the tokens they save on the domain corpus (frequency x pieces saved) and keep the best
   `max_new_tokens` seen at least `min_frequency` times.
3. Append them to the WordPiece vocabulary itself (not `add_tokens`, whose added tokens match inside other
   words and ignore `##` continuation rules), so every existing id keeps its id.
4. Resize the MLM model's embeddings (tied decoder and its bias follow) and initialise each new row from the
   base embeddings of the pieces the base tokenizer splits the token into (FVT-style mean).

Writes the model + tokenizer to `paths.domain_init`, tokens-per-word before/after to the metrics.

Run: `dvc repro adapt_tokenizer` (or `python -m stages.adapt_tokenizer`).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from typing import Literal

import mlflow
import torch
from pydantic import Field
from tokenizers import Tokenizer
from tqdm.auto import tqdm
from transformers import AutoModelForMaskedLM, AutoTokenizer, PreTrainedTokenizerBase, set_seed

from stages import tracking
from stages.common import Paths, Section, atomic_path, load_params, load_paths, log, read_jsonl, \
    setup_logging, write_json, write_text


class AdaptTokenizerParams(Section):
    max_new_tokens: int = Field(ge=0)
    min_frequency: int = Field(ge=1)
    domain_vocab_size: int = Field(ge=100)
    init: Literal["mean", "mean_all", "random"] = "mean"
    seed: int = 0


# ---------------------------------------------------------------------------------------------------
# pure helpers


def model_type(tok: PreTrainedTokenizerBase) -> str:
    """The `tokenizers` model behind a fast tokenizer: WordPiece, BPE, Unigram..."""
    return json.loads(tok.backend_tokenizer.to_str())["model"]["type"]


def word_counts(tok: PreTrainedTokenizerBase, texts: Sequence[str]) -> Counter:
    """Words as the tokenizer itself sees them (after its normaliser and pre-tokenizer)."""
    backend = tok.backend_tokenizer
    counts: Counter = Counter()
    for text in tqdm(texts, desc="counting words", unit="doc", mininterval=2, disable=len(texts) < 1000):
        norm = backend.normalizer.normalize_str(text) if backend.normalizer else text
        counts.update(w for w, _ in backend.pre_tokenizer.pre_tokenize_str(norm))
    return counts


def rank_candidates(candidates: Sequence[str], base: PreTrainedTokenizerBase, counts: Counter,
                    min_frequency: int, max_new: int) -> list[dict]:
    """Whole-word candidates ranked by tokens saved on the corpus: frequency x (base pieces - 1)."""
    ranked = []
    for token in candidates:
        freq = counts.get(token, 0)
        if freq < min_frequency:
            continue
        pieces = len(base.tokenize(token))
        if pieces > 1:
            ranked.append({"token": token, "frequency": freq, "base_pieces": pieces,
                           "tokens_saved": freq * (pieces - 1)})
    ranked.sort(key=lambda r: (-r["tokens_saved"], r["token"]))
    return ranked[:max_new]


def extend_wordpiece(tok: PreTrainedTokenizerBase, new_tokens: Sequence[str]) -> PreTrainedTokenizerBase:
    """A copy of a WordPiece tokenizer with `new_tokens` appended to its vocabulary (ids after all others)."""
    spec = json.loads(tok.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    next_id = max([*vocab.values(), *(t["id"] for t in spec.get("added_tokens", []))]) + 1
    for token in new_tokens:
        if token in vocab:
            raise ValueError(f"token {token!r} is already in the vocabulary")
        vocab[token] = next_id
        next_id += 1
    extended = type(tok)(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), **tok.init_kwargs)
    return extended


def fertility(tok: PreTrainedTokenizerBase, texts: Sequence[str]) -> dict[str, float]:
    """Tokens per word and the share of words split into 3 or more pieces."""
    pieces: list[int] = []
    for enc in tok.backend_tokenizer.encode_batch(list(texts), add_special_tokens=False):
        pieces.extend(Counter(w for w in enc.word_ids if w is not None).values())
    if not pieces:
        return {"tokens_per_word": 0.0, "split_3plus": 0.0}
    return {"tokens_per_word": sum(pieces) / len(pieces), "split_3plus": sum(p >= 3 for p in pieces) / len(pieces)}


@torch.no_grad()
def init_new_rows(model: torch.nn.Module, base: PreTrainedTokenizerBase, new_tokens: Sequence[str],
                  first_id: int, how: str) -> None:
    """Initialise embedding rows (and the MLM output bias) of the new tokens."""
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    bias = getattr(out, "bias", None)
    old = emb[:first_id]
    for i, token in enumerate(new_tokens):
        row = first_id + i
        if how == "mean":
            ids = base(token, add_special_tokens=False)["input_ids"]
            emb[row] = old[ids].mean(0)
            if bias is not None:
                bias[row] = bias[ids].mean()
        elif how == "mean_all":
            emb[row] = old.mean(0)
            if bias is not None:
                bias[row] = bias[:first_id].mean()
        else:
            emb[row].normal_(0.0, model.config.initializer_range)
            if bias is not None:
                bias[row] = 0.0


# ---------------------------------------------------------------------------------------------------


def run(p: AdaptTokenizerParams, paths: Paths) -> None:
    """Build the adapted tokenizer and the resized model; report fertility before and after."""
    with tracking.stage_run("adapt_tokenizer", p):
        # data
        train_texts = [d["text"] for d in read_jsonl(paths.domain_train)]
        domain_valid = [d["text"] for d in read_jsonl(paths.domain_valid)]
        general_valid = [d["text"] for d in read_jsonl(paths.general_valid)]

        # tokenizer
        base = AutoTokenizer.from_pretrained(paths.base_model)
        new: list[dict] = []
        tok = base
        if p.max_new_tokens > 0:
            kind = model_type(base)
            if kind != "WordPiece":
                raise ValueError(f"adapt_tokenizer: vocabulary extension supports WordPiece (BERT family) "
                                 f"tokenizers; {paths.base_model} uses {kind}. "
                                 f"Set adapt_tokenizer.max_new_tokens: 0 to keep its vocabulary.")
            domain_tok = base.train_new_from_iterator(train_texts, vocab_size=p.domain_vocab_size)
            base_vocab = base.get_vocab()
            prefix = json.loads(base.backend_tokenizer.to_str())["model"]["continuing_subword_prefix"]
            candidates = sorted(t for t in domain_tok.get_vocab()
                                if t not in base_vocab and not t.startswith(prefix) and t.isalpha())
            new = rank_candidates(candidates, base, word_counts(base, train_texts), p.min_frequency,
                                  p.max_new_tokens)
            tok = extend_wordpiece(base, [r["token"] for r in new])

        # model: seeded, because a base without an MLM head gets a freshly initialised one here, and the
        # output must be the same bytes on every run or DVC retrains everything downstream
        set_seed(p.seed)
        model = AutoModelForMaskedLM.from_pretrained(paths.base_model)
        first_id = len(base)
        if len(tok) > model.get_input_embeddings().weight.shape[0]:
            # a multiple of 64 keeps the embedding and output matmuls on fast kernel shapes
            model.resize_token_embeddings(len(tok), pad_to_multiple_of=64, mean_resizing=False)
        init_new_rows(model, base, [r["token"] for r in new], first_id, p.init)

        # report
        metrics: dict = {"base_vocab_size": len(base), "vocab_size": len(tok), "new_tokens": len(new),
                         "embedding_rows": model.get_input_embeddings().weight.shape[0]}
        for name, texts in (("domain", domain_valid), ("general", general_valid)):
            for when, t in (("before", base), ("after", tok)):
                for key, value in fertility(t, texts).items():
                    metrics[f"{name}_{key}_{when}"] = value

        # save
        with atomic_path(paths.domain_init) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        table = "token\tfrequency\tbase_pieces\ttokens_saved\n" + "".join(
            f"{r['token']}\t{r['frequency']}\t{r['base_pieces']}\t{r['tokens_saved']}\n" for r in new)
        write_text(paths.reports / "new_tokens.tsv", table)
        write_json(paths.metrics / "adapt_tokenizer.json", metrics)
        tracking.log_metrics(metrics)
        mlflow.log_artifact(str(paths.reports / "new_tokens.tsv"))
        for name in ("tokenizer.json", "tokenizer_config.json"):
            mlflow.log_artifact(str(paths.domain_init / name), artifact_path="tokenizer")
        log.info("adapt_tokenizer: %s", metrics)


def main() -> None:
    setup_logging()
    run(load_params("adapt_tokenizer", AdaptTokenizerParams), load_paths())


if __name__ == "__main__":
    main()
