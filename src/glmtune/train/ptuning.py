"""P-Tuning v2 (THUDM's recipe for the ChatGLM line, --finetuning_type ptuning): a learned prefix of keys and
values that every layer attends to before the prompt, through peft's prefix tuning, saved in peft's format
(adapter_config.json with peft_type PREFIX_TUNING) and loaded like an adapter by infer, chat, eval and serve
(--peft_path); which models take one, and generation from it, are models/prefix.py's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from glmtune.arguments import LoraArguments
from glmtune.arguments.ptuning import PtuningArguments
from glmtune.artifacts import read_json_object
from glmtune.errors import UserError
from glmtune.models.lora import base_model
from glmtune.models.prefix import PEFT_TYPE, check_prefix_support, enable_prefix_generation, is_prefix_adapter

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, TrainingArguments

logger = logging.getLogger(__name__)

LEARNING_RATE = 2e-2  # THUDM's P-Tuning v2 scripts (ChatGLM-6B, ChatGLM2-6B): the default for this method


def check_ptuning_training(training_args: TrainingArguments) -> None:
    """Options a prefix can't train with. Raises UserError."""
    if training_args.gradient_checkpointing:
        raise UserError("--gradient_checkpointing with --finetuning_type ptuning: peft's prefix is a cache, which "
                        "checkpointed layers would fill twice", hint="leave --gradient_checkpointing out")


def add_prefix(model: PreTrainedModel, model_name: str, args: PtuningArguments, resume: Path | None) -> PeftModel:
    """A new P-Tuning v2 prefix on `model` (peft's PrefixTuningConfig), generation fixed to use it.

    Raises:
        UserError: a family it can't work with, or a checkpoint to resume from whose prefix has another shape.
    """
    from peft import PrefixTuningConfig, get_peft_model

    check_prefix_support(model, model_name)
    # THUDM's PrefixEncoder projects through an MLP as wide as the model (hidden -> hidden -> keys and values).
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=args.pre_seq_len,
                                prefix_projection=args.prefix_projection,
                                encoder_hidden_size=base_model(model).config.hidden_size)
    if resume is not None:
        check_same_prefix(resume, config)
        check_resumable(resume, config)
    peft_model = get_peft_model(model, config)
    enable_prefix_generation(peft_model)
    trainable, total = peft_model.get_nb_trainable_parameters()
    logger.info(f"P-Tuning v2 prefix: {args.pre_seq_len} virtual tokens"
                f"{' (projected)' if args.prefix_projection else ''}; trainable params: {trainable:,} || "
                f"all params: {total:,}")
    return peft_model


def check_same_prefix(checkpoint: Path, config: Any) -> None:
    saved = read_json_object(checkpoint / "adapter_config.json", "adapter config")
    ours = {"peft_type": PEFT_TYPE, "num_virtual_tokens": config.num_virtual_tokens,
            "prefix_projection": config.prefix_projection}
    differing = [f"{key}: checkpoint {saved.get(key)}, now {value}" for key, value in ours.items()
                 if saved.get(key) != value]
    if differing:
        raise UserError(f"cannot resume from {checkpoint}: its adapter differs from the prefix asked for",
                        problems=differing, hint="resume with the --finetuning_type and --pre_seq_len the run "
                                                 "started with")


def check_resumable(checkpoint: Path, config: Any) -> None:
    """peft saves a projected prefix as the MLP's output (the keys and values, the MLP folded in), so a checkpoint
    holds nothing to restore the MLP from: measured, the Trainer's resume fails on a size mismatch."""
    if config.prefix_projection:
        raise UserError(f"cannot resume from {checkpoint}: with --prefix_projection true, peft saves the prefix the "
                        "MLP computes, not the MLP, so training can't continue from it",
                        hint="start the run again, or train with --prefix_projection false (THUDM's default), whose "
                             "checkpoints resume")


def attach_prefix(model: PreTrainedModel, model_name: str, lora_args: LoraArguments,
                  ptuning_args: PtuningArguments | None, resume: Path | None, start_adapter: Path | None) -> PeftModel:
    """The skeleton's step 8 for --finetuning_type ptuning: a new prefix (LoRA's options and a starting adapter
    don't apply).

    Raises:
        UserError: a command without P-Tuning v2, LoRA-only options, a starting adapter, or add_prefix's refusals.
    """
    if ptuning_args is None:
        raise UserError("--finetuning_type ptuning is for glmtune train: the preference and reward methods (dpo, kto, "
                        "orpo, simpo, grpo) train LoRA, full or freeze, not a P-Tuning v2 prefix",
                        hint="use --finetuning_type lora here")
    lora_only = [flag for flag, given in (("--train_router", lora_args.train_router),
                                          ("--moe_aux_loss_coef", lora_args.moe_aux_loss_coef is not None),
                                          ("--target_modules", bool(lora_args.target_modules))) if given]
    if lora_only:
        raise UserError(f"{', '.join(lora_only)}: LoRA options, and --finetuning_type is ptuning",
                        hint="leave them out, or --finetuning_type lora")
    if start_adapter is not None:
        raise UserError("--finetuning_type ptuning trains a new prefix, and --peft_path starts from an adapter",
                        hint="leave one of them out")
    return add_prefix(model, model_name, ptuning_args, resume)


def refuse_prefix_start(start_adapter: Path) -> None:
    """A run that trains an earlier adapter further (dpo's --peft_path) trains LoRA; a prefix is not continued.

    Raises:
        UserError: `start_adapter` holds a P-Tuning v2 prefix.
    """
    if is_prefix_adapter(start_adapter):
        raise UserError(f"--peft_path {start_adapter} is a P-Tuning v2 prefix (peft's PREFIX_TUNING): the preference "
                        "and reward methods train LoRA adapters further, not a prefix",
                        hint="start from a LoRA adapter (glmtune train --finetuning_type lora), or from the base "
                             "model without --peft_path")
