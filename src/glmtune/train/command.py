"""What every training command (train, dpo, and the methods to come) does around its run: parse the method's option
dataclasses together with TrainingArguments (or a TRL config built on it) over the machine's defaults, turn
the library's missing-DeepSpeed ImportError into one user error, and say why an option of another training command
(train's --packing, --chunked_loss) is not taken."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from glmtune.config import parse_arguments
from glmtune.errors import UserError
from glmtune.train.processes import machine_defaults


def parse_training_options(prog: str, dataclass_types: list[type], argv: list[str], defaults: dict[str, Any],
                           description: str | None = None) -> tuple[Any, ...]:
    """parse_arguments with this machine's TrainingArguments defaults below the command's `defaults`.

    Raises:
        UserError: a bad option, or DeepSpeed asked for (--deepspeed, an accelerate DeepSpeed config) without the
            deepspeed package, which TrainingArguments reports as an ImportError.
    """
    try:
        return parse_arguments(prog, dataclass_types, argv, {**machine_defaults(), **defaults},
                               description=description)
    except ImportError as e:
        if "deepspeed" not in str(e):
            raise
        raise UserError("DeepSpeed (--deepspeed, or an accelerate config with DeepSpeed) needs the deepspeed package, "
                        "which is not installed",
                        hint="pip install deepspeed --no-build-isolation (see docs/install.md)") from None


def given_options(argv: list[str]) -> set[str]:
    """The option names the user gave: the flags on the command line and the keys of the --config YAML file (one
    that can't be read is left to parse_arguments to report)."""
    import yaml

    flags = {arg[2:].split("=", 1)[0] for arg in argv if arg.startswith("--")}
    config = next((argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--config"),
                  next((arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")), None))
    if config is None or not Path(config).is_file():
        return flags
    try:
        values = yaml.safe_load(Path(config).read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        return flags
    return flags | (set(map(str, values)) if isinstance(values, dict) else set())


def refuse_options(argv: list[str], refused: dict[str, tuple[str, str]]) -> None:
    """Say why an option that other training commands take does nothing here, instead of argparse's bare
    "unrecognized arguments" (or the YAML reader's "unknown key").

    Args:
        refused: option name -> (why this command can't take it, what to do instead).
    Raises:
        UserError: the first refused option given, on the command line or in the --config file.
    """
    for name in sorted(given_options(argv) & set(refused)):
        why, hint = refused[name]
        raise UserError(f"--{name}: {why}", hint=hint)


def check_liger(training_args: Any) -> None:
    """TRL's chunked losses (--use_liger_kernel, the form of train's --chunked_loss TRL's trainers have) need the
    liger-kernel package; without it TRL raises an ImportError from inside the trainer, after the model loaded.

    Raises:
        UserError: --use_liger_kernel without liger-kernel.
    """
    if not getattr(training_args, "use_liger_kernel", False):
        return
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is None:
        raise UserError("--use_liger_kernel: TRL's chunked (Liger) losses need the liger-kernel package (Triton "
                        "kernels, for GPUs), which is not installed",
                        hint="pip install liger-kernel on a GPU machine, or leave --use_liger_kernel out")
