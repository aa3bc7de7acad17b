"""`glmtune grpo`'s own options: the prompts, how they are rendered, and the rewards. GRPO's sampling and loss
options (num_generations, max_completion_length, temperature, beta, reward_weights...) are TRL's GRPOConfig fields,
taken as they are, as dpo takes DPOConfig's."""

from __future__ import annotations

from dataclasses import dataclass

from glmtune.arguments.data import DataFormatArguments, DatasetPathArguments
from glmtune.arguments.generation import ThinkingArguments
from glmtune.arguments.model import AdapterArguments
from glmtune.arguments.options import check_at_least_one, option
from glmtune.arguments.output import OverwriteArguments


@dataclass
class GrpoArguments(DatasetPathArguments, OverwriteArguments, AdapterArguments, ThinkingArguments,
                    DataFormatArguments):
    help_overrides = {
        "overwrite_output_dir": "Start afresh in a non-empty --output_dir.",
        "peft_path": "LoRA adapter to start from and go on training (a `glmtune train` output, e.g. the SFT run); "
                     "default: a new adapter from the LoRA options.",
        "dataset_path": "The prompts: a data file in any format prepare reads (each row's conversation up to its last "
                        "assistant turn, rendered with the template's generation prompt; that turn, if any, is the "
                        "row's reference answer), or a dataset directory `glmtune prepare` wrote (the last answer of "
                        "each row is its reference).",
        "enable_thinking": "The chat template's thinking switch when rendering the prompts (data files only: a "
                           "prepared dataset was rendered by prepare). Default: the template's own.",
    }

    reward_funcs: str | None = option(
        "Comma-separated rewards, summed with --reward_weights: accuracy (the answer after any </think> equals the "
        "reference, numbers and whitespace normalised), format (<think>reasoning</think> then an answer), length "
        "(closeness to --length_target tokens), or path/to/file.py:function (your own).")
    length_target: int | None = option("The completion length in tokens the `length` reward favours (default: half "
                                       "of --max_completion_length).")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_at_least_one(self, "length_target")
