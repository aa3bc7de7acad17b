"""Which precision a training run computes in, chosen from the hardware unless the user says.

bf16 halves the weights' memory and, on hardware with bf16 units (recent GPUs; CPUs with AMX or AVX512-BF16), runs
matmuls several times faster than fp32. On CPUs without them torch emulates bf16, which is slower than fp32
(measured on a 2-core AMD EPYC without AVX512: a 2048^2 matmul takes longer in bf16), so there auto means fp32.
GPUs without bf16 get fp16 with loss scaling, the seed's --fp16. The LoRA weights stay fp32 (peft keeps adapters
in fp32 over a 16-bit base) and so does the optimizer; the Trainer's autocast runs the compute in 16 bits.

GLMTUNE_CPU_BF16=0 or 1 says whether to treat the CPU as having bf16 units, whatever it has: a testing and diagnostic
knob (docs/install.md), so that the tests can run auto's CPU choices of both kinds of machine on either. Nothing else
reads it, and it never changes a GPU's choice.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from glmtune.errors import UserError

if TYPE_CHECKING:
    from transformers import TrainingArguments

CPU_BF16_OVERRIDE = "GLMTUNE_CPU_BF16"
ArgsT = TypeVar("ArgsT", bound="TrainingArguments")  # TrainingArguments, or a subclass such as TRL's DPOConfig


@dataclass(frozen=True)
class Hardware:
    cuda: bool
    bf16_units: str | None  # what has them ("the GPU", "the CPU (AMX)"...), or None


@dataclass(frozen=True)
class Precision:
    name: str  # "fp32", "bf16" or "fp16"
    reason: str

    def torch_dtype(self) -> Any:
        import torch

        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.name]


def detect_hardware() -> Hardware:
    import torch

    if torch.cuda.is_available():
        return Hardware(cuda=True, bf16_units="the GPU" if torch.cuda.is_bf16_supported() else None)
    override = os.environ.get(CPU_BF16_OVERRIDE, "")
    if override:
        if override not in ("0", "1"):
            raise UserError(f"{CPU_BF16_OVERRIDE}={override!r}: expected 0 or 1",
                            hint=f"unset {CPU_BF16_OVERRIDE} to detect the CPU's bf16 units")
        return Hardware(cuda=False, bf16_units=f"the CPU ({CPU_BF16_OVERRIDE}=1)" if override == "1" else None)
    if torch.cpu._is_amx_tile_supported():
        return Hardware(cuda=False, bf16_units="the CPU (AMX)")
    if torch.cpu._is_avx512_bf16_supported():
        return Hardware(cuda=False, bf16_units="the CPU (AVX512-BF16)")
    return Hardware(cuda=False, bf16_units=None)


def choose_precision(requested: str, bf16_flag: bool, fp16_flag: bool, hardware: Hardware) -> Precision:
    """`requested`: --precision; the flags: TrainingArguments' --bf16/--fp16 (the seed's --fp16), same meaning."""
    flagged = [name for name, on in (("bf16", bf16_flag), ("fp16", fp16_flag)) if on]
    if len(flagged) > 1 or (flagged and requested not in ("auto", flagged[0])):
        raise UserError(f"conflicting precisions: --precision {requested} with --{' --'.join(flagged)}",
                        hint="give one of them")
    name = flagged[0] if flagged else requested
    if name == "fp16" and not hardware.cuda:
        raise UserError("--fp16 needs a CUDA GPU and none is available",
                        hint="leave --fp16 out on CPU (auto picks bf16 where the CPU has bf16 units, else fp32)")
    if name != "auto":
        if name == "bf16" and not hardware.bf16_units:
            return Precision("bf16", "asked for; this hardware has no bf16 units, so it is emulated and slow")
        return Precision(name, "asked for")
    if hardware.bf16_units:
        return Precision("bf16", f"auto: {hardware.bf16_units} has bf16 units")
    if hardware.cuda:
        return Precision("fp16", "auto: the GPU has no bf16, fp16 with loss scaling")
    return Precision("fp32", "auto: this CPU has no bf16 units (bf16 would be emulated, slower than fp32)")


def apply_to_training_args(precision: Precision, training_args: ArgsT, hardware: Hardware) -> ArgsT:
    """TrainingArguments with the Trainer's mixed precision set to match (re-validated by its __post_init__).
    use_cpu without a GPU: transformers 5 accepts bf16 on CPU only with it, and only with it does a CPU run under
    torchrun join the process group (measured: world_size 1 in each of two torchrun processes without it)."""
    return dataclasses.replace(training_args, bf16=precision.name == "bf16", fp16=precision.name == "fp16",
                               use_cpu=training_args.use_cpu or not hardware.cuda)


# oneDNN keeps a primitive (with its generated code) for every matmul shape it meets, in two caches of 1,024 entries by
# default: its own and the one of ideep, torch's wrapper. bf16 matmuls on CPU go through them (fp32 ones through MKL),
# and a padding-free run meets a new token count at nearly every step, so a bf16 run's memory grew with every step
# (bench/train_speed.py's speed model, fresh batches: +22 MiB a step; one thread, 24 steps: 1,267 MiB peak against
# 967 MiB with both at 64). A step's shapes number about 30, so 64 entries keep the current step's and the last one's:
# measured no slower (0.998x, three interleaved processes each). A value the user set is kept.
ONEDNN_CACHE_ENTRIES = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64", "LRU_CACHE_CAPACITY": "64"}


def bound_onednn_caches() -> None:
    """Bound oneDNN's primitive caches (ONEDNN_CACHE_ENTRIES) in this process. Both are read when first used, by the
    first bf16 matmul: this must run before it (a process that has run one keeps its caches' size)."""
    for name, entries in ONEDNN_CACHE_ENTRIES.items():
        os.environ.setdefault(name, entries)
