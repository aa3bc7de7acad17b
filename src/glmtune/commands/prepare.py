"""glmtune prepare: tokenize a data file with a model's tokenizer and chat template (the seed's
tokenize_dataset_rows.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from glmtune.arguments import ModelArguments, PrepareArguments
from glmtune.artifacts import check_writable_output
from glmtune.config import parse_arguments, to_plain_dict
from glmtune.data.prepare import PrepareReport, load_data, save_dataset, tokenize_conversations
from glmtune.errors import UserError
from glmtune.models.hub import canonical_model_name
from glmtune.models.loading import load_tokenizer, stop_token_ids, tokenizer_fingerprint


def main(argv: list[str], defaults: dict[str, Any] | None = None) -> None:
    model_args, args = parse_arguments("glmtune prepare", [ModelArguments, PrepareArguments], argv, defaults,
                                       description=__doc__)
    run(model_args, args)


def run(model_args: ModelArguments, args: PrepareArguments) -> PrepareReport:
    for flag in ("jsonl_path", "save_path"):
        if not getattr(args, flag):
            raise UserError(f"--{flag} is required", hint="glmtune prepare --jsonl_path DATA.json "
                                                            "--save_path DIR --model MODEL")
    if not model_args.model:
        raise UserError("--model is required: its tokenizer and chat template decide the tokens")
    data_path, save_path = Path(args.jsonl_path), Path(args.save_path)
    check_writable_output(save_path, args.overwrite_output_dir, "directory", (data_path,))

    data = load_data(data_path, args.format)  # bad rows stop us before any model is loaded
    tokenizer = load_tokenizer(model_args.model, model_args.trust_remote_code)
    stop_ids = stop_token_ids(model_args.model, tokenizer)
    columns, report = tokenize_conversations(data, tokenizer, stop_ids, args.max_seq_length)
    save_dataset(columns, report, data_path, save_path, args.overwrite_output_dir,
                 to_plain_dict(model_args, args), model=canonical_model_name(model_args.model),
                 tokenizer_fingerprint=tokenizer_fingerprint(tokenizer), stop_ids=stop_ids)

    print("\n".join(["", "Dataset report", *report.lines(), f"saved to:          {save_path}"]))
    return report
