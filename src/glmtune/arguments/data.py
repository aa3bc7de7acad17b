"""Where the data comes from and how its rows become training samples: prepare's options, and train's and dpo's
when --dataset_path is a data file (prepared on the fly, see glmtune.data.prepared)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from glmtune.arguments.generation import ThinkingArguments
from glmtune.arguments.options import Options, check_at_least_one, option
from glmtune.arguments.output import OverwriteArguments
from glmtune.arguments.run import SeedArguments
from glmtune.errors import UserError

# glmtune.data.formats.FORMATS as a type (a test keeps them equal), and the truncation rules data/tokenize.py applies.
DataFormat = Literal["sharegpt", "messages", "alpaca", "prompt_response", "prompt_completion", "context_target",
                     "content_summary", "text", "preference", "labelled"]
Truncation = Literal["right", "left", "drop"]


@dataclass
class DataFormatArguments(Options):
    format: DataFormat | None = option("Format of the data files' rows; detected from each file's rows when not "
                                       "given.")


@dataclass
class SequenceLengthArguments(Options):
    """The samples' length, alone: what `plan` estimates with; prepare, train and dpo take `TokenizeArguments`."""

    max_seq_length: int = option("Longest sample in tokens (see --truncation).", default=512)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_seq_length < 2:
            raise UserError(f"--max_seq_length must be at least 2, got {self.max_seq_length}")


@dataclass
class TokenizeArguments(ThinkingArguments, SequenceLengthArguments, DataFormatArguments):  # --format listed first
    """How data files' rows become training samples."""

    help_overrides = {"enable_thinking": "The chat template's thinking switch when rendering the rows, as inference "
                                         "will pass it (false: the template writes /nothink and an empty think "
                                         "block; rows with reasoning are then refused). Models whose template has "
                                         "no switch refuse it. Default: the template's own."}

    truncation: Truncation = option("Rows longer than --max_seq_length: 'right' cuts the end, 'left' cuts the "
                                    "start (oldest turns, then the prompt's start) and keeps the answer whole (a row "
                                    "whose answer alone does not fit is dropped), 'drop' leaves the row out.",
                                    default="right")
    columns: str | None = option("Rename the files' fields, e.g. 'question=instruction,answer=output'.")
    last_turn_only: bool = option("Train on the last assistant turn only (default: every one).", default=False)
    train_on_prompt: bool = option("Take the loss on the prompts too, not only on the answers.", default=False)
    skip_bad_rows: bool = option("Leave bad rows out (counted, and written to a .rejects.jsonl file beside the "
                                 "tokenized dataset) instead of stopping.", default=False)
    val_size: float = option("Rows held out in a `validation` split: a fraction (below 1) or a count.", default=0.0)
    num_proc: int | None = option("Processes that tokenize in parallel.")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.column_map()  # validates
        if self.val_size < 0 or (self.val_size >= 1 and self.val_size != int(self.val_size)):
            raise UserError(f"--val_size must be a fraction below 1 or a whole count, got {self.val_size}")
        check_at_least_one(self, "num_proc")

    def column_map(self) -> dict[str, str]:
        if isinstance(self.columns, dict):  # from a YAML mapping
            return {str(source): str(target) for source, target in self.columns.items()}
        mapping = {}
        for pair in filter(None, (p.strip() for p in (self.columns or "").split(","))):
            source, sep, target = pair.partition("=")
            if not sep or not source.strip() or not target.strip():
                raise UserError(f"--columns: '{pair}' is not of the form file_field=format_field",
                                hint="e.g. --columns question=instruction,answer=output")
            mapping[source.strip()] = target.strip()
        return mapping


@dataclass
class DataFilesArguments(Options):
    # --jsonl_path is the seed's name (tokenize_dataset_rows.py), kept as an alias; YAML files may use either.
    data: list[str] | None = option("Data file(s): JSON array, JSON lines, CSV or Parquet; several may follow the "
                                    "flag.", aliases=["--jsonl_path", "--jsonl-path"])


@dataclass
class PrepareArguments(OverwriteArguments, SeedArguments, TokenizeArguments, DataFilesArguments):  # --data first
    help_overrides = {"seed": "Seed of the validation split's shuffle.",
                      "overwrite_output_dir": "Replace --save_path if it exists."}

    save_path: str | None = option("Directory to write the tokenized dataset to.")
    dry_run: bool = option("Print the report and write nothing.", default=False)
    use_cache: bool = option("Reuse the result of an identical earlier run (same data, tokenizer, template and "
                             "options), kept under HF_HOME/glmtune/prepare.", default=True)


@dataclass
class DatasetPathArguments(Options):
    """A training method's --dataset_path alone (grpo's: it tokenizes prompts, not training samples); each method
    words it through `help_overrides`."""

    dataset_path: str | None = option("Dataset directory written by `glmtune prepare`, or a data file (any format "
                                      "prepare reads).")


@dataclass
class TrainingDataArguments(DatasetPathArguments, OverwriteArguments, TokenizeArguments):  # --dataset_path last
    """A training method's data (train's, dpo's): a prepared dataset or a data file tokenized on the fly with the
    tokenize options; and whether the run may start afresh in an output directory that holds an earlier one."""

    help_overrides = {
        "overwrite_output_dir": "Start afresh in a non-empty --output_dir.",
        "dataset_path": "Dataset directory written by `glmtune prepare`, or a data file (any format prepare reads), "
                        "tokenized here with the options above by the main process alone, into prepare's cache "
                        "(HF_HOME/glmtune/prepare).",
    }


@dataclass
class DatasetArguments(TrainingDataArguments):
    """train's data."""

    packing: bool = option("Put a batch's samples end to end in one row, positions restarting at each, with no "
                           "padding (on for models whose attention keeps packed samples apart; others pad, grouped "
                           "by length).", default=True)
