"""MLM training throughput: this project's step against the stock Transformers recipe, same model and data.

Training steps (forward, backward, AdamW), each timed in this one process on the same packed blocks:
- `ours`: `stages.pretrain`'s step (`dapt/pretraining/mlm.py`): `MaskingCollator`, the MLM head at masked positions
  only (`SparseMLM`, which gathers them at indices found on the CPU), SDPA attention; on a GPU also bf16
  autocast, TF32, fused AdamW, pinned batches and, as `pretrain.torch_compile` does, each encoder layer, the
  embeddings and the head with its loss compiled on their own (`dapt.pretraining.mlm.compile_regions`). On a GPU
  variants of it are timed too: `ours_bf16` (`pretrain.bf16_weights`: weights and activations in bf16 without autocast,
  AdamW on fp32 master copies of the weights, `dapt.pretraining.mlm.MasterWeightAdamW`), `ours_layers` (only the encoder
  layers compiled, `dapt.pretraining.mlm.compile_layers`),
  `ours_eager` (not compiled) and `ours_whole` (the whole model compiled, as `Trainer(torch_compile=True)` does);
- `stock`: `run_mlm.py`'s default: `DataCollatorForLanguageModeling` + `AutoModelForMaskedLM` computing
  full-vocabulary logits on packed blocks (same precision and attention as ours);
- `line_by_line`: `run_mlm.py --line_by_line`: one document per row, truncated and padded to the longest.
Throughput counts real (non-padding) tokens. MFU (GPU only) uses the model's FLOPs per token with the full
vocabulary projection at every position (6 x parameters + attention), so the stock recipe's MFU is directly
comparable with published BERT numbers; the sparse head does less work for the same tokens.

A correctness check comes first: on the same batch and weights, the sparse loss must equal the stock
full-vocabulary loss (`sparse_vs_full_loss_diff`), and every recipe's loss must fall over its timed steps. On a
GPU the compiled and eager steps start from the same weights and batch, so their first losses differ only by
dropout draws and bf16 rounding (`compiled_vs_eager_loss_diff`, a few 1e-3; a bug shows as far more).

Model: on CPU the demo base model (`models/general`: BERT, 6 layers) with a new MLM head; on a GPU a
BERT-base configuration with random weights (`--model` overrides either). Tokenizer: `--tokenizer`, default
`models/general`. Data: the blocks of `data/clean/domain_train` (`dvc repro clean` makes both), read from the
stage's token cache (`dapt.pretraining.blocks`, 🤗 datasets). Without `datasets` only torch, transformers and pyarrow
are imported besides `dapt/pretraining/mlm.py` (`benchmarks/corpus.py` packs the same blocks in memory), so the script
runs on a bare GPU image: carry the data folder and a copy of the tokenizer files (`tokenizer.json`,
`tokenizer_config.json`). Run:
`python benchmarks/mlm_throughput.py`; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import corpus  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForMaskedLM,
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    DataCollatorForLanguageModeling,
)

from dapt.pretraining.mlm import MaskingCollator, MasterWeightAdamW, SparseMLM, compile_layers, compile_regions  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}  # dense, per GPU


def build_model(name: str | None, cuda: bool, vocab_size: int, multiple: int = 1) -> torch.nn.Module:
    if cuda and not name:  # BERT-base, the configuration the published MFU numbers are for
        vocab_size = -(-vocab_size // multiple) * multiple  # NVIDIA's BERT pads 30522 to 30528
        return BertForMaskedLM(BertConfig(vocab_size=vocab_size, attn_implementation="sdpa"))
    return AutoModelForMaskedLM.from_pretrained(name or ROOT / "models" / "general", attn_implementation="sdpa")


def flops_per_token(model: torch.nn.Module, seq: int) -> float:
    """6 x the parameters that multiply (each token's vocabulary projection included) + attention's matmuls.

    Embedding tables are lookups, not matmuls, except the word embeddings' second life as the tied vocabulary
    projection. For BERT-base at length 128 this is 669 MFLOP per token, which puts the 322k tokens/s quoted for
    the stock recipe on an H100 at the 22% MFU quoted with it (we measured 297k-316k there: 20-21%).
    """
    c = model.config
    lookups = {id(p) for p in model.base_model.embeddings.parameters() if p.dim() == 2}
    params = sum(p.numel() for p in model.parameters() if id(p) not in lookups)
    projection = model.get_output_embeddings().weight
    if id(projection) in lookups:  # tied: counted above only as a lookup
        params += projection.numel()
    return 6 * params + 12 * c.num_hidden_layers * c.hidden_size * seq


def timed(step, batches: list[dict], warmup: int, device: torch.device) -> tuple[float, int, list[float]]:
    """Seconds for the batches after `warmup` ones, their real tokens, and the losses of all steps."""
    losses = [step(b) for b in batches[:warmup]]
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    tokens = 0
    for b in batches[warmup:]:
        losses.append(step(b))
        tokens += int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, tokens, [float(x) for x in losses]  # one sync per loss, after timing


def make_step(model: torch.nn.Module, sparse: bool, compiled: str | None, device: torch.device, cuda: bool,
              compile_mode: str | None = None, bf16_weights: bool = False):
    """One training step; `compiled`: None, "regions" (`compile_regions`), "layers" (`compile_layers`) or
    "whole". `bf16_weights`: the model's weights and activations in bf16 (no autocast), AdamW on fp32 master
    copies of the weights (`MasterWeightAdamW`, as `pretrain.bf16_weights` trains)."""
    module = SparseMLM(model) if sparse else model
    if compiled == "regions":
        compile_regions(module, mode=compile_mode)
    elif compiled == "layers":
        compile_layers(model, mode=compile_mode)
    optimizer = MasterWeightAdamW if bf16_weights else torch.optim.AdamW  # the former makes the weights bf16
    opt = optimizer(model.parameters(), lr=1e-4, fused=cuda if sparse else False)
    forward = torch.compile(module, mode=compile_mode) if compiled == "whole" else module

    def step(batch: dict) -> None:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda and not bf16_weights):
            out = forward(**batch)
        loss = out["loss"] if sparse else out.loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach().clone()  # CUDA-graph modes overwrite a step's outputs at the next replay

    return step


def profile(step, batches: list[dict]) -> None:
    """Device time of some steps by kind of kernel, then the heaviest kernels."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for b in batches:
            step(b)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if getattr(e, "self_device_time_total", 0) > 0]
    kinds = {"attention": ("flash", "fmha", "attention"),  # before matmul: memory-efficient attention is cutlass
             "matmul": ("gemm", "cutlass", "nvjet", "xmma", "cublas", "triton_tem_"),  # _tem_: max-autotune's
             "optimizer": ("adam", "foreach", "multi_tensor"), "fused (triton)": ("triton",)}
    total = sum(e.self_device_time_total for e in events)
    by_kind: dict[str, float] = {}
    for e in events:
        kind = next((k for k, keys in kinds.items() if any(x in e.key.lower() for x in keys)), "other")
        by_kind[kind] = by_kind.get(kind, 0) + e.self_device_time_total
    print(f"device time per step: {total / len(batches) / 1e3:.1f} ms; " + ", ".join(
        f"{k} {v / total:.0%}" for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])))
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:25]:
        print(f"{e.self_device_time_total / total:6.1%} {e.count // len(batches):4d}/step  {e.key[:110]}")


