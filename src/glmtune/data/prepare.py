"""prepare: data file -> tokenized dataset directory (Arrow, `train` split) + manifest.json."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from glmtune.artifacts import atomic_directory, sha256_file, write_manifest
from glmtune.data.conversation import Conversation
from glmtune.data.files import read_rows
from glmtune.data.formats import FORMATS, detect_format, to_conversations
from glmtune.data.templates import IGNORE_INDEX, encode_for_training
from glmtune.errors import UserError


@dataclass
class PrepareReport:
    format: str
    rows_read: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> rows
    tokens: int = 0
    supervised_tokens: int = 0

    def lines(self) -> list[str]:
        dropped = sum(self.dropped.values())
        reasons = ", ".join(f"{n} {reason}" for reason, n in self.dropped.items())
        share = self.supervised_tokens / self.tokens if self.tokens else 0.0
        return [
            f"format:            {self.format}",
            f"rows read:         {self.rows_read}",
            f"rows kept:         {self.kept}",
            f"rows truncated:    {self.truncated} (kept, cut at the end to --max_seq_length)",
            f"rows dropped:      {dropped}" + (f" ({reasons})" if reasons else ""),
            f"tokens:            {self.tokens}",
            f"supervised tokens: {self.supervised_tokens} ({share:.1%} of all tokens)",
        ]


@dataclass
class LoadedData:
    path: Path
    format: str
    rows: list[Any]  # the raw rows, in file order (inference writes them back with a response)
    conversations: list[Conversation]


def load_data(path: Path, format_name: str | None, need_answer: bool = True) -> LoadedData:
    """Read and validate a data file into conversations; every problem is a UserError naming file and row."""
    rows = read_rows(path)
    fmt = FORMATS[format_name] if format_name else detect_format(rows, need_answer)
    conversations = to_conversations(rows, fmt, need_answer)
    return LoadedData(path, fmt.name, [row.data for row in rows], conversations)


def tokenize_conversations(data: LoadedData, tokenizer: Any, stop_ids: list[int],
                           max_seq_length: int) -> tuple[dict[str, list[list[int]]], PrepareReport]:
    """Columns input_ids/labels of every usable row, and the report of what was kept, cut and dropped."""
    from tqdm.auto import tqdm

    report = PrepareReport(format=data.format, rows_read=len(data.rows))
    dropped: Counter[str] = Counter()
    columns: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
    for conversation in tqdm(data.conversations, desc="Tokenizing", unit="row"):
        ids, labels = encode_for_training(tokenizer, conversation, stop_ids)
        cut = len(ids) > max_seq_length
        ids, labels = ids[:max_seq_length], labels[:max_seq_length]
        supervised = sum(label != IGNORE_INDEX for label in labels)
        if supervised == 0:  # nothing to learn from: never train on such a row silently
            dropped["with no supervised token left after truncation"] += 1
            continue
        report.truncated += cut  # rows kept after being cut; dropped ones are counted as dropped only
        columns["input_ids"].append(ids)
        columns["labels"].append(labels)
        report.tokens += len(ids)
        report.supervised_tokens += supervised
    report.kept = len(columns["input_ids"])
    report.dropped = dict(dropped)
    if report.kept == 0:
        raise UserError(f"no row of {data.path} is left to train on", problems=report.lines(),
                        hint="raise --max_seq_length, or check that the rows have answers")
    return columns, report


def save_dataset(columns: dict[str, list[list[int]]], report: PrepareReport, data_path: Path, save_path: Path,
                 overwrite: bool, config: dict[str, Any], **manifest_fields: Any) -> None:
    from datasets import Dataset, DatasetDict

    with atomic_directory(save_path, overwrite, (data_path,)) as tmp:
        DatasetDict({"train": Dataset.from_dict(columns)}).save_to_disk(str(tmp))
        write_manifest(tmp, "prepare", config, inputs={str(data_path): sha256_file(data_path)},
                       **manifest_fields, report=asdict(report))
