"""Quantized base models through bitsandbytes: `--quantization_bit 8` (LLM.int8) and `--quantization_bit 4` (QLoRA:
NF4 with double quantization). transformers' bitsandbytes integration does the loading; this module adds what it
lacks: a clear error when bitsandbytes has no backend for the device (before anything is loaded), the layers that
can't be quantized left in full precision, and a 4-bit model that an evaluation can't break (see
`keep_training_layout`).

What is quantized: the decoder's linear layers. Embeddings, norms and the output layer (transformers' default
skips) stay in the load precision; peft's `prepare_model_for_kbit_training` then casts those to fp32 for training.
"""

from __future__ import annotations

import logging
from typing import Any

from glmtune.errors import UserError

logger = logging.getLogger(__name__)

QUANTIZATION_BITS = (4, 8)
# bitsandbytes' 4-bit block: a quantized layer's input size must be a multiple of it. Its CPU backend reshapes the
# per-block scales to (out_features, in_features / 64) when it repacks the weights for inference
# (`_convert_weight_packed_for_cpu`), which fails otherwise ("shape '[128, 4]' is invalid for input of size 576"
# for 288 inputs); CUDA has no such limit, but the same run must give the same model on every machine.
BLOCK_4BIT = 64


def check_backend(bits: int) -> str:
    """The device bitsandbytes will quantize on ("cuda" or "cpu"), or a UserError when it can't, raised before
    anything is loaded (transformers would fail later, with a traceback)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    off = f"leave --quantization_bit out to load the model in {'its precision' if device == 'cuda' else 'fp32'}"
    try:
        import bitsandbytes as bnb
        from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib
    except Exception as e:  # ImportError, or a broken install failing at import (it loads a native library)
        raise UserError(f"--quantization_bit {bits} needs bitsandbytes, which does not import here "
                        f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})",
                        hint=f"pip install bitsandbytes==0.50.2 (see requirements.txt), or {off}") from None
    supported = getattr(bnb, "supported_torch_devices", set())  # bitsandbytes < 0.45 knew CUDA only
    # A GPU needs bitsandbytes' compiled CUDA library; on a CPU its torch fallbacks run without the native one.
    no_library = device == "cuda" and isinstance(lib, ErrorHandlerMockBNBNativeLibrary)
    if device not in supported or no_library:
        where = "this GPU" if device == "cuda" else "the CPU (no GPU is visible)"
        raise UserError(f"--quantization_bit {bits}: bitsandbytes {getattr(bnb, '__version__', '?')} has no backend "
                        f"for {where}" + (" (its CUDA library did not load)" if no_library else ""),
                        hint=f"install bitsandbytes >= 0.48 (CPU and CUDA backends), or {off}")
    return device


def bnb_config(bits: int, source: str, compute_dtype: Any, trust_remote_code: bool = False) -> Any:
    """transformers' BitsAndBytesConfig for `bits`, with the layers that can't be quantized left out (printed)."""
    import torch
    from transformers import BitsAndBytesConfig
    from transformers.quantizers.base import get_keys_to_not_convert

    model = _meta_model(source, trust_remote_code)
    # transformers' own skips (the output layer, tied weights): passing llm_int8_skip_modules replaces them.
    skip = sorted(get_keys_to_not_convert(model))
    if bits == 8:
        _say_once("bitsandbytes.autograd._functions", "MatMul8bitLt: inputs will be cast")
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    odd = unquantizable_linears(model)
    if odd:
        logger.info(f"4-bit: {len(odd)} linear layer(s) left in full precision, their input size is not a multiple "
                    f"of {BLOCK_4BIT} (LoRA still adapts them): " + _summarize(odd))
    # The compute dtype is the training precision's: bf16 where the hardware has bf16 units, fp32 on CPUs without
    # them, where bf16 is emulated (measured on a 2-core EPYC without AVX512, tiny model: 4-bit steps in bf16
    # compute were slower than in fp32; see bench/quantization_gpu_check.py).
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype or torch.float32,
                              llm_int8_skip_modules=skip + sorted(odd))


def _say_once(logger_name: str, prefix: str) -> None:
    """bitsandbytes logs the same warning on every 8-bit matmul of an evaluation or generation (LLM.int8 rounds
    the inputs to fp16): a few hundred lines per evaluation of a tiny model. Let the first one through."""
    import logging

    logger = logging.getLogger(logger_name)
    if any(isinstance(f, _Once) and f.prefix == prefix for f in logger.filters):
        return
    logger.addFilter(_Once(prefix))


class _Once:
    def __init__(self, prefix: str):
        self.prefix, self.seen = prefix, False

    def filter(self, record: Any) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        first, self.seen = not self.seen, True
        return first


def device_map() -> dict[str, Any]:
    """Where from_pretrained puts the quantized model: this process's GPU (one per process under torchrun), or
    the CPU."""
    import torch

    if not torch.cuda.is_available():
        return {"": "cpu"}
    from accelerate import PartialState

    return {"": PartialState().local_process_index}


def refuse_converted_layout(bits: int, source: str, family: str) -> UserError:
    """THUDM's ChatGLM checkpoints are converted in memory by glmtune, outside from_pretrained, which is where
    transformers quantizes; converting them once on disk gives a directory that quantizes like any other."""
    return UserError(f"--quantization_bit {bits}: {source} is a {family} checkpoint in THUDM's layout, which glmtune "
                     "converts while loading, and quantization happens inside transformers' loading",
                     hint=f"convert it once: `glmtune convert {source} CONVERTED_DIR`, then pass "
                          f"--model CONVERTED_DIR --quantization_bit {bits}")


def _meta_model(source: str, trust_remote_code: bool) -> Any:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    with torch.device("meta"):  # shapes only: no memory, no weights read
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def unquantizable_linears(model: Any) -> dict[str, int]:
    """Linear layers whose input size is not a multiple of the 4-bit block: full name -> in_features."""
    import torch

    return {name: module.in_features for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module.in_features % BLOCK_4BIT}


def _summarize(layers: dict[str, int]) -> str:
    """'down_proj (288 inputs) in 4 layers' rather than 4 full names."""
    groups: dict[tuple[str, int], int] = {}
    for name, size in layers.items():
        key = (name.rsplit(".", 1)[-1], size)
        groups[key] = groups.get(key, 0) + 1
    return ", ".join(f"{leaf} ({size} inputs)" + (f" in {n} layers" if n > 1 else "")
                     for (leaf, size), n in sorted(groups.items()))


def prepare_for_training(model: Any, gradient_checkpointing: bool,
                         gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> Any:
    """peft's k-bit preparation (freezes the base, casts its non-quantized 16-bit weights to fp32, and with
    gradient checkpointing makes the inputs require grad), then `keep_training_layout`. Gradient checkpointing
    follows --gradient_checkpointing: peft turns it on by default, which would slow training without being asked."""
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                            gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
    keep_training_layout(model)
    return model


def keep_training_layout(model: Any) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for inference, so that an evaluation (or a generation) during
    training can't break the training steps after it. Returns the number of layers changed.

    On CPUs with AVX512-BF16, bitsandbytes 0.50's Linear4bit.forward (bitsandbytes/nn/modules.py) repacks its weight
    in place for an inference kernel (`_convert_weight_packed_for_cpu`) on the first forward in eval mode without
    grad, and never back: the training steps after it then fail, or get wrong gradients (measured with the flag
    forced on: the input gradient off by 1.56). Its inverse re-quantizes the scales, so undoing the repack would
    drift the frozen weights. The cost: the slower generic 4-bit kernel in evaluations on those CPUs.
    """
    count = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def describe(model: Any) -> dict[str, Any] | None:
    """What the manifest records of a quantized model: bits, type, compute dtype, layers left in full precision."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is None:
        return None
    settings = config if isinstance(config, dict) else config.to_dict()
    if settings.get("load_in_8bit"):
        return {"bits": 8, "method": "bitsandbytes LLM.int8", "skipped": settings.get("llm_int8_skip_modules")}
    return {"bits": 4, "method": "bitsandbytes", "quant_type": settings.get("bnb_4bit_quant_type"),
            "double_quant": settings.get("bnb_4bit_use_double_quant"),
            "compute_dtype": str(settings.get("bnb_4bit_compute_dtype")),
            "skipped": settings.get("llm_int8_skip_modules")}

