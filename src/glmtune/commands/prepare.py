"""glmtune prepare: tokenize data files with a model's tokenizer and chat template (the seed's
tokenize_dataset_rows.py), and report exactly what the model will be trained on."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from glmtune.arguments import ModelArguments, PrepareArguments
from glmtune.artifacts import check_writable_output
from glmtune.config import parse_arguments, to_plain_dict
from glmtune.data.prepare import (
    cache_key,
    default_cache_root,
    load_data,
    save_dataset,
    split_validation,
    tokenize_with_cache,
)
from glmtune.data.report import PrepareReport
from glmtune.data.tokenize import TokenizeOptions
from glmtune.errors import UserError


def main(argv: list[str], defaults: dict[str, Any] | None = None) -> None:
    model_args, args = parse_arguments("glmtune prepare", [ModelArguments, PrepareArguments], argv, defaults,
                                       description=__doc__)
    run(model_args, args)


def run(model_args: ModelArguments, args: PrepareArguments) -> PrepareReport:
    if not args.jsonl_path or (not args.save_path and not args.dry_run):
        raise UserError("--jsonl_path and --save_path are required (--save_path not with --dry_run)",
                        hint="glmtune prepare --jsonl_path DATA.json --save_path DIR --model MODEL")
    if not model_args.model:
        raise UserError("--model is required: its tokenizer and chat template decide the tokens")
    data_paths = [Path(p) for p in args.jsonl_path]
    save_path = Path(args.save_path) if args.save_path else None
    if save_path is not None and not args.dry_run:
        check_writable_output(save_path, args.overwrite_output_dir, "directory", tuple(data_paths))

    # Bad rows stop us before any model is loaded.
    data = load_data(args.jsonl_path, args.format, columns=args.column_map(), skip_bad_rows=args.skip_bad_rows)
    from glmtune.models.hub import canonical_model_name  # imports torch and transformers: not for --help
    from glmtune.models.loading import load_tokenizer, stop_token_ids, tokenizer_fingerprint

    tokenizer = load_tokenizer(model_args.model, model_args.trust_remote_code)
    stop_ids = stop_token_ids(model_args.model, tokenizer)
    fingerprint = tokenizer_fingerprint(tokenizer)
    options = TokenizeOptions(args.max_seq_length, args.truncation, args.last_turn_only, args.train_on_prompt)
    key = cache_key(data, tokenizer=fingerprint, stop_ids=stop_ids, options=asdict(options),
                    columns=args.column_map(), skip_bad_rows=args.skip_bad_rows)
    kept, report = tokenize_with_cache(data, tokenizer, stop_ids, options, args.num_proc,
                                       default_cache_root() if args.use_cache else None, key)
    splits = split_validation(kept, args.val_size, args.seed)
    report.validation_rows = len(splits["validation"]) if "validation" in splits else 0

    print("\n".join(["", "Dataset report" + (" (dry run: nothing written)" if args.dry_run else ""),
                     *report.lines()]))
    if args.dry_run:
        return report
    rejects = save_dataset(splits, report, data, save_path, args.overwrite_output_dir,
                           to_plain_dict(model_args, args), model=canonical_model_name(model_args.model),
                           tokenizer_fingerprint=fingerprint, stop_ids=stop_ids)
    print(f"saved to:          {save_path}" + (f"\nbad rows written to {rejects}" if rejects else ""))
    return report
