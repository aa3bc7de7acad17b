"""glmtune grpo: Group Relative Policy Optimization of a LoRA adapter (TRL's GRPOTrainer): the model samples
several answers to each prompt, reward functions score them, and the adapter learns from the better ones. Every
TRL GRPOConfig flag (and so every transformers TrainingArguments flag) is accepted too."""

from __future__ import annotations

import argparse
from typing import Any

from glmtune.arguments import HealthArguments, LoraArguments, ModelArguments, PrecisionArguments
from glmtune.arguments.grpo import GrpoArguments
from glmtune.commands.preference import PREFERENCE_DEFAULTS
from glmtune.help import add_option, asks_for_help, command_help

GRPO_DEFAULTS: dict[str, Any] = {
    **PREFERENCE_DEFAULTS,  # logging, saving, precision and checkpointing as the preference methods
    "output_dir": "output-grpo",
    # 10x TRL's full-weight 1e-6, as the preference methods' LoRA rate is 10x theirs.
    "learning_rate": 1e-5,
    "max_completion_length": 256,
}

OWN_ARGUMENTS = [ModelArguments, GrpoArguments, LoraArguments, PrecisionArguments, HealthArguments]

# The GRPOConfig options most runs set, for the help page (which answers without importing TRL): (name, TRL's
# default, help); the help shows glmtune's defaults where they differ. Checked against GRPOConfig by a test.
COMMON_GRPO_OPTIONS: list[tuple[str, Any, str]] = [
    ("num_generations", 8, "Completions sampled per prompt (the group each is compared with). The batch "
                           "(per_device_train_batch_size x gradient_accumulation_steps x processes) must be a "
                           "multiple of it."),
    ("max_completion_length", 512, "Longest completion in tokens."),
    ("temperature", 1.0, "Sampling temperature of the completions."),
    ("reward_weights", None, "Weights of --reward_funcs, in order: 1,0.5 (default: 1 each)."),
    ("beta", 0.0, "KL penalty towards the base model (0: none, and no reference pass)."),
    ("use_vllm", False, "Generate with vLLM (GPUs; see docs/commands/grpo.md)."),
    ("vllm_mode", "colocate", "colocate (vLLM in the training processes, sharing their GPUs) or server (a "
                              "`trl vllm-serve` process on other GPUs)."),
    ("vllm_gpu_memory_utilization", 0.3, "Share of each GPU's memory vLLM takes in colocate mode."),
    ("vllm_server_host", "0.0.0.0", "Host of the vLLM server in server mode."),
]


UNPACKED = ("grpo does not pack: its samples are the completions it generates, each scored and weighted as its own "
            "row", "leave it out (packing is glmtune train's)")
# The options of `glmtune train` (and TRL's packing option) grpo can't take: (why, what to do instead).
REFUSED: dict[str, tuple[str, str]] = {
    "packing": UNPACKED,
    "padding_free": UNPACKED,
    "chunked_loss": ("the chunked loss is glmtune train's cross-entropy; GRPO's loss is TRL's policy-gradient loss, "
                     "computed by GRPOTrainer from the completions' logits",
                     "leave it out; TRL's own chunked form is --use_liger_kernel (needs liger-kernel, GPUs)"),
}
BATCH_OPTIONS = ("generation_batch_size", "steps_per_generation")  # TRL takes one or the other


def refuse_grpo_options(argv: list[str]) -> None:
    """REFUSED's options, and both of TRL's ways to size a generation batch at once (TRL derives each from the
    other, and refuses the two together).

    Raises:
        UserError: one of them given, on the command line or in the --config file.
    """
    from glmtune.errors import UserError
    from glmtune.train.command import given_options, refuse_options

    refuse_options(argv, REFUSED)
    if set(BATCH_OPTIONS) <= given_options(argv):
        raise UserError("--generation_batch_size and --steps_per_generation both given: each is derived from the "
                        "other (generation_batch_size = per_device_train_batch_size x processes x "
                        "steps_per_generation), so TRL takes one or the other",
                        hint="keep one of them")


def help_page(defaults: dict[str, Any]) -> str:
    page = command_help("glmtune grpo", __doc__, OWN_ARGUMENTS, defaults, training_options=True)
    parser = argparse.ArgumentParser(add_help=False, usage=argparse.SUPPRESS)
    group = parser.add_argument_group("GRPOConfig (TRL): sampling and loss; every one is accepted, see --help_all")
    for name, default, text in COMMON_GRPO_OPTIONS:
        add_option(group, name, defaults.get(name, default), text)
    return page + "\n" + parser.format_help()


def main(argv: list[str], defaults: dict[str, Any] | None = None) -> None:
    defaults = {**GRPO_DEFAULTS, **(defaults or {})}
    if asks_for_help(argv) and "--help_all" not in argv:  # before importing torch, transformers and TRL
        print(help_page(defaults))
        return
    if "--help_all" in argv:
        argv = ["--help"]
    from glmtune.train.command import parse_training_options
    from glmtune.train.grpo import GlmtuneGRPOConfig, run_grpo, summary
    from glmtune.train.processes import end_process_group, is_main_process

    refuse_grpo_options(argv)

    model_args, grpo_args, lora_args, precision_args, health_args, training_args = parse_training_options(
        "glmtune grpo", [*OWN_ARGUMENTS, GlmtuneGRPOConfig], argv, defaults, description=__doc__)
    result = run_grpo(model_args, grpo_args, lora_args, training_args, precision_args, health_args)
    end_process_group()  # after the main process's final writes, on every process
    if is_main_process():
        print(summary(result, lora_args.finetuning_type))
