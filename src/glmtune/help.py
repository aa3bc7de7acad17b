"""Each command's --help, rendered from its argument dataclasses with the standard library only.

transformers' HfArgumentParser would render the same options, but importing transformers takes about 2 s (and
TrainingArguments, with torch, about 9 s here); a help page should answer at once. The options listed are the
dataclasses' own fields, so the page can't drift from what the real parser accepts (a test checks both agree).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from glmtune.arguments.options import Options, declared_choices
from glmtune.logs import add_logging_arguments

HELP_FLAGS = {"-h", "--help"}

# The transformers TrainingArguments options most runs set, for `glmtune train --help`: (name, default, help).
# `--help_all` lists every one of them from transformers itself. A test checks these names and defaults against
# the installed TrainingArguments.
COMMON_TRAINING_OPTIONS: list[tuple[str, Any, str]] = [
    ("output_dir", None, "Directory for checkpoints, the final adapter and the run's records."),
    ("num_train_epochs", 3.0, "Passes over the dataset (unless --max_steps is set)."),
    ("max_steps", -1, "Total optimizer steps; overrides --num_train_epochs when positive."),
    ("per_device_train_batch_size", 8, "Samples per step and device."),
    ("gradient_accumulation_steps", 1, "Steps whose gradients are summed before one optimizer update."),
    ("learning_rate", 5e-05, "Peak learning rate."),
    ("lr_scheduler_type", "linear", "Learning-rate schedule (linear, cosine, constant, ...)."),
    ("warmup_steps", 0, "Steps of linear warm-up."),
    ("weight_decay", 0.0, "AdamW weight decay."),
    ("logging_steps", 500, "Log the loss every N steps."),
    ("save_strategy", "steps", "When to save checkpoints: steps, epoch or no."),
    ("save_steps", 500, "Save a checkpoint every N steps."),
    ("save_total_limit", None, "Keep at most N checkpoints (the oldest are deleted)."),
    ("eval_strategy", "no", "When to evaluate on the validation split: no, steps or epoch."),
    ("resume_from_checkpoint", None, "A checkpoint directory to resume from, or 'true' for the latest one."),
    ("seed", 42, "Random seed of the run (data order, LoRA initialisation, dropout)."),
    ("fp16", False, "Mixed precision fp16 (CUDA only)."),
    ("bf16", False, "Mixed precision bf16."),
    ("gradient_checkpointing", None, "Recompute activations in the backward pass to save memory."),
    ("report_to", "none", "Experiment trackers to log to (none, tensorboard, wandb, ...)."),
    ("log_level", "passive", "glmtune's notices and transformers' level: debug, info, warning, error, critical; "
                             "passive is glmtune's info and the libraries' warnings."),
]


def asks_for_help(argv: list[str]) -> bool:
    return any(arg in HELP_FLAGS for arg in argv)


def command_help(prog: str, description: str | None, dataclass_types: list[type],
                 defaults: dict[str, Any] | None = None, training_options: bool = False) -> str:
    """The help page: the command's options by dataclass, with their defaults (the command's own where it sets
    them), then, for train, the common TrainingArguments options."""
    defaults = defaults or {}
    parser = argparse.ArgumentParser(prog=prog, description=description, add_help=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-h", "--help", action="store_true", help="Show this message and exit.")
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of options; flags override it.")
    declared = {f.name for t in dataclass_types for f in dataclasses.fields(t)}
    if training_options:  # TrainingArguments' own --log_level is listed with them
        declared |= {name for name, _, _ in COMMON_TRAINING_OPTIONS}
    add_logging_arguments(parser, declared)
    for dataclass_type in dataclass_types:
        group = parser.add_argument_group(dataclass_type.__name__)
        own = issubclass(dataclass_type, Options)  # glmtune's: allowed values and command-specific wording
        choices = declared_choices(dataclass_type) if own else {}
        overrides = dataclass_type.help_overrides if own else {}
        for field in dataclasses.fields(dataclass_type):
            if field.init:
                default = defaults.get(field.name, _default(field))
                text = overrides.get(field.name, field.metadata.get("help", ""))
                add_option(group, field.name, default, text, choices.get(field.name))
                for alias in field.metadata.get("aliases", []):
                    if "-" not in alias[2:]:  # the parser's --dashed-names are not listed, as for every option
                        add_option(group, alias[2:], None, f"The same as --{field.name} (its former name).")
    if training_options:
        group = parser.add_argument_group(
            "TrainingArguments (transformers): the common ones; every one is accepted, see --help_all")
        for name, default, text in COMMON_TRAINING_OPTIONS:
            add_option(group, name, defaults.get(name, default), text)
    return parser.format_help()


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def add_option(group: Any, name: str, default: Any, text: str, choices: tuple[Any, ...] | None = None) -> None:
    """One option line of a help page: its metavar, help text, allowed values and default."""
    metavar = "BOOL" if isinstance(default, bool) else name.upper()
    shown = [f"one of: {', '.join(map(str, choices))}"] if choices else []
    shown += [] if default is None else [f"default: {default}"]
    suffix = f" ({'; '.join(shown)})" if shown else ""
    group.add_argument(f"--{name}", metavar=metavar, help=(text + suffix).replace("%", "%%"))
