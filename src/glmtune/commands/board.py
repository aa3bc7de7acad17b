"""glmtune board: the whole job in a web page (data report, training with a live loss curve, chat, plan, eval and
export), each action the same glmtune command, shown ready to copy. Listens on 127.0.0.1 unless told; a host
beyond this machine needs --auth USER:PASS (or GLMTUNE_BOARD_AUTH). Needs the extra: pip install 'glmtune[board]'."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from glmtune.arguments import OutputDirArguments, option
from glmtune.arguments.network import ListenArguments
from glmtune.board.app import AUTH_ENV, check_exposure, parse_auth
from glmtune.config import parse_arguments
from glmtune.errors import UserError

# The shared --output_dir has no default (merge and eval require one); the board keeps its runs here unless told.
BOARD_DEFAULTS: dict[str, Any] = {"output_dir": "glmtune-board", "port": 7860}


@dataclass
class BoardArguments(OutputDirArguments, ListenArguments):
    help_overrides = {"host": "Address to listen on; anything but loopback (127.0.0.1, ::1) needs --auth.",
                      "port": "Port to listen on.",
                      "output_dir": "The runs folder: training runs are written, listed and reopened here."}

    auth: str | None = option(f"USER:PASS the page asks for (default: the {AUTH_ENV} environment variable, which "
                              "keeps the password out of the process list; required beyond loopback).")
    lang: Literal["en", "zh"] = option("Labels in English or Chinese (the page has a switch too).", default="en")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.port < 65536:
            raise UserError(f"--port must be between 1 and 65535, got {self.port}")


def main(argv: list[str], defaults: dict[str, Any] | None = None) -> None:
    (args,) = parse_arguments("glmtune board", [BoardArguments], argv, {**BOARD_DEFAULTS, **(defaults or {})},
                              description=__doc__)

    auth = parse_auth(args.auth or os.environ.get(AUTH_ENV))
    check_exposure(args.host, auth)  # before importing gradio: a refusal is instant
    try:
        import gradio  # noqa: F401
    except ImportError as e:
        raise UserError("the board needs Gradio, which is not installed",
                        hint="pip install 'glmtune[board]' (scripts/setup.sh installs it)") from e
    from glmtune.board.app import launch

    launch(Path(args.output_dir), args.host, args.port, auth, args.lang)
