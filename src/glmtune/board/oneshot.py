"""Short commands (eval, merge, convert) run to the end in a subprocess while the page shows what they print."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

from glmtune.board.command_line import runnable


def stream_command(argv: list[str]) -> Iterator[tuple[str, int | None]]:
    """(everything printed so far, exit code once it ended, else None), after each line the command prints."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(runnable(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, text=True, errors="replace", env=env)
    printed = ""
    assert process.stdout is not None
    for line in process.stdout:
        printed += line
        yield printed, None
    yield printed, process.wait()
