"""glmtune train: LoRA fine-tuning on a prepared dataset or a data file (the seed's finetune.py). Every transformers
TrainingArguments flag is accepted too."""

from __future__ import annotations

from typing import Any

from glmtune.arguments import (
    ComputeArguments,
    DatasetArguments,
    GenerationEvalArguments,
    HealthArguments,
    LoraArguments,
    ModelArguments,
)
from glmtune.arguments.ptuning import PtuningArguments
from glmtune.help import asks_for_help, command_help

# glmtune's defaults where transformers' suit full fine-tuning rather than LoRA; YAML and flags override them.
TRAIN_DEFAULTS: dict[str, Any] = {
    "output_dir": "output",
    "learning_rate": 2e-4,
    "logging_steps": 10,
    "save_steps": 500,
    "report_to": "none",
    "remove_unused_columns": False,  # prepared datasets hold exactly the model's inputs
    # Batches of samples of similar lengths: padded batches (no packing) compute less padding.
    "train_sampling_strategy": "group_by_length",
}


OWN_ARGUMENTS = [ModelArguments, DatasetArguments, LoraArguments, PtuningArguments, ComputeArguments,
                 GenerationEvalArguments, HealthArguments]


def main(argv: list[str], defaults: dict[str, Any] | None = None) -> None:
    if asks_for_help(argv) and "--help_all" not in argv:  # before importing torch and transformers (~9 s)
        print(command_help("glmtune train", __doc__, OWN_ARGUMENTS, {**TRAIN_DEFAULTS, **(defaults or {})},
                           training_options=True))
        return
    if "--help_all" in argv:  # every TrainingArguments option too
        argv = ["--help"]
    from transformers import TrainingArguments

    from glmtune.train.command import parse_training_options
    from glmtune.train.processes import end_process_group, is_main_process
    from glmtune.train.ptuning import LEARNING_RATE as PTUNING_LEARNING_RATE
    from glmtune.train.ptuning import check_ptuning_training
    from glmtune.train.sft import run_sft
    from glmtune.train.skeleton import saved_what

    command_defaults = {**TRAIN_DEFAULTS, **(defaults or {})}
    parsed = parse_training_options("glmtune train", [*OWN_ARGUMENTS, TrainingArguments], argv, command_defaults,
                                    description=__doc__)
    if parsed[2].finetuning_type == "ptuning":  # again, under the method's learning rate: a YAML or flag still wins
        parsed = parse_training_options("glmtune train", [*OWN_ARGUMENTS, TrainingArguments], argv,
                                        {**command_defaults, "learning_rate": PTUNING_LEARNING_RATE},
                                        description=__doc__)
        check_ptuning_training(parsed[-1])
    model_args, data_args, lora_args, ptuning_args, compute_args, eval_args, health_args, training_args = parsed
    result = run_sft(model_args, data_args, lora_args, training_args, compute_args, eval_args, health_args,
                     ptuning_args)
    end_process_group()  # after the main process's final writes, on every process
    if not is_main_process():  # under torchrun / accelerate launch: said once
        return
    print(f"\n{saved_what(lora_args.finetuning_type)} saved to {result.output_dir} after {result.global_step} steps"
          + (f" (last logged loss {result.final_loss:.4f})" if result.final_loss is not None else ""))
