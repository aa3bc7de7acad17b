"""Full and freeze tuning: the model's own weights trained, instead of an adapter (--finetuning_type full|freeze).

full trains every weight; freeze trains the last N decoder blocks (the first -N for a negative N), optionally only
the modules in them whose names contain given words (LLaMA-Factory's freeze_trainable_layers and
freeze_trainable_modules). Either way the run saves a whole model (weights, config, tokenizer), which infer, chat,
eval and serve load with --model, and which needs no merge.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

from glmtune.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from glmtune.arguments import LoraArguments

logger = logging.getLogger(__name__)

WHOLE_MODEL_TYPES = ("full", "freeze")


def make_trainable(model: PreTrainedModel, model_name: str, lora_args: LoraArguments) -> PreTrainedModel:
    """Set requires_grad on the weights the finetuning type trains, off on the rest; the trained ones in fp32.

    Raises:
        UserError: a quantized base (its packed weights can't be trained), no decoder blocks found, or more
            blocks asked for than the model has.
    """
    import torch

    if getattr(model.config, "quantization_config", None) is not None:
        raise UserError(f"--finetuning_type {lora_args.finetuning_type} trains the model's own weights, and "
                        f"'{model_name}' is loaded quantized: packed 4/8-bit weights can't be trained",
                        hint="leave --quantization_bit out, or train LoRA on the quantized base (QLoRA)")
    names = trainable_names(model, lora_args)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in names)
        # AdamW's updates fall below bf16/fp16's resolution near 1: master weights in fp32, as the LoRA weights are.
        if name in names and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info(f"{lora_args.finetuning_type} tuning: trainable params: {trainable:,} || all params: {total:,} || "
                f"trainable%: {100 * trainable / max(total, 1):.4f}")
    return model


def trainable_names(model: PreTrainedModel, lora_args: LoraArguments) -> set[str]:
    """The names of the parameters the run trains: all of them (full), or those of the chosen blocks (freeze)."""
    names = {name for name, _ in model.named_parameters()}
    if lora_args.finetuning_type == "full":
        return names
    prefix, count = decoder_blocks(model)
    layers = chosen_layers(count, lora_args.freeze_trainable_layers)
    words = [w.strip() for w in lora_args.freeze_trainable_modules.split(",") if w.strip()]
    block = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$")
    chosen = set()
    for name in names:
        match = block.match(name)
        if match and int(match.group(1)) in layers and (words == ["all"] or any(w in match.group(2) for w in words)):
            chosen.add(name)
    if not chosen:
        raise UserError(f"--freeze_trainable_modules {lora_args.freeze_trainable_modules}: no weight in blocks "
                        f"{sorted(layers)} has such a name", hint="pass 'all', or words of the blocks' module names "
                        "(e.g. self_attn, mlp)")
    return chosen


def chosen_layers(count: int, n: int) -> set[int]:
    """The indices of the last n of `count` blocks (n > 0), or of the first -n (n < 0).

    Raises:
        UserError: |n| larger than the model's number of blocks.
    """
    if abs(n) > count:
        raise UserError(f"--freeze_trainable_layers {n}: the model has {count} decoder blocks",
                        hint=f"choose N with 1 <= |N| <= {count}, or --finetuning_type full")
    return set(range(count - n, count)) if n > 0 else set(range(-n))


def decoder_blocks(model: PreTrainedModel) -> tuple[str, int]:
    """The dotted name of the model's list of decoder blocks and its length: the ModuleList as long as the config's
    number of layers (model.layers in transformers' models, transformer.encoder.layers in THUDM's ChatGLM2/3), the
    nearest the root if several (a mixture of experts' expert lists may be as long).

    Raises:
        UserError: the model has no such list.
    """
    from torch import nn

    config = model.config
    count = getattr(config, "num_hidden_layers", None) or getattr(config, "num_layers", None)
    lists = [name for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) == count]
    if not lists:
        raise UserError(f"{type(model).__name__} has no list of {count} decoder blocks to choose from",
                        hint="--finetuning_type full or lora")
    return min(lists, key=lambda name: name.count(".")), count
