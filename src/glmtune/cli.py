"""The glmtune command: a table of verbs, each a module imported only when it runs (so --help is instant)."""

from __future__ import annotations

import difflib
import importlib
import sys
from collections.abc import Callable
from typing import Any

from glmtune import __version__
from glmtune.disk import FULL_ERRNOS, unreported_full_disk
from glmtune.errors import UserError

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("glmtune.commands.demo", "Build a tiny GLM, tune it on the bundled finance Q&A, show before/after."),
    "prepare": ("glmtune.commands.prepare", "Tokenize a data file into a training dataset directory."),
    "train": ("glmtune.commands.train", "LoRA fine-tuning on a prepared dataset."),
    "dpo": ("glmtune.commands.dpo", "Preference tuning (DPO) of a LoRA adapter on prepared chosen/rejected pairs."),
    "kto": ("glmtune.commands.kto", "Preference tuning (KTO): each answer of a pair labelled good or bad."),
    "orpo": ("glmtune.commands.orpo", "Preference tuning (ORPO: SFT and preference in one, no reference model)."),
    "simpo": ("glmtune.commands.simpo", "Preference tuning (SimPO, or CPO) of a LoRA adapter, no reference model."),
    "grpo": ("glmtune.commands.grpo", "Reinforcement learning (GRPO) of a LoRA adapter with reward functions."),
    "infer": ("glmtune.commands.infer", "Answer prompts with a base model and an optional adapter."),
    "chat": ("glmtune.commands.chat", "Talk to a model (with an optional adapter) in the terminal, streaming."),
    "merge": ("glmtune.commands.merge", "Fold an adapter into its base model and prove the merged logits match."),
    "serve": ("glmtune.commands.serve", "Serve a model (with an optional adapter) over an OpenAI-compatible API."),
    "eval": ("glmtune.commands.eval", "Score greedy answers on a data file: BLEU, ROUGE, exact match, perplexity."),
    "plan": ("glmtune.commands.plan", "Estimate a LoRA run's peak memory from the model's config; does it fit?"),
    "convert": ("glmtune.commands.convert", "Write a THUDM ChatGLM or GLM-4 checkpoint as a plain transformers model."),
    "board": ("glmtune.commands.board", "The whole job in a web page: data report, training, chat, plan, export."),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    verbs = "\n".join(f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items())
    return (f"usage: glmtune COMMAND [options]   (glmtune COMMAND --help for its options)\n\n"
            f"commands:\n{verbs}\n\nglmtune {__version__}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in {"-h", "--help"}:
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"glmtune {__version__}")
        return 0
    verb = argv[0]
    if verb not in COMMANDS:
        close = difflib.get_close_matches(verb, COMMANDS, n=1)
        print(f"error: unknown command '{verb}'" + (f" (did you mean '{close[0]}'?)" if close else ""),
              file=sys.stderr)
        print(usage(), file=sys.stderr)
        return 2
    command = importlib.import_module(COMMANDS[verb][0]).main
    return run_command(command, argv[1:])


def run_command(command: Callable[..., Any], argv: list[str], defaults: dict[str, Any] | None = None) -> int:
    """Run a command's main; a UserError becomes one message on stderr and exit code 2, never a traceback."""
    try:
        command(argv, defaults) if defaults else command(argv)
    except UserError as e:
        print(e.render(), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a full disk where no write reported it itself (those say what they were writing)
        if e.errno not in FULL_ERRNOS:
            raise
        error = unreported_full_disk(e)
        print(error.render(), file=sys.stderr)
        return error.exit_code
    return 0
