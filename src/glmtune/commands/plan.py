"""glmtune plan: estimate the peak memory of a LoRA training run from the model's config.json alone (nothing is
loaded), print where it goes, whether it fits the device, and what to change if it does not."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from glmtune.arguments import ComputeArguments, LoraArguments, ModelArguments, SequenceLengthArguments
from glmtune.arguments.options import check_at_least_one, option
from glmtune.arguments.ptuning import PtuningArguments
from glmtune.config import parse_arguments
from glmtune.errors import UserError
from glmtune.plan.memory import DTYPE_BYTES, GIB, Estimate, Setup, estimate
from glmtune.plan.shape import ModelShape, resolve_targets, shape_from_config

logger = logging.getLogger(__name__)

QUANTIZATION_BITS = {8: "8bit", 4: "4bit"}  # --quantization_bit -> the estimate's name for it
# train's --precision defaults to auto, which it resolves on the hardware it finds; plan, which sees none, plans fp32
# unless told (auto's choice on a CPU without bf16 units).
PLAN_DEFAULTS: dict[str, Any] = {"precision": "fp32"}


@dataclass
class PlanArguments(PtuningArguments, ComputeArguments, LoraArguments, SequenceLengthArguments, ModelArguments):
    """train's options that decide the memory, declared where train takes them from, and plan's own. The
    TrainingArguments ones are mirrored here: importing TrainingArguments imports torch, which plan never needs."""

    help_overrides = {
        "model": "A local model directory or a cached hub name; only config.json is read.",
        "max_seq_length": "Tokens per sample (as `glmtune prepare`'s --max_seq_length).",
        "lora_dropout": "Dropout on the LoRA input (each adapted layer then keeps a copy).",
        "target_modules": "Comma-separated module names, or 'all-linear'. Default: glmtune train's choice for the "
                          "architecture.",
        "chunked_loss": "glmtune's chunked loss (default) rather than transformers' whole logits.",
        "precision": "Precision of the base weights and the computation, as glmtune train's --precision: fp32 (what "
                     "auto means on a CPU without bf16 units), bf16 or fp16; auto depends on the hardware, which "
                     "plan does not see.",
        "quantization_bit": "As glmtune train's: load the decoder's linear weights in 8 or 4 bits (bitsandbytes).",
    }

    per_device_train_batch_size: int = option("Samples per step and device.", default=8)
    gradient_accumulation_steps: int = option("Steps summed per update (no memory: kept in suggestions).", default=1)
    gradient_checkpointing: bool = option("Recompute activations in backward.", default=False)
    attn_implementation: Literal["sdpa", "eager"] = option("sdpa (transformers' default) or eager (keeps the score "
                                                           "matrix).", default="sdpa")
    device: Literal["cpu", "cuda"] | None = option("cpu or cuda. Default: cuda when nvidia-smi finds a GPU, else "
                                                   "cpu.")
    device_memory_gib: float | None = option("The memory to plan for, in GiB. Default: the GPU's total memory, or on "
                                             "CPU the memory available now.")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_at_least_one(self, "per_device_train_batch_size", "gradient_accumulation_steps")
        if self.device_memory_gib is not None and self.device_memory_gib <= 0:
            raise UserError(f"--device_memory_gib must be positive, got {self.device_memory_gib}")


def main(argv: list[str]) -> None:
    (args,) = parse_arguments("glmtune plan", [PlanArguments], argv, PLAN_DEFAULTS, description=__doc__)
    run(args)


def run(args: PlanArguments) -> Estimate:
    from glmtune.artifacts import read_json_object
    from glmtune.plan.device import default_device, device_memory
    from glmtune.registration import config_only

    with config_only():  # the family registry, without the Auto classes' registration that imports torch
        from glmtune.models.hub import resolve_model

    if not args.model:
        raise UserError("--model is required", hint="glmtune plan --model DIR_OR_HUB_NAME")
    if args.precision not in DTYPE_BYTES:  # auto: the shared option's default, when PlanArguments is built in Python
        raise UserError(f"--precision {args.precision}: plan estimates one precision, and auto's depends on the "
                        "hardware the run finds", hint=f"pass the one the run will use: {', '.join(DTYPE_BYTES)}")
    path = Path(resolve_model(args.model)) / "config.json"
    if not path.is_file():
        raise UserError(f"{args.model} has no config.json (looked for {path})",
                        hint="pass a model directory, or download the model's config.json into the hub cache")
    logger.debug(f"model shape read from {path}")
    shape = shape_from_config(read_json_object(path, "model config"), str(path))
    if args.train_router and not shape.moe_layers:  # as train refuses it (train/skeleton.check_moe_options)
        raise UserError(f"--train_router: {args.model} ({shape.model_type}) is not a mixture of experts",
                        hint="leave --train_router out")
    if args.finetuning_type in ("full", "freeze") and args.quantization_bit:  # as train refuses it (finetuning.py)
        raise UserError(f"--finetuning_type {args.finetuning_type} trains the model's own weights, which can't be "
                        "quantized", hint="leave --quantization_bit out, or plan LoRA on the quantized base")
    device = args.device or default_device()
    setup = Setup(args.max_seq_length, args.per_device_train_batch_size, args.lora_rank,
                  tuple(resolve_targets(shape, args.target_modules)), args.gradient_checkpointing, args.precision,
                  QUANTIZATION_BITS.get(args.quantization_bit), args.chunked_loss, args.lora_dropout,
                  args.attn_implementation, device, train_router=args.train_router,
                  finetuning_type=args.finetuning_type, trainable_layers=args.freeze_trainable_layers,
                  pre_seq_len=args.pre_seq_len, prefix_projection=args.prefix_projection)
    result = estimate(shape, setup)
    budget, where = device_memory(device, args.device_memory_gib)
    print(render(args.model, shape, setup, result, budget, where))
    if budget is not None and result.total > budget:
        print(render_suggestions(shape, setup, args.gradient_accumulation_steps, budget))
    return result


def render(model: str, shape: ModelShape, setup: Setup, result: Estimate, budget: float | None, where: str) -> str:
    targets = ",".join(t.name for t in setup.targets) + (" + the routers" if setup.train_router else "")
    active = (f", {result.active_parameters / 1e6:,.1f}M active per token"
              if shape.moe_layers and result.active_parameters else "")
    tuning = f"LoRA r{setup.lora_rank} on {targets}" if setup.finetuning_type == "lora" else {
        "full": "full tuning", "freeze": f"freeze tuning of {setup.trainable_layers} blocks",
        "ptuning": f"P-Tuning v2 prefix of {setup.pre_seq_len} tokens"
                   + (" (projected)" if setup.prefix_projection else "")}[setup.finetuning_type]
    head = [f"model: {model} ({shape.model_type}, {result.parameters / 1e6:,.1f}M parameters{active}; "
            f"{tuning}: {result.trainable_parameters / 1e6:,.2f}M trainable)",
            f"run: {setup.batch_size} x {setup.seq_len} tokens, {setup.dtype}"
            + (f", {setup.quantization} weights" if setup.quantization else "")
            + f", gradient checkpointing {'on' if setup.gradient_checkpointing else 'off'}, "
            f"{'chunked' if setup.chunked_loss else 'full-logits'} loss, {setup.attention}, {setup.device}", ""]
    width = max(map(len, result.lines))
    rows = [f"  {name:<{width}}  {value / GIB:9.2f} GiB" for name, value in result.lines.items()]
    rows += [f"  {'-' * width}  {'-' * 13}", f"  {'total (peak)':<{width}}  {result.total / GIB:9.2f} GiB"]
    if budget is None:
        tail = [f"device memory: {where}"]
    else:
        verdict = "fits" if result.total <= budget else "does not fit"
        tail = [f"  {'device memory':<{width}}  {budget / GIB:9.2f} GiB  ({where})", "",
                f"{verdict}: {result.total / GIB:.2f} GiB of {budget / GIB:.2f} GiB"]
    notes = [f"note: {n}" for n in shape.notes]
    if setup.device == "cpu":
        notes.append("note: MALLOC_MMAP_THRESHOLD_=1048576 in the environment removes the allocator slack (glibc "
                     "then returns freed activations to the system), at some speed cost")
    return "\n".join(head + ["peak memory estimate:"] + rows + tail + notes)


def suggestions(shape: ModelShape, setup: Setup, accumulation: int, budget: float) -> list[tuple[str, Setup]]:
    """Changes that lower the peak, in the order to try them, each on top of the ones before, until one fits.
    Batch and length are halved only as far as needed (never below 1 sample and 256 tokens)."""
    def fits(candidate: Setup) -> bool:
        return estimate(shape, candidate).total <= budget

    steps: list[tuple[str, Setup]] = []
    current = setup
    if not current.gradient_checkpointing:
        current = replace(current, gradient_checkpointing=True)
        steps.append(("--gradient_checkpointing true", current))
    if not fits(current) and current.batch_size > 1:
        batch = current.batch_size
        while batch > 1 and not fits(replace(current, batch_size=batch)):
            batch //= 2
        current = replace(current, batch_size=batch)
        keep = accumulation * setup.batch_size // batch  # the same samples per optimizer update
        steps.append((f"--per_device_train_batch_size {batch} --gradient_accumulation_steps {keep}", current))
    if not fits(current) and not current.chunked_loss:
        current = replace(current, chunked_loss=True)
        steps.append(("--chunked_loss true", current))
    if not fits(current) and current.seq_len > 256:
        seq = current.seq_len
        while seq > 256 and not fits(replace(current, seq_len=seq)):
            seq = max(256, seq // 2)
        current = replace(current, seq_len=seq)
        steps.append((f"--max_seq_length {seq} (prepare cuts or drops longer samples)", current))
    if not fits(current) and current.dtype == "fp32":
        current = replace(current, dtype="bf16")
        steps.append(("bf16 base weights and compute (--precision bf16)", current))
    for bits, name in QUANTIZATION_BITS.items():
        if not fits(current) and current.quantization != "4bit" and current.finetuning_type in ("lora", "ptuning"):
            quantized = replace(current, quantization=name, dtype="bf16" if current.dtype == "fp32" else current.dtype)
            # Not where it raises the peak: a MoE's fused experts, most of its weights, can't be quantized and are
            # then kept in fp32 (memory.weight_bytes).
            if estimate(shape, quantized).total < estimate(shape, current).total:
                current = quantized
                steps.append((f"{bits}-bit quantized weights (--quantization_bit {bits})", current))
    return steps


def render_suggestions(shape: ModelShape, setup: Setup, accumulation: int, budget: float) -> str:
    lines = ["", "to fit, in this order (each on top of the ones above):"]
    total = setup_total = estimate(shape, setup).total
    for change, changed in suggestions(shape, setup, accumulation, budget):
        total = estimate(shape, changed).total
        lines.append(f"  {change}: {total / GIB:.2f} GiB" + ("  <- fits" if total <= budget else ""))
    if total > budget or total == setup_total:
        lines.append("  still too big: use a smaller model or a device with more memory")
    return "\n".join(lines)
