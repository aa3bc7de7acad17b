"""What one glmtune training step is made of: torch.profiler over a few steps of a real `glmtune train` run.

Run through bench/train_speed.py --profile (the speed scenario's model and data). The run is glmtune's own
(`glmtune.cli.main(["train", ...])`); a callback starts the profiler after WARMUP steps and stops it after STEPS
more, so the figures include the optimizer, the callbacks and the Trainer's own Python.

Each aten operator's self time goes to one bucket: the base model's matmuls (forward and backward), LoRA's small
products (an operand with the adapter's rank as a dimension), attention (the sdpa kernels and their backward), the
loss (the output layer's products under the loss, softmax), the optimizer (inside `Optimizer.step`), other
operators (elementwise, norms, copies, casts). Step wall time not spent inside any operator is Python and dispatch
overhead (the Trainer, peft's wrappers, autograd's bookkeeping).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

WARMUP = 2
STEPS = 2
MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_mkldnn_linear", "aten::mkldnn_linear",
           "aten::_addmm_activation"}
ATTENTION = ("scaled_dot_product", "flash_attention")
LOSS = ("logsumexp", "log_softmax", "nll_loss", "cross_entropy", "gather", "_FrozenOutputLayerCrossEntropy")


def profile_glmtune_steps(train_args: list[str], lora_rank: int, vocab_size: int) -> dict[str, Any]:
    """Profile steps WARMUP+1..WARMUP+STEPS of `glmtune train train_args`; the share of step time per bucket."""
    import torch
    from transformers import TrainerCallback

    import glmtune.train.sft as sft
    from glmtune.cli import main

    state: dict[str, Any] = {}

    class ProfileSteps(TrainerCallback):
        def on_step_begin(self, args: Any, trainer_state: Any, control: Any, **kwargs: Any) -> None:
            if trainer_state.global_step == WARMUP:
                state["profiler"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                           record_shapes=True)
                state["profiler"].__enter__()
                state["start"] = time.perf_counter()

        def on_step_end(self, args: Any, trainer_state: Any, control: Any, **kwargs: Any) -> None:
            if trainer_state.global_step == WARMUP + STEPS and "profiler" in state:
                state["wall"] = time.perf_counter() - state["start"]
                state["profiler"].__exit__(None, None, None)
                control.should_training_stop = True

    build = sft.build_trainer

    def build_with_profiler(*args: Any, **kwargs: Any) -> Any:
        trainer = build(*args, **kwargs)
        trainer.add_callback(ProfileSteps())
        return trainer

    sft.build_trainer = build_with_profiler
    try:
        assert main(["train", *train_args]) == 0
    finally:
        sft.build_trainer = build
    return {"wall_per_step": state["wall"] / STEPS, "top": top_operators(state["profiler"].events()),
            **_buckets(state["profiler"].events(), state["wall"], lora_rank, vocab_size)}


def _buckets(events: Any, wall: float, lora_rank: int, vocab_size: int) -> dict[str, Any]:
    """Self time of each aten operator, by bucket, as fractions of the profiled wall time."""
    spans = {name: [] for name in ("optimizer", "loss")}
    for e in events:
        if e.name.startswith("Optimizer.step"):
            spans["optimizer"].append((e.time_range.start, e.time_range.end))
        elif "FrozenOutputLayerCrossEntropy" in e.name or e.name.startswith("aten::cross_entropy"):
            spans["loss"].append((e.time_range.start, e.time_range.end))
    seconds: dict[str, float] = defaultdict(float)
    launches: dict[str, int] = defaultdict(int)
    for e in events:
        if not e.name.startswith("aten::") or e.self_cpu_time_total <= 0:
            continue
        bucket = _bucket(e, spans, lora_rank, vocab_size)
        seconds[bucket] += e.self_cpu_time_total / 1e6
        launches[bucket] += 1
    seconds["Python and dispatch (outside operators)"] = max(0.0, wall - sum(seconds.values()))
    return {"share": {k: v / wall for k, v in sorted(seconds.items(), key=lambda kv: -kv[1])},
            "operators_per_step": {k: v // STEPS for k, v in launches.items()}}


def _inside(e: Any, spans: list[tuple[int, int]]) -> bool:
    return any(start <= e.time_range.start <= end for start, end in spans)


def _bucket(e: Any, spans: dict[str, list[tuple[int, int]]], lora_rank: int, vocab_size: int) -> str:
    if _inside(e, spans["optimizer"]):
        return "optimizer (AdamW)"
    name = e.name
    if any(a in name for a in ATTENTION):
        return "attention (per-sample sdpa, fwd+bwd)"
    shapes = [s for s in (e.input_shapes or []) if s]
    if name in MATMULS:
        if any(vocab_size in s for s in shapes):
            return "loss: output layer products"
        if any(lora_rank in s for s in shapes):
            return "LoRA products (rank-r matmuls)"
        return "base matmuls (fwd + input grads)"
    if _inside(e, spans["loss"]) or any(k in name for k in LOSS):
        return "loss: softmax and the rest"
    if name in ("aten::copy_", "aten::_to_copy", "aten::to"):
        return "copies and dtype casts"
    return "other operators (elementwise, norms, rope, cat/split)"


def print_profile(label: str, profile: dict[str, Any]) -> None:
    print(f"\n{label}: {profile['wall_per_step'] * 1000:.0f} ms/step (profiled, {STEPS} steps after {WARMUP})")
    print("| part of the step | share | operators per step |")
    print("|---|---|---|")
    for bucket, share in profile["share"].items():
        print(f"| {bucket} | {share:.1%} | {profile['operators_per_step'].get(bucket, '-')} |")


def save(path: Path, profiles: dict[str, Any]) -> None:
    path.write_text(json.dumps(profiles, indent=1))


def top_operators(events: Any, n: int = 25) -> list[tuple[str, float, int]]:
    """The operators with the most self time: (name, seconds, calls)."""
    seconds: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for e in events:
        seconds[e.name] += e.self_cpu_time_total / 1e6
        calls[e.name] += 1
    return sorted(((k, seconds[k], calls[k]) for k in seconds), key=lambda t: -t[1])[:n]
