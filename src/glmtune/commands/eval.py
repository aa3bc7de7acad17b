"""glmtune eval: answer every row of a data file with a model (base + adapter, or merged) by greedy decoding,
score the answers against the rows' own (BLEU-4, ROUGE-1/2/L on jieba words, exact match) and measure the
perplexity of the references. Writes predictions.jsonl, metrics.json and manifest.json to --output_dir."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from glmtune.arguments import EvalArguments, ModelArguments
from glmtune.artifacts import atomic_directory, check_writable_output, write_manifest
from glmtune.config import parse_arguments, to_plain_dict
from glmtune.errors import UserError

# Where eval's defaults differ from the options' own (shared with infer and chat).
EVAL_DEFAULTS: dict[str, Any] = {"max_new_tokens": 256}  # the engine's DEFAULT_MAX_NEW_TOKENS, said in --help


def main(argv: list[str], defaults: dict[str, Any] | None = None) -> None:
    model_args, args = parse_arguments("glmtune eval", [ModelArguments, EvalArguments], argv,
                                       {**EVAL_DEFAULTS, **(defaults or {})}, description=__doc__)
    run(model_args, args)


def run(model_args: ModelArguments, args: EvalArguments) -> dict[str, Any]:
    """Returns what metrics.json holds."""
    from glmtune.data.prepare import load_data
    from glmtune.evaluation.run import format_table, reference_nll, samples_from_conversations, score
    from glmtune.inference.engine import DEFAULT_MAX_NEW_TOKENS, Engine, GenerationSettings

    if not args.dataset or not args.output_dir:
        raise UserError("--dataset and --output_dir are required",
                        hint="glmtune eval --peft_path ADAPTER_DIR --dataset DATA_FILE --output_dir EVAL_DIR")
    max_new_tokens = args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS  # None when built in Python, not by main()
    output_dir, inputs = Path(args.output_dir), (Path(args.dataset),)
    check_writable_output(output_dir, args.overwrite_output_dir, "directory", inputs)  # before minutes of work
    data = load_data([args.dataset], args.format)
    conversations = data.conversations[: args.max_samples]
    engine = Engine(model_args.model, args.peft_path, model_args.trust_remote_code, model_args.quantization_bit)
    samples = samples_from_conversations(engine.tokenizer, engine.stop_ids, conversations, args.enable_thinking)

    # The answer's text alone is scored; its reasoning and tool calls are written beside it.
    completions = engine.complete([c.prompt_part() for c in conversations],
                                  GenerationSettings(max_new_tokens=max_new_tokens,
                                                     enable_thinking=args.enable_thinking), args.batch_size)
    nll = reference_nll(engine.model, engine.tokenizer.pad_token_id, samples, args.batch_size)
    result = score(samples, [c.text for c in completions], nll)
    for record, completion in zip(result.records, completions, strict=True):
        record.update(completion_tokens=completion.completion_tokens, finish_reason=completion.finish_reason,
                      **completion.extra_fields())
    stopped = sum(c.finish_reason != "length" for c in completions)
    summary = {"metrics": result.metrics,
               "counts": {**result.counts, "rows_read": data.rows_read, "stopped": stopped,
                          "cut_at_max_new_tokens": len(completions) - stopped},
               "settings": {"model": engine.model_name, "peft_path": args.peft_path, "dataset": args.dataset,
                            "format": data.format, "decoding": "greedy", "max_new_tokens": max_new_tokens,
                            "enable_thinking": args.enable_thinking,
                            "batch_size": args.batch_size, "max_samples": args.max_samples}}

    with atomic_directory(output_dir, args.overwrite_output_dir, inputs) as tmp:
        (tmp / "predictions.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result.records), encoding="utf-8")
        (tmp / "metrics.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        write_manifest(tmp, "eval", to_plain_dict(model_args, args), inputs=data.inputs, base_model=engine.model_name)
    print(format_table(result.metrics))
    print(f"{len(samples)} samples ({stopped} answers ended on a stop token, {len(samples) - stopped} were cut at "
          f"--max_new_tokens {max_new_tokens}); {result.counts['reference_tokens']} reference tokens scored "
          f"for perplexity\nWrote predictions.jsonl and metrics.json to {output_dir}")
    return summary
