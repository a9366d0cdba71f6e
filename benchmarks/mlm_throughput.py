"""MLM training throughput: this project's step against the stock Transformers recipe, same model and data.

Three training steps (forward, backward, AdamW), each timed in this one process on the same packed blocks:
- `ours`: `stages.pretrain`'s step (`stages/mlm.py`): `MaskingCollator`, the MLM head at masked positions
  only (`SparseMLM`), SDPA attention; on a GPU also bf16 autocast, fused AdamW and `torch.compile`;
- `stock`: `run_mlm.py`'s default: `DataCollatorForLanguageModeling` + `AutoModelForMaskedLM` computing
  full-vocabulary logits on packed blocks (same precision and attention as ours);
- `line_by_line`: `run_mlm.py --line_by_line`: one document per row, truncated and padded to the longest.
Throughput counts real (non-padding) tokens. MFU (GPU only) uses the model's FLOPs per token with the full
vocabulary projection at every position (6 x parameters + attention), so the stock recipe's MFU is directly
comparable with published BERT numbers; the sparse head does less work for the same tokens.

A correctness check comes first: on the same batch and weights, the sparse loss must equal the stock
full-vocabulary loss (`sparse_vs_full_loss_diff`), and every recipe's loss must fall over its timed steps.

Model: on CPU the demo base model (`models/general`: BERT, 6 layers) with a new MLM head; on a GPU a
BERT-base configuration with random weights (`--model` overrides either). Tokenizer: `--tokenizer`, default
`models/general`. Data: `data/clean/domain_train.jsonl` (`dvc repro clean` makes both). Only torch and
transformers are imported besides `stages/mlm.py`, so the script runs on a bare GPU image: carry the data file
and a copy of the tokenizer files (`tokenizer.json`, `tokenizer_config.json`). Run:
`python benchmarks/mlm_throughput.py`; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402
from transformers import AutoModelForMaskedLM, AutoTokenizer, BertConfig, BertForMaskedLM, \
    DataCollatorForLanguageModeling  # noqa: E402

from stages.mlm import MaskingCollator, SparseMLM, pack  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}  # dense, per GPU


def build_model(name: str | None, cuda: bool, vocab_size: int) -> torch.nn.Module:
    if cuda and not name:  # BERT-base, the configuration the published MFU numbers are for
        return BertForMaskedLM(BertConfig(vocab_size=vocab_size, attn_implementation="sdpa"))
    return AutoModelForMaskedLM.from_pretrained(name or ROOT / "models" / "general", attn_implementation="sdpa")


def flops_per_token(model: torch.nn.Module, seq: int) -> float:
    """6 x parameters (each token's vocabulary projection included) + attention scores and values."""
    c = model.config
    params = sum(p.numel() for p in model.parameters()) + c.vocab_size * c.hidden_size  # the untied-equivalent head
    params -= (c.max_position_embeddings + c.type_vocab_size) * c.hidden_size  # lookups, not matmuls
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


def make_step(model: torch.nn.Module, sparse: bool, device: torch.device, cuda: bool):
    module = SparseMLM(model) if sparse else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda if sparse else False)
    forward = torch.compile(module) if sparse and cuda else module

    def step(batch: dict) -> None:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            out = forward(**batch)
        loss = out["loss"] if sparse else out.loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


@torch.no_grad()
def loss_difference(model: torch.nn.Module, batch: dict, device: torch.device, cuda: bool) -> float:
    """|sparse loss - full-vocabulary loss| on one batch: the sparse head must change speed, not the loss."""
    batch = {k: v.to(device) for k, v in batch.items()}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        full = model(**batch).loss.float()
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
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    batch, steps, warmup = args.batch or (256 if cuda else 16), args.steps or (50 if cuda else 30), 10 if cuda else 2
    torch.manual_seed(0)

    tok = AutoTokenizer.from_pretrained(args.tokenizer or args.model or ROOT / "models" / "general")
    train = ROOT / yaml.safe_load((ROOT / "params.yaml").read_text())["paths"]["domain_train"]
    if not train.exists():
        sys.exit(f"{train}: missing; run `dvc repro clean` first")
    texts = [json.loads(line)["text"] for line in train.open(encoding="utf-8")]
    n = (warmup + steps) * batch
    blocks = pack(tok, texts[: 4 * n], args.seq)
    if len(blocks) < n:
        blocks = blocks.repeat((n + len(blocks) - 1) // len(blocks), 1)
    rows = [{"input_ids": b} for b in blocks[:n]]

    ours_collate = MaskingCollator(tok, 0.15, 0.8, 0.1)
    stock_collate = DataCollatorForLanguageModeling(tok, mlm_probability=0.15)
    lines = [tok(t, truncation=True, max_length=args.seq)["input_ids"] for t in texts[:n]]
    chunks = lambda xs: [xs[i:i + batch] for i in range(0, n, batch)]  # noqa: E731
    results, flops, losses = {}, None, {}
    torch.manual_seed(0)
    model = build_model(args.model, cuda, len(tok)).to(device).eval()
    check = ours_collate(rows[:batch])
    diff = loss_difference(model, {**check, "attention_mask": torch.ones_like(check["input_ids"])}, device, cuda)
    print(f"sparse vs full-vocabulary loss on one batch: |difference| = {diff:.2e}")
    del model
    for name, sparse, data in (
        ("ours", True, [ours_collate(c) for c in chunks(rows)]),
        ("stock", False, [stock_collate(c) for c in chunks(rows)]),
        ("line_by_line", False, [stock_collate([{"input_ids": x} for x in c]) for c in chunks(lines)]),
    ):
        torch.manual_seed(0)
        model = build_model(args.model, cuda, len(tok)).to(device).train()
        flops = flops_per_token(model, args.seq)
        seconds, tokens, losses[name] = timed(make_step(model, sparse, device, cuda), data, warmup, device)
        results[name] = tokens / seconds
        print(f"{name:>13}: {tokens / seconds:10,.0f} real tokens/s ({tokens:,} tokens in {seconds:.1f} s); "
              f"loss {losses[name][0]:.2f} -> {losses[name][-1]:.2f}", flush=True)
        del model
        if cuda:
            torch.cuda.empty_cache()

    peak = next((v for k, v in PEAK_BF16.items() if cuda and k in torch.cuda.get_device_name()), None)
    mfu = {k: v * flops / peak for k, v in results.items()} if peak else None
    if mfu:
        print("MFU: " + ", ".join(f"{k} {v:.1%}" for k, v in mfu.items()))
    print(f"ours / stock: {results['ours'] / results['stock']:.2f}x; ours / line-by-line: "
          f"{results['ours'] / results['line_by_line']:.2f}x")
    print(json.dumps({
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "tokens_per_s": round(results["ours"]),
        "stock_tokens_per_s": round(results["stock"]),
        "line_by_line_tokens_per_s": round(results["line_by_line"]),
        "ratio_vs_stock": round(results["ours"] / results["stock"], 3),
        "ratio_vs_line_by_line": round(results["ours"] / results["line_by_line"], 3),
        "mfu": round(mfu["ours"], 4) if mfu else None,
        "stock_mfu": round(mfu["stock"], 4) if mfu else None,
        "batch": batch, "seq": args.seq,
        "sparse_vs_full_loss_diff": diff,
        "losses_fall": all(v[-1] < v[0] for v in losses.values()),
    }))


if __name__ == "__main__":
    main()
