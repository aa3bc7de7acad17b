"""glmtune infer: answer prompts with a base model and an optional LoRA adapter (the seed's infer.py).
Prompts come from --prompt (repeatable) or an --input data file; results are JSON lines."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from glmtune.arguments import InferenceArguments, ModelArguments
from glmtune.artifacts import atomic_file, check_writable_output
from glmtune.config import parse_arguments
from glmtune.data.conversation import Conversation, Message
from glmtune.data.prepare import load_data
from glmtune.errors import UserError


def main(argv: list[str], defaults: dict[str, Any] | None = None) -> None:
    model_args, args = parse_arguments("glmtune infer", [ModelArguments, InferenceArguments], argv, defaults,
                                       description=__doc__)
    run(model_args, args)


def run(model_args: ModelArguments, args: InferenceArguments) -> list[dict[str, Any]]:
    from transformers import set_seed

    from glmtune.inference.engine import Engine, GenerationSettings

    rows, conversations = _read_prompts(args)
    if args.output:
        check_writable_output(Path(args.output), args.overwrite_output_dir, "file", _inputs(args))
    set_seed(args.seed)
    engine = Engine(model_args.model, args.peft_path, model_args.trust_remote_code, model_args.quantization_bit)
    settings = GenerationSettings(args.max_new_tokens, args.max_length, args.temperature, args.top_p,
                                  args.enable_thinking)
    completions = engine.complete(conversations, settings, args.batch_size)
    results = [{**row, "response": c.text, **c.extra_fields()} for row, c in zip(rows, completions, strict=True)]
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
    if args.output:
        with atomic_file(Path(args.output), args.overwrite_output_dir, _inputs(args)) as tmp:
            tmp.write_text(lines, encoding="utf-8")
        print(f"Wrote {len(results)} answers to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(lines)
    return results


def _inputs(args: InferenceArguments) -> tuple[Path, ...]:
    return (Path(args.input),) if args.input else ()


def _read_prompts(args: InferenceArguments) -> tuple[list[dict[str, Any]], list[Conversation]]:
    rows: list[dict[str, Any]] = []
    conversations: list[Conversation] = []
    for prompt in args.prompt or []:
        rows.append({"prompt": prompt})
        conversations.append(Conversation(messages=[Message("user", prompt)]))
    if args.input:
        data = load_data([args.input], args.format, need_answer=False)
        rows += data.rows
        conversations += [c.prompt_part() for c in data.conversations]
    if not conversations:
        raise UserError("nothing to answer", hint="pass --prompt TEXT (repeatable) or --input DATA_FILE")
    return rows, conversations
