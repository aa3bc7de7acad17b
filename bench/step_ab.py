"""Interleaved A/B of training-step variants in one process, on the speed scenario's model and batches.

Each variant is a model set up one way (LoRA as peft computes it, or fused; fp32 or bf16). Rounds go through every
variant in turn on the same batches (forward, chunked loss, backward, AdamW step), so a loaded machine's slow spells
hit all of them alike; the table gives each variant's median seconds per step and its ratio to the first variant.

    .venv/bin/python bench/step_ab.py [--rounds 5] [--batches 4] [--variants peft-fp32,fused-fp32,...]
        [--threads 1 --clock cpu] [--fresh]

Variants: {peft,fused}-{fp32,bf16}, optionally +compile (torch.compile of the model, its compile time reported
apart), +attn16 (bf16 attention for every sample, not fp32 for the short ones: train/packed_attention.py's
CPU_FP32_ATTENTION_BELOW set to 0) and +onepassloss (the loss as before the frozen output layer was always chunked:
one autograd pass of cross-entropy over the whole batch's logits). Builds the speed scenario's inputs in a temporary
folder (bench/train_speed.py's build_speed_inputs). --fresh gives every round batches not seen before, as an epoch
does: each new token count costs oneDNN a new primitive for every bf16 matmul shape (its creation is part of a real
epoch's steps, and repeating the same batches would hide it).
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]


def make_variant(model_dir: Path, name: str) -> tuple[Any, Any, bool]:
    """(model, optimizer, autocast) for a variant name such as fused-bf16 or peft-fp32+compile."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from glmtune.train.fused_lora import fuse_lora_linears
    from glmtune.train.packed_attention import use_packed_sdpa

    kind, precision = name.split("+")[0].split("-")
    unknown = set(name.split("+")[1:]) - {"compile", "attn16", "onepassloss"}
    if unknown:
        raise SystemExit(f"unknown variant option {unknown} in {name}")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, {"fp32": "float32",
                                                                                       "bf16": "bfloat16"}[precision]))
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    use_packed_sdpa(model)
    if kind == "fused":
        fuse_lora_linears(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    return model, optimizer, precision == "bf16"


CLOCK = time.perf_counter
DEFAULT_FP32_BELOW = 256  # train/packed_attention.py's CPU_FP32_ATTENTION_BELOW, read again in main()


def step(model: Any, optimizer: Any, autocast: bool, batch: dict[str, Any], compiled: Any = None,
         fp32_attention_below: int = DEFAULT_FP32_BELOW, one_pass_loss: bool = False) -> float:
    import torch

    from glmtune.train import packed_attention
    from glmtune.train.loss import chunked_causal_lm_loss

    packed_attention.CPU_FP32_ATTENTION_BELOW = fp32_attention_below
    start = CLOCK()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        outputs = (model if compiled is None else compiled)(**inputs, output_hidden_states=True, logits_to_keep=1)
    output_layer = model.get_output_embeddings()
    if one_pass_loss:
        output_layer = copy.copy(output_layer)
        output_layer.__class__ = _one_pass_linear()
    loss = chunked_causal_lm_loss(outputs.hidden_states[-1], output_layer, batch["labels"])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return CLOCK() - start


@functools.cache
def _one_pass_linear() -> type:
    """A torch.nn.Linear subclass: not a plain nn.Linear, so chunked_causal_lm_loss gives it the budget rule's one
    pass over the whole batch (a trained layer's path, a frozen one's before it was always chunked)."""
    import torch

    return type("OnePassLinear", (torch.nn.Linear,), {})


def batches(data_dir: Path, count: int, size: int = 8) -> list[dict[str, Any]]:
    from datasets import load_from_disk

    from glmtune.train.batching import OneRowCollator

    train = load_from_disk(str(data_dir))["train"]
    collate = OneRowCollator()
    return [collate([train[i] for i in range(b * size, (b + 1) * size)]) for b in range(count)]


def _batch_flops(model_dir: Path, batch: dict[str, Any]) -> float:
    import json

    from glmtune.train.flops import ModelShape, lora_step_flops

    starts = batch["cu_seq_lens_q"].tolist()
    lengths = [b - a for a, b in zip(starts[:-1], starts[1:], strict=True)]
    supervised = int((batch["labels"] != -100).sum())
    shape = ModelShape.from_config(json.loads((model_dir / "config.json").read_text()))
    return lora_step_flops(shape, sum(lengths), supervised, sum(n * n for n in lengths), 8, TARGETS)


def _matmul_rate(precision: str, n: int = 1024) -> float:
    """FLOP/s of a square matmul in this precision, timed with the same clock and threads as the steps."""
    import torch

    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(5):
        start = CLOCK()
        a @ b
        best = min(best, CLOCK() - start)
    return 2 * n**3 / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=4, help="batches of 8 rows per round")
    parser.add_argument("--variants", default="peft-fp32,fused-fp32,peft-bf16,fused-bf16")
    parser.add_argument("--hidden_size", type=int, default=384)
    parser.add_argument("--num_layers", type=int, default=6)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--fresh", action="store_true",
                        help="new batches every round (rounds x batches in all), as an epoch meets them")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: the process's CPU time, with --threads 1 the measure least moved by other "
                             "tenants of a loaded machine (no thread waits for a descheduled partner)")
    args = parser.parse_args()
    import torch

    global CLOCK, DEFAULT_FP32_BELOW
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    from glmtune.train.packed_attention import CPU_FP32_ATTENTION_BELOW

    DEFAULT_FP32_BELOW = CPU_FP32_ATTENTION_BELOW
    if args.threads:
        torch.set_num_threads(args.threads)
    from train_speed import build_speed_inputs

    with tempfile.TemporaryDirectory(prefix="glmtune-ab-") as tmp:
        rounds_of_batches = args.rounds if args.fresh else 1
        rows = 8 * (args.batches * rounds_of_batches + 1)
        model_dir, data_dir = build_speed_inputs(Path(tmp), max(256, rows), args.hidden_size, args.num_layers)
        every = batches(data_dir, args.batches * rounds_of_batches + 1)
        warm, work = every[-1], every[:-1]
        names = args.variants.split(",")
        runs = {}
        for name in names:
            model, optimizer, autocast = make_variant(model_dir, name)
            below = 0 if "+attn16" in name else DEFAULT_FP32_BELOW
            one_pass = "+onepassloss" in name
            compiled = None
            if "+compile" in name:
                compiled = torch.compile(model)
                start = time.perf_counter()
                for batch in work:  # every shape once: the compile time, apart
                    step(model, optimizer, autocast, batch, compiled, below, one_pass)
                print(f"{name}: compile and first pass {time.perf_counter() - start:.1f} s")
            step(model, optimizer, autocast, warm, compiled, below, one_pass)  # warm-up
            runs[name] = (model, optimizer, autocast, compiled, below, one_pass)
        times: dict[str, list[float]] = {name: [] for name in names}
        for i in range(args.rounds):
            round_batches = work[i * args.batches:(i + 1) * args.batches] if args.fresh else work
            for name in names:
                model, optimizer, autocast, compiled, below, one_pass = runs[name]
                times[name].append(sum(step(model, optimizer, autocast, b, compiled, below, one_pass)
                                       for b in round_batches) / len(round_batches))
        flops = sum(_batch_flops(model_dir, b) for b in work) / len(work)
    peaks = {precision: _matmul_rate(precision) for precision in ("fp32", "bf16")}
    load = os.getloadavg()[0]
    print(f"\nload average at the end: {load:.1f} ({os.cpu_count()} cores); {args.rounds} rounds x {args.batches} "
          f"batches{' (new every round)' if args.fresh else ''}, torch threads {torch.get_num_threads()}, "
          f"{args.clock} clock")
    print(f"matmul rate, same threads and clock: fp32 {peaks['fp32'] / 1e9:.0f}, "
          f"bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s; "
          f"{flops / 1e9:.1f} GFLOP per step (glmtune.train.flops)")
    print("| variant | median s/step | each round | vs the first | MFU |")
    print("|---|---|---|---|---|")
    first = statistics.median(times[names[0]])
    for name in names:
        median = statistics.median(times[name])
        peak = peaks["bf16" if "bf16" in name else "fp32"]
        print(f"| {name} | {median:.3f} | {', '.join(f'{t:.3f}' for t in times[name])} | {first / median:.2f}x | "
              f"{flops / median / peak:.1%} |")
    for a, b in zip(names[::2], names[1::2], strict=False):  # pairwise ratios, round by round
        ratios = [x / y for x, y in zip(times[a], times[b], strict=True)]
        print(f"{b} vs {a}: {statistics.median(ratios):.2f}x faster (median of per-round ratios "
              f"{', '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
    main()
