"""glmtune prepare: tokenize data files with a model's tokenizer and chat template (the seed's
tokenize_dataset_rows.py), and report exactly what the model will be trained on."""

from __future__ import annotations

from typing import Any

from glmtune.arguments import ModelArguments, PrepareArguments
from glmtune.config import parse_arguments
from glmtune.data.prepare import prepare_dataset
from glmtune.data.report import PrepareReport


def main(argv: list[str], defaults: dict[str, Any] | None = None) -> None:
    model_args, args = parse_arguments("glmtune prepare", [ModelArguments, PrepareArguments], argv, defaults,
                                       description=__doc__)
    run(model_args, args)


def run(model_args: ModelArguments, args: PrepareArguments) -> PrepareReport:
    return prepare_dataset(model_args, args)
