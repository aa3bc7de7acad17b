"""Where a command writes, and whether it may replace what is there. train's and dpo's --output_dir is
TrainingArguments' own; their --overwrite_output_dir is this one (transformers 5 dropped its own)."""

from __future__ import annotations

from dataclasses import dataclass

from glmtune.arguments.options import Options, option


@dataclass
class OutputDirArguments(Options):
    output_dir: str | None = option("Directory to write to (required).")


@dataclass
class OverwriteArguments(Options):
    """Each command words it for what it writes (--output_dir, --output, --save_path) through `help_overrides`."""

    overwrite_output_dir: bool = option("Replace --output_dir if it exists and is not empty.", default=False)
