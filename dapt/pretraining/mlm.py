"""The masked-language-model recipe as plain PyTorch pieces, shared by `stages.pretrain` and the benchmark.

Packing documents into full blocks, BERT's masking (token or whole-word, dynamic, reproducible per block),
and the MLM loss computed at the masked positions only. No Trainer, MLflow or files: each piece is testable
on its own and runs wherever torch and transformers do.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, Trainer, TrainerCallback, TrainingArguments

# ---------------------------------------------------------------------------------------------------
# data: documents packed into full blocks


def pack(tok: PreTrainedTokenizerBase, texts: Sequence[str], block: int) -> torch.Tensor:
    """[CLS] + `block - 1` tokens per row, documents joined by [SEP]; the ragged tail is dropped."""
    cls_id = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
    sep_id = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
    stream: list[int] = []
    chunk = 1000  # documents per tokenizer call: batched for speed, small enough for a live progress bar
    for start in tqdm(range(0, len(texts), chunk), desc="tokenising", unit="kdoc", disable=len(texts) <= chunk):
        for ids in tok(list(texts[start:start + chunk]), add_special_tokens=False)["input_ids"]:
            stream.extend(ids)
            stream.append(sep_id)
    body = block - 1
    n = len(stream) // body
    if n == 0:
        raise ValueError(f"pretrain: {len(stream)} tokens are not enough for one block of {block}")
    rows = torch.tensor(stream[: n * body], dtype=torch.long).view(n, body)
    return torch.cat([torch.full((n, 1), cls_id, dtype=torch.long), rows], dim=1)



class Blocks(torch.utils.data.Dataset):
    """Packed blocks, each handed out with a masking seed drawn from (seed, epoch, index).

    Dynamic masking without the global RNG: a block gets new masks every epoch, and a run resumed from a
    checkpoint draws exactly the masks the uninterrupted run would have (the Trainer restores its RNG state
    only after the first resumed batch has been collated). `EpochSetter` keeps `epoch` current.
    """

    def __init__(self, blocks: torch.Tensor, seed: int):
        self.blocks, self.seed, self.epoch = blocks, seed, 0

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.blocks[i], "mask_seed": ((self.seed * 1_000_003 + self.epoch) * 2_147_483_647 + i)
                % 2**63}


class EpochSetter(TrainerCallback):
    def __init__(self, dataset: Blocks):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.epoch = math.floor(state.epoch + 1e-9)  # a resumed run re-enters its epoch mid-way
        return control



# ---------------------------------------------------------------------------------------------------
# masking


def word_starts(tok: PreTrainedTokenizerBase) -> tuple[torch.Tensor, torch.Tensor]:
    """Two tables over vocabulary ids: does the token begin a word, and does a word begin after it?

    WordPiece marks continuations ("##ing"); byte-level BPE marks a word after a space ("Ġword"), and a word
    after a line break or at a document's start has no mark: the token after a newline ("Ċ") or a special token
    begins one too. Special tokens and line breaks are words of their own (and specials are never masked).
    """
    vocab = tok.get_vocab()
    starts = torch.zeros(max(vocab.values()) + 1, dtype=torch.bool)
    breaks = torch.zeros_like(starts)
    prefix = getattr(tok.backend_tokenizer.model, "continuing_subword_prefix", None)
    for token, i in vocab.items():
        starts[i] = not token.startswith(prefix) if prefix else token.startswith(("Ġ", "Ċ"))
        breaks[i] = not prefix and token.endswith("Ċ")
    starts[tok.all_special_ids] = breaks[tok.all_special_ids] = True
    return starts, breaks


def word_begins(input_ids: torch.Tensor, starts: torch.Tensor, breaks: torch.Tensor) -> torch.Tensor:
    """Where words begin in a batch of blocks, from the two tables of `word_starts`."""
    begins = starts[input_ids]
    begins[:, 1:] |= breaks[input_ids[:, :-1]]
    return begins


class MaskingCollator:
    """BERT's masking recipe on packed blocks, drawn afresh on every call (dynamic masking).

    Each token that is not special (with `whole_word`: each word) is selected with `mlm_probability`; of the
    selected, `mask_replace_prob` become [MASK], `random_replace_prob` a random token, the rest stay. Only the
    selected positions get labels. Written here rather than taken from `DataCollatorForLanguageModeling`, which
    draws random replacements from the whole vocabulary, special tokens included, and whose whole-word option
    needs character offsets that packed blocks no longer have.
    """

    def __init__(self, tok: PreTrainedTokenizerBase, mlm_probability: float, mask_replace_prob: float,
                 random_replace_prob: float, whole_word: bool = False, seed: int | None = None):
        self.p, self.mask_p, self.random_p = mlm_probability, mask_replace_prob, random_replace_prob
        self.mask_id = tok.mask_token_id
        ids = torch.tensor(sorted(set(tok.get_vocab().values())))
        specials = torch.tensor(sorted(set(tok.all_special_ids)))
        self.real_ids = ids[~torch.isin(ids, specials)]  # what a random replacement may be
        self.special = torch.zeros(int(ids.max()) + 1, dtype=torch.bool)
        self.special[specials] = True
        self.words = word_starts(tok) if whole_word else None
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None  # else torch's own

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        input_ids = torch.stack([r["input_ids"] for r in rows])
        if "mask_seed" in rows[0]:  # per-block seeds (see `Blocks`)
            u = torch.stack([torch.rand((3, input_ids.shape[1]),
                                        generator=torch.Generator().manual_seed(r["mask_seed"])) for r in rows], dim=1)
        else:
            u = torch.rand((3, *input_ids.shape), generator=self.generator)
        draw, how, pick = u
        if self.words is not None:  # every token of a word takes the draw of the word's first token
            position = torch.arange(input_ids.shape[1]).expand_as(input_ids)
            first = torch.where(word_begins(input_ids, *self.words), position, 0).cummax(-1).values
            draw = draw.gather(-1, first)
        selected = (draw < self.p) & ~self.special[input_ids]
        labels = torch.where(selected, input_ids, -100)
        masked = selected & (how < self.mask_p)
        randomised = selected & (how >= self.mask_p) & (how < self.mask_p + self.random_p)
        random_ids = self.real_ids[(pick * len(self.real_ids)).long().clamp(max=len(self.real_ids) - 1)]
        input_ids = torch.where(masked, self.mask_id, torch.where(randomised, random_ids, input_ids))
        # found here on the CPU, so the model gathers them without waiting on the GPU (see `SparseMLM`)
        return {"input_ids": input_ids, "labels": labels, "masked_positions": selected.flatten().nonzero().squeeze(1)}



def fixed_eval_batches(blocks: torch.Tensor, collator, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Mask the validation blocks once, so every evaluation scores the same positions."""
    rows = [{"input_ids": b} for b in blocks]
    return [collator(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]



# ---------------------------------------------------------------------------------------------------
# model: the MLM head at masked positions only


def head_path(model: torch.nn.Module) -> tuple[str, ...]:
    """Names of the modules that map hidden states to vocabulary logits, applied in turn."""
    for attr in ("cls", "lm_head"):  # BERT, RoBERTa
        if hasattr(model, attr):
            return (attr,)
    if hasattr(model, "head") and hasattr(model, "decoder"):  # ModernBERT: transform, then projection
        return ("head", "decoder")
    raise ValueError(f"pretrain: no MLM head found on {type(model).__name__}")


def mlm_head(model: torch.nn.Module) -> torch.nn.Module:
    """The module mapping hidden states to vocabulary logits, for the families we support."""
    modules = [getattr(model, name) for name in head_path(model)]
    return modules[0] if len(modules) == 1 else torch.nn.Sequential(*modules)


def own_head_parameters(model: torch.nn.Module) -> set[int]:
    """Ids of the head's own weights, not those it shares with the encoder (tied embeddings): what the head
    warm-up trains."""
    return {id(w) for w in mlm_head(model).parameters()} - {id(w) for w in model.base_model.parameters()}


class SparseMLM(torch.nn.Module):
    """Wraps an `...ForMaskedLM` model; the vocabulary projection runs only where labels are set.

    Being the module the Trainer trains (rather than a `compute_loss` override), it stays correct under
    DDP, where only the wrapped module's forward synchronises gradients. `masked_positions` (flat indices of
    the labelled positions, from `MaskingCollator`) lets it gather them without finding them on the device: a
    boolean index there waits for the GPU every step and breaks a `torch.compile` graph in two. They index the
    whole batch, so the batch must not be split further (`nn.DataParallel`): `stages.pretrain` runs one process
    per GPU.
    """

    def __init__(self, mlm: torch.nn.Module):
        super().__init__()
        self.mlm = mlm
        self.head_path = head_path(mlm)  # looked up on every call: a resized model gets new modules
        # tied tensors (input embeddings = output layer) after their first name: the Trainer's checkpoints
        # (safetensors) refuse shared memory, and on loading it re-ties what these names leave out
        seen, self._keys_to_ignore_on_save = set(), []
        for key, t in super().state_dict().items():
            where = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
            if where in seen:
                self._keys_to_ignore_on_save.append(key)
            seen.add(where)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                masked_positions: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        hidden = self.mlm.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if masked_positions is None:
            masked_positions = (labels != -100).flatten().nonzero().squeeze(1)
        loss, correct = self.predict(hidden, labels, masked_positions)
        # the count is made on the device: a tensor copied from the host would wait for it
        n = masked_positions.new_full((), masked_positions.shape[0])
        return {"loss": loss / n.clamp(min=1), "loss_sum": loss.detach(), "correct": correct, "count": n}

    def predict(self, hidden: torch.Tensor, labels: torch.Tensor,
                masked_positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed cross-entropy and correct predictions at the masked positions (`compile_regions` compiles it)."""
        target = labels.flatten().index_select(0, masked_positions)
        logits = hidden.flatten(0, 1).index_select(0, masked_positions)
        for name in self.head_path:
            logits = getattr(self.mlm, name)(logits)
        return F.cross_entropy(logits.float(), target, reduction="sum"), (logits.argmax(-1) == target).sum()

    def __getstate__(self) -> dict:
        """A copy or pickle drops the compiled `predict` (it is bound to this instance), as `nn.Module` drops
        what `.compile()` adds: the copy runs the method eager, on its own weights."""
        state = super().__getstate__()
        state.pop("predict", None)
        return state

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        state = super().state_dict(*args, **kwargs)
        for key in self._keys_to_ignore_on_save:
            state.pop(key, None)
        return state

    def tie_weights(self) -> None:
        self.mlm.tie_weights()


# ---------------------------------------------------------------------------------------------------
# bf16 weights, trained on fp32 master copies


class MasterWeightAdamW(torch.optim.AdamW):
    """AdamW on fp32 master copies of weights that the model itself holds in bf16 (`pretrain.bf16_weights`), as
    Megatron-LM trains in bf16.

    Made from the model's fp32 parameters (as the Trainer makes its optimiser, when training starts), it keeps
    fp32 copies of them and turns the parameters themselves to bf16. From then on the forward and backward run in
    bf16 without autocast: layer norms, residual sums and dropout write half the bytes. Each step is AdamW on the
    fp32 copies with the bf16 gradients, rounded back into the model, so updates smaller than a bf16 weight's
    precision still add up. `state_dict` carries the copies: a run resumed from a checkpoint continues from them,
    not from their rounding. `full_precision` puts them in the model to evaluate or save it.
    """

    def __init__(self, params, **kwargs):
        groups = list(params)
        groups = [{**g, "params": list(g["params"])} for g in groups] if isinstance(groups[0], dict) \
            else [{"params": groups}]
        self.model_params = [p for g in groups for p in g["params"]]
        super().__init__([{**g, "params": [p.detach().to(torch.float32, copy=True) for p in g["params"]]}
                          for g in groups], **kwargs)
        self.masters = [m for g in self.param_groups for m in g["params"]]
        for p in self.model_params:
            p.data = p.data.to(torch.bfloat16)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        pairs = [(p, m) for p, m in zip(self.model_params, self.masters, strict=True) if p.grad is not None]
        for p, m in zip(self.model_params, self.masters, strict=True):
            if p.grad is None:  # AdamW leaves a weight without a gradient alone
                m.grad = None
            elif m.grad is None:
                m.grad = torch.empty_like(m)
        if pairs:  # one kernel per list, not one per tensor
            torch._foreach_copy_([m.grad for _, m in pairs], [p.grad for p, _ in pairs])
            super().step()
            torch._foreach_copy_([p for p, _ in pairs], [m for _, m in pairs])
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The model's gradients; the masters' are scratch space that every step overwrites."""
        for p in self.model_params:
            if p.grad is not None:
                p.grad = None if set_to_none else p.grad.zero_()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "master_weights": self.masters}

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        masters = state_dict.pop("master_weights")
        super().load_state_dict(state_dict)
        with torch.no_grad():
            for p, m, saved in zip(self.model_params, self.masters, masters, strict=True):
                m.copy_(saved)
                p.copy_(m)


def master_weights(args: TrainingArguments) -> tuple[type, dict]:
    """For `Trainer(optimizer_cls_and_kwargs=...)`: the AdamW the Trainer would make from `args` (fused on a GPU),
    on fp32 master copies of bf16 weights (`MasterWeightAdamW`, made when training starts: an evaluation before it
    sees fp32 weights)."""
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    assert cls is torch.optim.AdamW, cls  # what `optim="adamw_torch"` and `"adamw_torch_fused"` give
    return MasterWeightAdamW, kwargs


class TrainerSettings(Protocol):
    """What `training_args` reads of its settings: `stages.pretrain.PretrainParams` has them (this library does not
    import the stage that uses it), and so does the benchmarks' namespace."""

    batch_size: int
    weight_decay: float
    save_steps: int
    dataloader_workers: int


def training_args(p: TrainerSettings, out: Path, lr: float, steps: int, warmup: float, seed: int,
                  save: bool, autocast: bool = True) -> TrainingArguments:
    """`stages.pretrain`'s Trainer settings, shared by its two phases and by `benchmarks/bf16_weights_learning.py`;
    bf16 autocast (unless the weights are bf16 themselves), fused AdamW and pinned memory where there is a GPU."""
    cuda = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=p.batch_size, learning_rate=lr,
        weight_decay=p.weight_decay, warmup_steps=int(warmup * steps), lr_scheduler_type="linear",
        logging_steps=10, eval_strategy="no", report_to="none", seed=seed,
        save_strategy="steps" if save else "no", save_steps=p.save_steps,
        save_total_limit=2,  # the Trainer drops the older one before `on_save` completes the newer
        bf16=autocast and cuda and torch.cuda.is_bf16_supported(), tf32=cuda or None,
        use_cpu=not cuda,  # also what makes several CPU processes (gloo) one distributed run
        optim="adamw_torch_fused" if cuda else "adamw_torch",  # torch_compile: compile_regions, in main
        dataloader_drop_last=True, dataloader_pin_memory=cuda, dataloader_num_workers=p.dataloader_workers,
        remove_unused_columns=False, disable_tqdm=False,
        logging_nan_inf_filter=False,  # its check reads every step's loss on the host: a GPU sync per step
        ddp_find_unused_parameters=False,  # every parameter gets a gradient: skip DDP's search for unused ones
    )


