"""Which model to load, in which precision, and which adapter on top of it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from glmtune.arguments.options import Options, option

SEED_MODEL = "THUDM/chatglm-6b"  # the seed scripts' model: their entry points default to it

Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)


@dataclass
class ModelNameArguments(Options):
    """Which model, alone: what convert reads; the commands that load a model take `ModelArguments`."""

    model: str | None = option("Name or path of the base model (a hub name or a local directory). Defaults to the "
                               "model the dataset or adapter was made with.")


@dataclass
class ModelArguments(ModelNameArguments):
    trust_remote_code: bool = option("Run the model repository's own Python code.", default=False)
    quantization_bit: Literal[4, 8] | None = option(
        "Load the base model's linear layers quantized with bitsandbytes: 8 (LLM.int8) or 4 (QLoRA: NF4, double "
        "quantization); LoRA and the optimizer stay fp32. On a CUDA GPU, or on CPU (slower than fp32 there). "
        "Leave it out for no quantization.")


@dataclass
class AdapterArguments(Options):
    """The LoRA adapter a command answers with, folds in (merge) or goes on training (dpo)."""

    peft_path: str | None = option("LoRA adapter directory: a `glmtune train` output or one of its checkpoint-* "
                                   "directories.")


@dataclass
class PrecisionArguments(Options):
    precision: Precision = option("Weights and compute in auto (bf16 where the GPU or CPU has bf16 units, fp16 on "
                                  "older GPUs, else fp32), fp32, bf16 or fp16 (CUDA only). The LoRA weights and the "
                                  "optimizer stay in fp32. --bf16/--fp16 mean the same as bf16/fp16 here.",
                                  default="auto")
