"""Does `pretrain.bf16_weights` learn as bf16 autocast does? Two runs of the same training, compared.

The same model (same initial weights) is trained twice through the Transformers `Trainer` on the same blocks with
the same masks, set up as `stages.pretrain` sets up its DAPT phase: once as the stage trains by default (fp32
weights, bf16 autocast on a GPU), once with `bf16_weights` (weights and activations in bf16, AdamW on fp32 master
copies: `dapt.pretraining.mlm.MasterWeightAdamW`). Every `--eval-every` steps both are scored on the same fixed
validation batches (held-out blocks of the same corpus), with the master weights in the model
(`dapt.pretraining.mlm.full_precision`), as the stage scores them. Dropout and rounding make the two runs drift
apart a little; a broken update (masters not updated, gradients lost, the schedule not applied) shows as curves that
part or a loss that does not fall.

The benchmark (`mlm_throughput.py`, recipe `ours_bf16`) measures what the variant gains in speed; this measures
whether it still learns the same, over more steps than the benchmark's 60. Model and data as there: on a GPU a
BERT-base configuration with random weights (its vocabulary padded to a multiple of 64), on the CPU the demo base
model (`models/general`) with a new MLM head; `--model` overrides either. Data: `data/clean/domain_train`
(`benchmarks/corpus.py`).
Only torch and transformers are imported besides `dapt/pretraining/mlm.py`, so it runs on a bare GPU image; carry the
data file and the tokenizer files of `models/general`. Run: `python benchmarks/bf16_weights_learning.py`; the last line
is JSON (`max_rel_diff`: the largest relative difference of the two validation losses after the first
evaluation).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import corpus
import torch
import yaml
from mlm_throughput import ROOT, build_model  # this folder: the benchmark's model and the project root on sys.path
from transformers import AutoTokenizer, Trainer, TrainerCallback

from dapt.pretraining.mlm import (
    Blocks,
    EpochSetter,
    MaskingCollator,
    SparseMLM,
    compile_regions,
    evaluate,
    fixed_eval_batches,
    full_precision,
    master_weights,
    training_args,
)


class Scores(TrainerCallback):
    """Validation loss every `every` steps and at the end, on the weights as trained."""

    def __init__(self, batches: list[dict], every: int):
        self.batches, self.every, self.losses = batches, every, []

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step >= state.max_steps:
            with full_precision(optimizer):
                self.losses.append(round(evaluate(model, self.batches)["loss"], 4))
        return control


def train(args, p: dict, tok, blocks: torch.Tensor, eval_batches: list[dict], bf16_weights: bool, out: Path) -> dict:
    """One run; `p`: params.yaml's `pretrain` section."""
    cuda = torch.cuda.is_available()
    torch.manual_seed(0)  # the same initial weights for both runs
    model = SparseMLM(build_model(args.model, cuda, len(tok), 64).to("cuda" if cuda else "cpu"))
    if cuda:  # as `pretrain.torch_compile: true`
        compile_regions(model)
    pretrain = SimpleNamespace(**{**p, "batch_size": args.batch})  # the DAPT phase's settings, this batch size
    targs = training_args(pretrain, out, args.lr or p["learning_rate"], args.steps, p["warmup_ratio"], seed=1,
                          save=False, autocast=not bf16_weights)
    scores = Scores(eval_batches, args.eval_every)
    scores.losses.append(round(evaluate(model, eval_batches)["loss"], 4))
    dataset = Blocks(blocks, seed=1)
    trainer = Trainer(model=model, args=targs, train_dataset=dataset,
                      data_collator=MaskingCollator(tok, 0.15, 0.8, 0.1), callbacks=[EpochSetter(dataset), scores],
                      optimizer_cls_and_kwargs=master_weights(targs) if bf16_weights else None)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start  # compiling and the evaluations included: a rough rate
    weights = {w.dtype for w in model.parameters()}
    name = "bf16_weights" if bf16_weights else "autocast"
    print(f"{name:>13}: validation loss {' '.join(f'{x:.3f}' for x in scores.losses)} ({seconds:.0f} s, weights "
          f"{', '.join(str(d) for d in weights)})", flush=True)
    return {"losses": scores.losses, "seconds": seconds}


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a local model folder or hub name instead of the default")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the model's, else models/general)")
    parser.add_argument("--steps", type=int, default=1000 if cuda else 30)
    parser.add_argument("--batch", type=int, default=256 if cuda else 8)
    parser.add_argument("--eval-every", type=int, default=100 if cuda else 10)
    parser.add_argument("--eval-blocks", type=int, default=1024 if cuda else 32)
    parser.add_argument("--lr", type=float, help="default: pretrain.learning_rate in params.yaml")
    args = parser.parse_args()

    tok = AutoTokenizer.from_pretrained(args.tokenizer or args.model or ROOT / "models" / "general")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    blocks = corpus.blocks(tok, 128)
    held_out, blocks = blocks[-args.eval_blocks:], blocks[:-args.eval_blocks]
    eval_batches = fixed_eval_batches(held_out, MaskingCollator(tok, 0.15, 0.8, 0.1, seed=0), args.batch)
    print(f"{len(blocks):,} training blocks, {len(held_out):,} validation blocks; {args.steps} steps of "
          f"{args.batch} x 128 (about {args.steps * args.batch / len(blocks):.1f} epochs)", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        runs = {name: train(args, params["pretrain"], tok, blocks, eval_batches, name == "bf16_weights",
                           Path(tmp) / name)
                for name in ("autocast", "bf16_weights")}
    a, b = runs["autocast"]["losses"], runs["bf16_weights"]["losses"]
    rel = [abs(x - y) / x for x, y in zip(a[1:], b[1:])]
    print(f"relative difference of the validation losses: largest {max(rel):.4f}, last {rel[-1]:.4f}")
    print(json.dumps({
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "steps": args.steps, "batch": args.batch, "eval_every": args.eval_every,
        "autocast_valid_loss": a, "bf16_weights_valid_loss": b,
        "max_rel_diff": round(max(rel), 4), "last_rel_diff": round(rel[-1], 4),
        "autocast_seconds": round(runs["autocast"]["seconds"], 1),
        "bf16_weights_seconds": round(runs["bf16_weights"]["seconds"], 1),
        "losses_fall": all(x[-1] < x[0] for x in (a, b)),
    }))


if __name__ == "__main__":
    main()
