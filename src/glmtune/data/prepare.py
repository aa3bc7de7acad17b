"""prepare: data files -> tokenized dataset directory (Arrow, `train` split) + manifest.json, and the report
of exactly what the model will be trained on."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from glmtune.artifacts import atomic_directory, atomic_file, sha256_file, write_manifest
from glmtune.data.conversation import Conversation, Message
from glmtune.data.files import Row, read_rows
from glmtune.data.formats import FORMATS, BadRow, detect_format, to_conversations
from glmtune.data.templates import IGNORE_INDEX, encode_for_training
from glmtune.errors import UserError

TRUNCATION_RULES = ("right", "left", "drop")

NO_SUPERVISED = "no supervised token left"
TOO_LONG = "longer than --max_seq_length (--truncation drop)"
SAMPLES_IN_REPORT = 3
MARK_OPEN, MARK_CLOSE = "⟦", "⟧"  # around trained spans in the rendered samples


@dataclass
class PrepareReport:
    format: str
    max_seq_length: int
    rows_read: int = 0
    bad_rows_skipped: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> rows
    truncated: dict[str, int] = field(default_factory=dict)  # rule -> rows kept after being cut
    supervised_tokens_lost: int = 0  # by truncation, in kept and dropped rows
    length_percentiles: dict[str, int] = field(default_factory=dict)  # before truncation
    rows_over_max: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    samples: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        share = self.supervised_tokens / self.tokens if self.tokens else 0.0
        dropped = sum(self.dropped.values())
        lengths = ", ".join(f"{k} {v}" for k, v in self.length_percentiles.items())
        lines = [
            f"format:            {self.format}",
            f"rows read:         {self.rows_read}" + (f" ({self.bad_rows_skipped} bad rows skipped)"
                                                       if self.bad_rows_skipped else ""),
            f"rows kept:         {self.kept}",
            f"rows dropped:      {dropped}" + (" (" + ", ".join(f"{n} {r}" for r, n in self.dropped.items()) + ")"
                                                if dropped else ""),
            f"rows truncated:    {sum(self.truncated.values())}" + (
                " (" + ", ".join(f"{n} cut {rule}" for rule, n in self.truncated.items()) + ")"
                if self.truncated else "") + f"; supervised tokens lost: {self.supervised_tokens_lost}",
            f"lengths (tokens):  {lengths}; {self.rows_over_max} rows over --max_seq_length {self.max_seq_length}",
            f"tokens:            {self.tokens}",
            f"supervised tokens: {self.supervised_tokens} ({share:.1%} of all tokens)",
        ]
        if self.samples:
            lines.append(f"first samples, trained spans between {MARK_OPEN} and {MARK_CLOSE}:")
            lines += [f"--- sample {i}\n{s}" for i, s in enumerate(self.samples, start=1)]
        return lines


@dataclass
class LoadedData:
    paths: list[Path]
    format: str
    rows: list[Any]  # the raw rows of the good conversations, in file order (inference writes them back)
    conversations: list[Conversation]
    bad_rows: list[BadRow]
    rows_read: int


def load_data(paths: list[Path], format_name: str | None, need_answer: bool = True,
              columns: dict[str, str] | None = None, skip_bad_rows: bool = False) -> LoadedData:
    """Read and validate data files into conversations. Each file's format is detected unless given; columns
    maps a file's field names to the format's ({"question": "instruction"})."""
    conversations, rows, bad, formats, rows_read = [], [], [], [], 0
    for path in paths:
        file_rows = [_rename(row, columns) for row in read_rows(path)] if columns else read_rows(path)
        fmt = FORMATS[format_name] if format_name else detect_format(file_rows, need_answer)
        good, file_bad = to_conversations(file_rows, fmt, need_answer, skip_bad_rows)
        bad_locations = {b.location for b in file_bad}
        rows += [row.data for row in file_rows if row.location not in bad_locations]
        conversations += good
        bad += file_bad
        formats.append(fmt.name)
        rows_read += len(file_rows)
    return LoadedData(paths, ",".join(dict.fromkeys(formats)), rows, conversations, bad, rows_read)


def _rename(row: Row, columns: dict[str, str]) -> Row:
    if not isinstance(row.data, dict):
        return row
    return Row(row.location, {columns.get(key, key): value for key, value in row.data.items()})


@dataclass
class TokenizeOptions:
    max_seq_length: int
    truncation: str = "right"  # right: cut the end; left: drop the oldest turns, then cut the start; drop
    last_turn_only: bool = False  # train on the last assistant turn only
    train_on_prompt: bool = False  # take the loss on the prompts too


def tokenize_conversations(data: LoadedData, tokenizer: Any, stop_ids: list[int],
                           options: TokenizeOptions) -> tuple[dict[str, list[list[int]]], PrepareReport]:
    """Columns input_ids/labels of every usable row, and the report of what was kept, cut and dropped."""
    from tqdm.auto import tqdm

    report = PrepareReport(format=data.format, max_seq_length=options.max_seq_length, rows_read=data.rows_read,
                           bad_rows_skipped=len(data.bad_rows))
    dropped: Counter[str] = Counter()
    truncated: Counter[str] = Counter()
    lengths: list[int] = []
    columns: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
    for conversation in tqdm(data.conversations, desc="Tokenizing", unit="row"):
        if options.last_turn_only:
            conversation = _train_last_turn_only(conversation)
        ids, labels = encode_for_training(tokenizer, conversation, stop_ids, options.train_on_prompt)
        lengths.append(len(ids))
        supervised_before = _supervised(labels)
        cut = len(ids) > options.max_seq_length
        if cut and options.truncation == "drop":
            dropped[TOO_LONG] += 1
            report.supervised_tokens_lost += supervised_before
            continue
        if cut:
            ids, labels = _truncate(tokenizer, conversation, stop_ids, options, ids, labels)
        supervised = _supervised(labels)
        report.supervised_tokens_lost += supervised_before - supervised
        if supervised == 0:  # nothing to learn from: never train on such a row silently
            dropped[NO_SUPERVISED + (" after truncation" if cut else "")] += 1
            continue
        truncated[options.truncation] += cut
        columns["input_ids"].append(ids)
        columns["labels"].append(labels)
        report.tokens += len(ids)
        report.supervised_tokens += supervised
        if len(report.samples) < SAMPLES_IN_REPORT:
            report.samples.append(render_trained_spans(tokenizer, ids, labels))
    report.kept = len(columns["input_ids"])
    report.dropped = dict(dropped)
    report.truncated = {rule: n for rule, n in truncated.items() if n}
    report.length_percentiles = _percentiles(lengths)
    report.rows_over_max = sum(n > options.max_seq_length for n in lengths)
    if report.kept == 0:
        raise UserError(f"no row of {', '.join(map(str, data.paths))} is left to train on",
                        problems=report.lines(), hint="raise --max_seq_length, or check that the rows have answers")
    return columns, report


def _train_last_turn_only(conversation: Conversation) -> Conversation:
    trained = [i for i, m in enumerate(conversation.messages) if m.train]
    return dataclasses.replace(conversation, messages=[
        Message(m.role, m.content, m.train and i == trained[-1]) for i, m in enumerate(conversation.messages)])


def _truncate(tokenizer: Any, conversation: Conversation, stop_ids: list[int], options: TokenizeOptions,
              ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    limit = options.max_seq_length
    if options.truncation == "right":
        return ids[:limit], labels[:limit]
    # left: keep the end of the conversation and its last answer. Drop whole earlier exchanges first, so the
    # template's opening tokens stay; only if the last exchange alone is too long, cut its start.
    if conversation.text is None:
        starts = [i for i, m in enumerate(conversation.messages) if m.role == "user" and i > 0]
        for start in starts:
            shorter = dataclasses.replace(conversation, messages=conversation.messages[start:])
            ids, labels = encode_for_training(tokenizer, shorter, stop_ids, options.train_on_prompt)
            if len(ids) <= limit:
                return ids, labels
    return ids[-limit:], labels[-limit:]


def _supervised(labels: list[int]) -> int:
    return sum(label != IGNORE_INDEX for label in labels)


def _percentiles(lengths: list[int]) -> dict[str, int]:
    ordered = sorted(lengths)
    if not ordered:
        return {}
    pick = {"p50": 0.5, "p90": 0.9, "p99": 0.99}
    out = {name: ordered[min(len(ordered) - 1, int(q * len(ordered)))] for name, q in pick.items()}
    return {**out, "max": ordered[-1]}


def render_trained_spans(tokenizer: Any, ids: list[int], labels: list[int]) -> str:
    """The sample as text, with every trained span between MARK_OPEN and MARK_CLOSE."""
    parts, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or (labels[i] == IGNORE_INDEX) != (labels[start] == IGNORE_INDEX):
            text = tokenizer.decode(ids[start:i])
            parts.append(text if labels[start] == IGNORE_INDEX else f"{MARK_OPEN}{text}{MARK_CLOSE}")
            start = i
    return "".join(parts)


def save_dataset(columns: dict[str, list[list[int]]], report: PrepareReport, data: LoadedData, save_path: Path,
                 overwrite: bool, config: dict[str, Any], **manifest_fields: Any) -> Path | None:
    """Write the dataset directory, and the skipped bad rows to a rejects file beside it; returns that file."""
    from datasets import Dataset, DatasetDict

    rejects = rejects_path(save_path) if data.bad_rows else None
    with atomic_directory(save_path, overwrite, tuple(data.paths)) as tmp:
        DatasetDict({"train": Dataset.from_dict(columns)}).save_to_disk(str(tmp))
        write_manifest(tmp, "prepare", config, inputs={str(p): sha256_file(p) for p in data.paths},
                       **manifest_fields, report=asdict(report))
        if rejects is not None:
            with atomic_file(rejects, overwrite=True) as tmp_rejects:
                tmp_rejects.write_text("".join(json.dumps({"location": b.location, "problem": b.problem,
                                                           "row": b.data}, ensure_ascii=False) + "\n"
                                               for b in data.bad_rows), encoding="utf-8")
    return rejects


def rejects_path(save_path: Path) -> Path:
    return save_path.parent / f"{save_path.name}.rejects.jsonl"