@contextlib.contextmanager
def full_precision(optimizer: torch.optim.Optimizer | None) -> Iterator[None]:
    """Inside, the parameters a `MasterWeightAdamW` trains are its fp32 master weights (they share their memory):
    evaluate or save the model as trained, not its bf16 rounding. Any other optimiser: nothing changes."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the Trainer's
    if not isinstance(optimizer, MasterWeightAdamW):
        yield
        return
    low = [p.data for p in optimizer.model_params]
    for p, m in zip(optimizer.model_params, optimizer.masters, strict=True):
        p.data = m
    try:
        yield
    finally:
        for p, data in zip(optimizer.model_params, low, strict=True):
            p.data = data


def encoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The stack of transformer layers of a BERT, RoBERTa or ModernBERT model (bare or `...ForMaskedLM`)."""
    base = getattr(model, "base_model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        layers = getattr(getattr(base, "encoder", None), "layer", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"pretrain: no encoder layers found on {type(model).__name__}")
    return layers


def compile_regions(model: SparseMLM, **options) -> None:
    """Regional compilation (`pretrain.torch_compile`): each encoder layer, the embeddings, and the MLM head
    with its gather and loss, each compiled in place (`options` go to `torch.compile`: `mode`, `backend`).

    The layers share their code, so the compiler builds a graph per kind of layer (one for BERT, three for
    ModernBERT's first, global and local-attention layers) and reuses it for the others: seconds to compile
    instead of the minute or more the whole model takes (`Trainer(torch_compile=True)`), and a faster step.
    The head's graph takes any number of masked positions (`dynamic`); the head warm-up, with the encoder
    frozen, gets graphs of its own. Not for CUDA-graph modes (`reduce-overhead`), which record a graph per
    input size. BERT-base, batch 256, `benchmarks/mlm_throughput.py`, same runs: on an H100 595k real tokens/s
    against 571k with the layers alone; on an H200 641k against 607k. The state dict keeps its names (no
    `_orig_mod.` prefix in checkpoints). `evaluate` runs eager.
    """
    compile_layers(model.mlm, **options)
    model.mlm.base_model.embeddings.compile(**options)
    model.predict = torch.compile(model.predict, **{"dynamic": True, **options})


def compile_layers(model: torch.nn.Module, **options) -> None:
    """Each encoder layer compiled in place (the largest part of `compile_regions`)."""
    for layer in encoder_layers(model):
        layer.compile(**options)


@torch.no_grad()
@torch.compiler.set_stance("force_eager")
def evaluate(model: SparseMLM, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Token-weighted MLM loss, perplexity and masked-token accuracy on fixed batches.

    Eager even when the model is compiled (`compile_regions`): evaluation graphs (eval mode, no grad, a smaller
    last batch) would count against the compiler's limit of 8 versions per function, which ModernBERT's three
    kinds of layer reach, and a smaller batch would make the training graphs shape-generic. On a GPU in bf16
    autocast, whether the weights are fp32 or bf16, so the first evaluation (before the Trainer, which adds its
    own autocast) and the later ones compute alike.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss = correct = count = 0.0
    for batch in batches:
        with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda" and torch.cuda.is_bf16_supported()):
            out = model(**{k: v.to(device) for k, v in batch.items()})
        loss += out["loss_sum"].item()
        correct += out["correct"].item()
        count += out["count"].item()
    model.train(was_training)
    mean = loss / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50)), "accuracy": correct / max(count, 1)}

