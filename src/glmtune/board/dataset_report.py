"""The Data page's report: exactly what `glmtune prepare --dry_run` reports (its own code makes it), the bad rows
with their line and field, and the sample lengths for the histogram against --max_seq_length."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field

from glmtune.board.command_line import glmtune_command
from glmtune.data.formats import BadRow
from glmtune.data.report import MARK_CLOSE, MARK_OPEN, PrepareReport


@dataclass
class DatasetReport:
    report: PrepareReport
    text: str  # what `glmtune prepare --dry_run` printed
    bad_rows: list[BadRow] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)  # tokens per sample before truncation (supervised data only)


def prepare_command(model: str, data: list[str], max_seq_length: int, truncation: str = "right",
                    data_format: str | None = None) -> list[str]:
    """The dry run the page shows; --skip_bad_rows so that bad rows are listed rather than stopping the report."""
    return glmtune_command("prepare", {"model": model, "data": data, "format": data_format,
                                       "max_seq_length": max_seq_length, "truncation": truncation,
                                       "skip_bad_rows": True, "dry_run": True})


def dataset_report(model: str, data: list[str], max_seq_length: int, truncation: str = "right",
                   data_format: str | None = None) -> DatasetReport:
    """Run prepare's dry run in this process and collect what the page shows.

    Raises:
        UserError: what `glmtune prepare` would refuse (a file or model that can't be read, no row to train on).
    """
    from glmtune.arguments import ModelArguments, PrepareArguments
    from glmtune.data.labelled import SUPERVISED, dataset_kind
    from glmtune.data.prepare import load_data, prepare_dataset
    from glmtune.data.tokenize import TokenizeOptions, process_row
    from glmtune.models.loading import load_tokenizer, stop_token_ids

    model_args = ModelArguments(model=model)
    args = PrepareArguments(data=data, format=data_format, max_seq_length=max_seq_length, truncation=truncation,
                            skip_bad_rows=True, dry_run=True)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        report = prepare_dataset(model_args, args)
    loaded = load_data(data, data_format, skip_bad_rows=True)  # the bad rows themselves: the report counts them
    lengths: list[int] = []
    if dataset_kind(loaded.conversations) == SUPERVISED:
        tokenizer = load_tokenizer(model)
        stop_ids = stop_token_ids(model, tokenizer)
        options = TokenizeOptions(max_seq_length, truncation)
        for conversation in loaded.conversations:
            samples = process_row(conversation, tokenizer, stop_ids, options)
            lengths += [s["length"] for s in (samples if isinstance(samples, list) else [samples]) if s["length"]]
    return DatasetReport(report, printed.getvalue().strip(), loaded.bad_rows, lengths)


def histogram(lengths: list[int], max_seq_length: int, bins: int = 20) -> list[tuple[str, int, bool]]:
    """(bin label "lo-hi", samples, over --max_seq_length) for equal-width bins from 1 to the longest sample; a bin
    counts as over the limit when it starts above it."""
    if not lengths:
        return []
    width = -(-max(lengths) // bins)  # ceil
    counts = [0] * -(-max(lengths) // width)
    for n in lengths:
        counts[(max(n, 1) - 1) // width] += 1
    return [(f"{i * width + 1}-{(i + 1) * width}", c, i * width >= max_seq_length) for i, c in enumerate(counts)]


def trained_spans(sample: str) -> list[tuple[str, str | None]]:
    """A report sample split into (text, "trained" or None) pieces at the report's span marks."""
    pieces: list[tuple[str, str | None]] = []
    rest = sample
    while rest:
        start = rest.find(MARK_OPEN)
        if start < 0:
            pieces.append((rest, None))
            break
        end = rest.find(MARK_CLOSE, start)
        end = len(rest) if end < 0 else end
        if start:
            pieces.append((rest[:start], None))
        pieces.append((rest[start + len(MARK_OPEN):end], "trained"))
        rest = rest[end + len(MARK_CLOSE):]
    return pieces
