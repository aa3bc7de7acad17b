"""What every training command (train, dpo, and the methods to come) does around its run: parse the method's option
dataclasses together with TrainingArguments (or a TRL config built on it) over the machine's defaults, and turn
the library's missing-DeepSpeed ImportError into one user error."""

from __future__ import annotations

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
