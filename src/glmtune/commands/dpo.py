"""glmtune dpo: Direct Preference Optimisation of a LoRA adapter on prepared preference pairs (TRL's DPOTrainer).
Every TRL DPOConfig flag (and so every transformers TrainingArguments flag) is accepted too."""

from __future__ import annotations

import argparse
from typing import Any

from glmtune.arguments import DpoArguments, HealthArguments, LoraArguments, ModelArguments, PrecisionArguments
from glmtune.help import add_option, asks_for_help, command_help

# glmtune's defaults where TRL's don't suit a LoRA run on glmtune's pipeline; YAML and flags override them.
DPO_DEFAULTS: dict[str, Any] = {
    "output_dir": "output-dpo",
    # 10x the usual full-weight DPO rate (5e-7, Zephyr), as LoRA SFT's 2e-4 is 10x full SFT's; the rate of the
    # alignment-handbook's QLoRA DPO recipe and LLaMA-Factory's LoRA DPO example.
    "learning_rate": 5e-6,
    "logging_steps": 10,
    "save_steps": 500,
    "report_to": "none",
    # TRL turns bf16 on unless fp16 is: glmtune's --precision auto decides instead (fp32 on CPUs without bf16 units).
    "bf16": False,
    # TRL turns it on; off as in train (LoRA on a frozen base keeps few activations): --gradient_checkpointing.
    "gradient_checkpointing": None,
    # Prepare already cut every pair to --max_seq_length by its --truncation rule; TRL's collator cuts no further.
    "max_length": None,
}

OWN_ARGUMENTS = [ModelArguments, DpoArguments, LoraArguments, PrecisionArguments, HealthArguments]

# The DPOConfig options most runs set, for the help page (which answers without importing TRL): (name, default,
# help). A test checks them against the installed DPOConfig.
COMMON_DPO_OPTIONS: list[tuple[str, Any, str]] = [
    ("beta", 0.1, "Strength of the pull towards the reference model: higher keeps the policy closer to it."),
    ("loss_type", ["sigmoid"], "Preference loss: sigmoid (DPO), ipo, hinge, robust, apo_zero, sigmoid_norm, ..."),
    ("label_smoothing", 0.0, "Assumed share of flipped labels (robust DPO / cDPO)."),
    ("precompute_ref_log_probs", False, "Compute the reference log-probabilities once before training."),
    ("max_length", None, "Cut prompt + answer to this many tokens in the collator (prepare has already cut them)."),
]


def help_page(defaults: dict[str, Any]) -> str:
    page = command_help("glmtune dpo", __doc__, OWN_ARGUMENTS, defaults, training_options=True)
    parser = argparse.ArgumentParser(add_help=False, usage=argparse.SUPPRESS)
    group = parser.add_argument_group("DPOConfig (TRL): the preference options; every one is accepted, see --help_all")
    for name, default, text in COMMON_DPO_OPTIONS:
        add_option(group, name, defaults.get(name, default), text)
    return page + "\n" + parser.format_help()


def main(argv: list[str], defaults: dict[str, Any] | None = None) -> None:
    if asks_for_help(argv) and "--help_all" not in argv:  # before importing torch, transformers and TRL
        print(help_page({**DPO_DEFAULTS, **(defaults or {})}))
        return
    if "--help_all" in argv:  # every DPOConfig option too
        argv = ["--help"]
    from glmtune.train.command import parse_training_options
    from glmtune.train.dpo import GlmtuneDPOConfig, run_dpo
    from glmtune.train.processes import end_process_group, is_main_process

    model_args, dpo_args, lora_args, precision_args, health_args, training_args = parse_training_options(
        "glmtune dpo", [*OWN_ARGUMENTS, GlmtuneDPOConfig], argv, {**DPO_DEFAULTS, **(defaults or {})},
        description=__doc__)
    result = run_dpo(model_args, dpo_args, lora_args, training_args, precision_args, health_args)
    end_process_group()  # after the main process's final writes, on every process
    if not is_main_process():  # under torchrun / accelerate launch: said once
        return
    rewards = result.rewards
    print(f"\nAdapter saved to {result.output_dir} after {result.global_step} steps"
          + (f" (last logged: loss {result.final_loss:.4f}, reward accuracy {rewards['rewards/accuracies']:.2f}, "
             f"reward margin {rewards['rewards/margins']:.4f})" if result.final_loss is not None and rewards else ""))
