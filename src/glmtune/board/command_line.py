"""The `glmtune ...` commands the board runs or shows: built from the page's values, and printed so that what was done
in the page can be repeated in a script."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Mapping
from typing import Any

# The training methods the Train page offers: each is `glmtune METHOD`, on a dataset of its kind.
METHODS = ("train", "dpo", "kto", "orpo", "simpo")


def glmtune_command(verb: str, options: Mapping[str, Any], flags: tuple[str, ...] = ()) -> list[str]:
    """`glmtune VERB --name value ...`: options that are None or "" are left out (the command's default applies);
    True is written `--name true` (every glmtune boolean takes a value); a list repeats the values after its flag.
    `flags` are appended as they are (already `--name value`)."""
    argv = ["glmtune", verb]
    for name, value in options.items():
        if value is None or value == "" or value == []:
            continue
        argv.append(f"--{name}")
        if isinstance(value, bool):
            argv.append("true" if value else "false")
        elif isinstance(value, list | tuple):
            argv += [str(v) for v in value]
        else:
            argv.append(_number(value) if isinstance(value, float) else str(value))
    return argv + list(flags)


def shell_line(argv: list[str]) -> str:
    """The command as one line to paste into a shell."""
    return shlex.join(argv)


def runnable(argv: list[str]) -> list[str]:
    """The argv to start: `glmtune` as this interpreter's module, so the board's environment runs it whatever PATH
    holds."""
    return [sys.executable, "-m", "glmtune", *argv[1:]] if argv and argv[0] == "glmtune" else list(argv)


def _number(value: float) -> str:
    return str(int(value)) if value.is_integer() and abs(value) >= 1 else repr(value)


def training_command(method: str, options: Mapping[str, Any]) -> list[str]:
    """`glmtune METHOD ...` for the Train page (METHODS)."""
    if method not in METHODS:
        raise ValueError(f"unknown training method {method!r}; expected one of {', '.join(METHODS)}")
    return glmtune_command(method, options)


def resume_command(argv: list[str]) -> list[str]:
    """A run's command, to go on from its latest complete checkpoint (and never to start it afresh)."""
    kept, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg in ("--resume_from_checkpoint", "--overwrite_output_dir"):
            skip = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            continue
        kept.append(arg)
    return [*kept, "--resume_from_checkpoint", "true"]