@torch.no_grad()
def loss_difference(model: torch.nn.Module, batch: dict, device: torch.device, cuda: bool) -> float:
    """|sparse loss - full-vocabulary loss| on one batch: the sparse head must change speed, not the loss."""
    batch = {k: v.to(device) for k, v in batch.items()}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["labels"]).loss.float()
        sparse = SparseMLM(model)(**batch)["loss"]
    return abs(float(full) - float(sparse))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a local model folder or hub name instead of the default")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the model's, else models/general)")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, help="default: 16 on CPU, 256 on a GPU")
    parser.add_argument("--steps", type=int, help="timed steps per recipe; default 30 on CPU (10 swing the ratio "
                                                  "by +-0.2 on a shared 2-core machine), 50 on a GPU")
    parser.add_argument("--compile-mode", help="torch.compile mode for ours (default: the default mode)")
    parser.add_argument("--recipes", help="comma-separated recipes to run (default: all; ours and stock always run)")
    parser.add_argument("--budget", type=float, default=float("inf"), metavar="S",
                        help="skip the optional recipes that would start S seconds after the first one")
    parser.add_argument("--pad-vocab", type=int, default=1, metavar="M",
                        help="on a GPU, round BERT-base's vocabulary up to a multiple of M")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="on a GPU, profile N more steps of each ours recipe and print where the device "
                             "time goes")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:  # what `stages.pretrain`'s TrainingArguments(tf32=True) sets
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    batch, steps, warmup = args.batch or (256 if cuda else 16), args.steps or (50 if cuda else 30), 10 if cuda else 2
    # (name, sparse head, compiled, data); compiled recipes compile during their warm-up steps
    recipes = [("stock", False, None, "stock"), ("ours", True, "regions" if cuda else None, "ours"),
               ("line_by_line", False, None, "lines")]
    if cuda:
        recipes += [("ours_bf16", True, "regions", "ours"), ("ours_layers", True, "layers", "ours"),
                    ("ours_eager", True, None, "ours"), ("ours_whole", True, "whole", "ours")]
    wanted = set(args.recipes.split(",")) | {"ours", "stock"} if args.recipes else {r[0] for r in recipes}
    if unknown := wanted - {r[0] for r in recipes}:
        sys.exit(f"--recipes: {', '.join(sorted(unknown))} unknown here; recipes on this {device.type}: "
                 f"{', '.join(r[0] for r in recipes)}")
    torch.manual_seed(0)

    tok = AutoTokenizer.from_pretrained(args.tokenizer or args.model or ROOT / "models" / "general")
    n = (warmup + steps) * batch
    blocks = corpus.blocks(tok, args.seq, n)  # read from the stage's token cache (dapt.pretraining.blocks)
    if len(blocks) < n:
        blocks = blocks.repeat((n + len(blocks) - 1) // len(blocks), 1)
    rows = [{"input_ids": b} for b in blocks[:n]]

    ours_collate = MaskingCollator(tok, 0.15, 0.8, 0.1)
    stock_collate = DataCollatorForLanguageModeling(tok, mlm_probability=0.15)

    def chunks(xs: list) -> list:
        return [xs[i:i + batch] for i in range(0, n, batch)]

    results, flops, losses = {}, None, {}
    torch.manual_seed(0)
    model = build_model(args.model, cuda, len(tok), args.pad_vocab).to(device).eval()
    check = ours_collate(rows[:batch])
    diff = loss_difference(model, {**check, "attention_mask": torch.ones_like(check["input_ids"])}, device, cuda)
    print(f"sparse vs full-vocabulary loss on one batch: |difference| = {diff:.2e}")
    del model
    pin = (lambda b: {k: v.pin_memory() for k, v in b.items()}) if cuda else (lambda b: b)
    data = {"ours": [pin(ours_collate(c)) for c in chunks(rows)],
            "stock": [pin(stock_collate(c)) for c in chunks(rows)]}
    if "line_by_line" in wanted:
        lines = [tok(t, truncation=True, max_length=args.seq)["input_ids"] for t in corpus.texts(n)]
        lines = (lines * (n // len(lines) + 1))[:n]  # a small corpus is repeated, as its blocks are
        data["lines"] = [pin(stock_collate([{"input_ids": x} for x in c])) for c in chunks(lines)]
    began = time.perf_counter()
    for name, sparse, compiled, key in recipes:
        if name not in wanted or (name not in ("ours", "stock") and time.perf_counter() - began > args.budget):
            continue
        torch.manual_seed(0)
        model = build_model(args.model, cuda, len(tok), args.pad_vocab).to(device).train()
        flops = flops_per_token(model, args.seq)
        step = make_step(model, sparse, compiled, device, cuda, args.compile_mode, name == "ours_bf16")
        start, graphs = time.perf_counter(), counters["stats"]["unique_graphs"]
        seconds, tokens, losses[name] = timed(step, data[key], warmup, device)
        results[name] = tokens / seconds
        print(f"{name:>16}: {tokens / seconds:10,.0f} real tokens/s ({tokens:,} tokens in {seconds:.1f} s, "
              f"{time.perf_counter() - start - seconds:.0f} s warm-up, "
              f"{counters['stats']['unique_graphs'] - graphs} graphs compiled); loss {losses[name][0]:.2f} -> "
              f"{losses[name][-1]:.2f}", flush=True)
        if name.startswith("ours") and cuda and args.profile:
            profile(step, data[key][-args.profile:])
        del model, step
        if cuda:
            torch.cuda.empty_cache()

    peak = next((v for k, v in PEAK_BF16.items() if cuda and k in torch.cuda.get_device_name()), None)
    mfu = {k: v * flops / peak for k, v in results.items()} if peak else None
    if mfu:
        print("MFU: " + ", ".join(f"{k} {v:.1%}" for k, v in mfu.items()))
    print(", ".join(f"ours / {k}: {results['ours'] / v:.2f}x" for k, v in results.items() if k != "ours"))

    def get(d: dict | None, k: str, digits: int = 0) -> float | None:
        return round(d[k], digits or None) if d and k in d else None

    print(json.dumps({
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "tokens_per_s": round(results["ours"]),
        "stock_tokens_per_s": round(results["stock"]),
        "line_by_line_tokens_per_s": get(results, "line_by_line"),
        "ratio_vs_stock": round(results["ours"] / results["stock"], 3),
        "mfu": get(mfu, "ours", 4),
        "stock_mfu": get(mfu, "stock", 4),
        **{f"{k}_tokens_per_s": round(v) for k, v in results.items() if k.startswith("ours_")},
        **{f"{k}_mfu": round(v, 4) for k, v in (mfu or {}).items() if k.startswith("ours_")},
        "compiled_vs_eager_loss_diff": abs(losses["ours"][0] - losses["ours_eager"][0]) if "ours_eager" in losses
        else None,  # ours_eager runs on a GPU only
        "batch": batch, "seq": args.seq,
        "sparse_vs_full_loss_diff": diff,
        "losses_fall": all(v[-1] < v[0] for v in losses.values()),
    }))

if __name__ == "__main__":
    main()
