"""glmtune convert SRC DST: write a ChatGLM-6B, ChatGLM2/3 or GLM-4 checkpoint (as THUDM publishes it, with remote
code) as a plain transformers directory that AutoModelForCausalLM/AutoTokenizer load without remote code (ChatGLM-6B,
whose architecture transformers lacks: after `import glmtune.models`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from glmtune.arguments import ModelNameArguments, OutputDirArguments, OverwriteArguments, option
from glmtune.config import parse_arguments, to_plain_dict


@dataclass
class ConvertArguments(OverwriteArguments, OutputDirArguments, ModelNameArguments):
    help_overrides = {"model": "The checkpoint directory (SRC).", "output_dir": "The directory to write (DST).",
                      "overwrite_output_dir": "Replace DST if it exists."}

    tokenizer: str | None = option("Where the tokenizer files are, if not beside the weights.")


def main(argv: list[str]) -> None:
    # `glmtune convert SRC DST` is sugar for --model SRC --output_dir DST.
    positional = []
    while argv and not argv[0].startswith("-") and len(positional) < 2:
        positional.append(argv.pop(0))
    argv = [*(a for pair in zip(["--model", "--output_dir"], positional, strict=False) for a in pair), *argv]
    (args,) = parse_arguments("glmtune convert", [ConvertArguments], argv, description=__doc__)
    run(args)


def run(args: ConvertArguments) -> Path:
    from glmtune.errors import UserError
    from glmtune.models.export import export_model

    if not args.model or not args.output_dir:
        raise UserError("SRC and DST are required", hint="glmtune convert SRC_DIR DST_DIR")
    destination = export_model(args.model, Path(args.output_dir), args.tokenizer, args.overwrite_output_dir,
                               to_plain_dict(args))
    print(f"Converted {args.model} to {destination}: loads with AutoModelForCausalLM and AutoTokenizer")
    return destination
