"""What the preference commands (dpo, kto, orpo, simpo) share: glmtune's defaults over TRL's, the help page (which
answers without importing TRL), and main: parse the command's option dataclasses with its TRL config, run the
method (train/preference.py), say where the adapter went."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any

from glmtune.help import add_option, asks_for_help, command_help

# glmtune's defaults where TRL's don't suit a LoRA run on glmtune's pipeline; YAML and flags override them.
PREFERENCE_DEFAULTS: dict[str, Any] = {
    # 10x the usual full-weight DPO rate (5e-7, Zephyr), as LoRA SFT's 2e-4 is 10x full SFT's; the rate of the
    # alignment-handbook's QLoRA DPO recipe and LLaMA-Factory's LoRA preference examples (DPO, KTO, ORPO, SimPO).
    "learning_rate": 5e-6,
    "logging_steps": 10,
    "save_steps": 500,
    "report_to": "none",
    # TRL turns bf16 on unless fp16 is: glmtune's --precision auto decides instead (fp32 on CPUs without bf16 units).
    "bf16": False,
    # TRL turns it on; off as in train (LoRA on a frozen base keeps few activations): --gradient_checkpointing.
    "gradient_checkpointing": None,
}


def refusals(command: str) -> dict[str, tuple[str, str]]:
    """The options of `glmtune train` a preference method can't take, with the reason and what to do instead."""
    unpacked = (f"{command} does not pack: TRL's trainer gives each prompt + answer its own padded row, and its loss "
                "compares the answers' summed log-probabilities row by row",
                "leave it out (packing is glmtune train's)")
    return {
        "packing": unpacked,
        "padding_free": unpacked,  # TRL's packing option, in DPOConfig only
        "chunked_loss": (f"the chunked loss is glmtune train's cross-entropy; {command}'s loss is TRL's, computed by "
                         "its trainer from the answers' logits",
                         "leave it out; TRL's own chunked form is --use_liger_kernel (needs liger-kernel, GPUs)"),
    }


def help_page(prog: str, doc: str | None, own_arguments: list[type], defaults: dict[str, Any], config_name: str,
              common_options: list[tuple[str, Any, str]]) -> str:
    """The command's help: its own options, the training options, then the TRL config options most runs set."""
    page = command_help(prog, doc, own_arguments, defaults, training_options=True)
    parser = argparse.ArgumentParser(add_help=False, usage=argparse.SUPPRESS)
    group = parser.add_argument_group(f"{config_name} (TRL): the preference options; every one is accepted, "
                                      "see --help_all")
    for name, default, text in common_options:
        add_option(group, name, defaults.get(name, default), text)
    return page + "\n" + parser.format_help()


def preference_main(prog: str, doc: str | None, own_arguments: list[type], defaults: dict[str, Any],
                    config_name: str, common_options: list[tuple[str, Any, str]],
                    load_method: Callable[[], tuple[Any, type]], argv: list[str]) -> None:
    """Parse, run and report one preference command.

    Args:
        own_arguments: the command's option dataclasses, in the order run_preference takes them (model, method,
            LoRA, precision, health).
        load_method: imports TRL (only once the command runs, not for --help) and returns (PreferenceMethod, its
            glmtune config class).
    """
    if asks_for_help(argv) and "--help_all" not in argv:  # before importing torch, transformers and TRL
        print(help_page(prog, doc, own_arguments, defaults, config_name, common_options))
        return
    if "--help_all" in argv:  # every option of the TRL config too
        argv = ["--help"]
    from glmtune.train.command import parse_training_options, refuse_options
    from glmtune.train.preference import run_preference, summary
    from glmtune.train.processes import end_process_group, is_main_process

    method, config_class = load_method()
    taken = {f.name for f in dataclasses.fields(config_class)}
    refuse_options(argv, {k: v for k, v in refusals(method.command).items() if k not in taken})
    model_args, method_args, lora_args, precision_args, health_args, training_args = parse_training_options(
        prog, [*own_arguments, config_class], argv, defaults, description=doc)
    result = run_preference(method, model_args, method_args, lora_args, training_args, precision_args, health_args)
    end_process_group()  # after the main process's final writes, on every process
    if is_main_process():  # under torchrun / accelerate launch: said once
        print(summary(result, lora_args.finetuning_type))
