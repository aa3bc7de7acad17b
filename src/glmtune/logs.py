"""glmtune's messages: progress and notices go to the `glmtune` logger (stderr); `print` is kept for what a
command exists to output (answers, reports, tables, the line saying where the result was written), so that
`glmtune ... > result.txt` captures the result and nothing else.

Modules log with `logging.getLogger(__name__)` (every module's name is under `glmtune`). `configure_logging`
applies `--log_level` / `--quiet` to glmtune's logger, to transformers' and datasets' verbosity, and to the
Hugging Face progress bars. Importing this module imports neither transformers nor datasets: help pages use it.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

LOG_LEVELS = ("debug", "info", "warning", "error")
LOGGING_OPTIONS = ("log_level", "quiet")  # the flags every command takes (YAML config files may set them too)
LOG_LEVEL_HELP = ("glmtune's progress and notices on stderr: debug, info, warning or error; transformers and "
                  "datasets log their warnings and errors (everything at debug).")
QUIET_HELP = ("Warnings and errors only, and no progress bars; the command's results (answers, reports, tables) "
              "still print.")

# transformers' TrainingArguments has its own --log_level (train and dpo take it as it is): "passive" leaves the
# libraries' levels alone, which is what glmtune's default does.
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR,
           "critical": logging.CRITICAL, "passive": logging.INFO}

_progress_bars = True


def add_logging_arguments(parser: Any, declared: set[str] | frozenset[str] = frozenset()) -> None:
    """Add --log_level and --quiet to an argparse parser or group, except where an option of that name is already
    declared (train's and dpo's TrainingArguments bring their own --log_level)."""
    if "log_level" not in declared:
        parser.add_argument("--log_level", choices=LOG_LEVELS, default="info", help=LOG_LEVEL_HELP + " (default: info)")
    if "quiet" not in declared:
        parser.add_argument("--quiet", action="store_true", default=False, help=QUIET_HELP)


def configure_logging(log_level: str = "info", quiet: bool = False) -> None:
    """Apply --log_level / --quiet to this process (every call replaces the previous settings): glmtune's logger,
    transformers' and datasets' verbosity and the progress bars. Processes other than the main one of a
    torchrun / accelerate run log warnings and errors only.

    Args:
        log_level: "debug", "info", "warning" or "error" (also TrainingArguments' "critical" and "passive").
        quiet: warnings and errors only, and no progress bars.
    Raises:
        UserError: log_level is not a level name (a YAML config file is not checked by argparse's choices).
    """
    if log_level not in _LEVELS:
        from glmtune.errors import UserError

        raise UserError(f"log_level: expected one of {', '.join(LOG_LEVELS)}, found {log_level!r}")
    level = _LEVELS[log_level]
    if quiet or not _is_main_process():  # the other processes of a torchrun / accelerate run: as transformers does
        level = max(level, logging.WARNING)
    logger = logging.getLogger("glmtune")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(_Format())
        logger.addHandler(handler)
        logger.propagate = False  # one line per message, even where the root logger has a handler
    logger.setLevel(level)
    # The libraries' INFO is their internals (a model's whole config on every load): shown only at debug.
    library_level = logging.DEBUG if level == logging.DEBUG else max(level, logging.WARNING)
    global _progress_bars
    _progress_bars = not quiet
    _configure_libraries(library_level, _progress_bars)


def progress_bars_enabled() -> bool:
    """False under --quiet: glmtune's own progress bars (tqdm's `disable=`) follow the libraries'."""
    return _progress_bars


def _configure_libraries(level: int, bars: bool) -> None:
    # transformers is imported by every command before it parses its options; huggingface_hub comes with it.
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity(level)
        # Its loading and saving bars, and huggingface_hub's (downloads), which it switches along.
        transformers_logging.enable_progress_bar() if bars else transformers_logging.disable_progress_bar()
    # datasets sets its level and bars when it is imported, so importing it later would undo ours: import it now
    # (about 1 s) unless its own defaults (warnings, bars) are what was asked for.
    if "datasets" in sys.modules or level != logging.WARNING or not bars:
        import datasets

        datasets.logging.set_verbosity(level)
        datasets.enable_progress_bars() if bars else datasets.disable_progress_bars()


def _is_main_process() -> bool:
    """Rank 0, or no launcher at all: torchrun and accelerate launch set RANK in every process they start."""
    return os.environ.get("RANK", "0").strip() in ("", "0")


class _StderrHandler(logging.StreamHandler):
    """Writes to sys.stderr as it is when a message is logged, not when the handler was made: pytest's capture
    and contextlib.redirect_stderr replace it."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


class _Format(logging.Formatter):
    """A notice reads as a plain line; anything else says what it is, as the CLI's own "error: ..." does."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno == logging.INFO else f"{record.levelname.lower()}: {message}"

