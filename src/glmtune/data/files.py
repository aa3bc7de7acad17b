"""Read rows from JSON-array, JSON-lines, CSV and Parquet files, naming file:line for anything malformed."""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glmtune.artifacts import sha256_file
from glmtune.errors import UserError
from glmtune.hub import offline_reason


@dataclass
class Row:
    location: str  # "file:line" (JSON lines) or "file row N" (JSON array), for error messages
    data: Any


HUB_NAME = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
FILE_SUFFIXES = {".json", ".jsonl", ".csv", ".parquet"}


def read_source(source: str) -> tuple[list[Row], str]:
    """The rows of a data file, or of a dataset on the Hugging Face hub (its `train` split), and a hash that
    identifies the content (for manifests and the cache)."""
    path = Path(source)
    if not path.exists() and path.suffix.lower() not in FILE_SUFFIXES and HUB_NAME.match(source):
        return _read_hub_dataset(source)
    return read_rows(path), sha256_file(path)


def _read_hub_dataset(name: str) -> tuple[list[Row], str]:
    why = offline_reason()
    if why:
        raise UserError(f"'{name}' is not a local file, and as a hub dataset it can't be loaded: {why}",
                        hint="pass a local JSON, JSON-lines, CSV or Parquet file")
    from datasets import load_dataset

    try:
        dataset = load_dataset(name, split="train")
    except Exception as e:  # datasets raises many types for a missing or unreadable dataset
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load the hub dataset '{name}': {first}") from None
    rows = [Row(f"{name} row {i}", record) for i, record in enumerate(dataset.to_list())]
    return rows, f"hub:{name}:{dataset._fingerprint}"


def read_rows(path: Path) -> list[Row]:
    """All rows of a data file: .csv, .parquet, or JSON (an array, or one object per line, whatever the suffix)."""
    if not path.exists():
        raise UserError(f"data file {path} does not exist", hint="check the path given to --jsonl_path/--input")
    if path.is_dir():
        raise UserError(f"{path} is a directory, expected a JSON, JSON-lines, CSV or Parquet file")
    if path.suffix.lower() == ".parquet":
        rows = _read_parquet(path)
    else:
        text = _read_text(path)
        if path.suffix.lower() == ".csv":
            rows = _read_csv(path, text)
        elif text.lstrip().startswith("["):
            rows = _read_json_array(path, text)
        else:
            rows = _read_json_lines(path, text)
    if not rows:
        raise UserError(f"{path} holds no rows: expected a JSON array of objects or one JSON object per line")
    return rows


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # tolerate a UTF-8 byte-order mark
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: the file is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset "
                        f"{e.start})", hint="re-save the file as UTF-8") from None
    if not text.strip():
        raise UserError(f"{path} is empty: expected a JSON array of objects or one JSON object per line")
    return text


def _read_csv(path: Path, text: str) -> list[Row]:
    """A header line of field names, then one row per line (every value a string)."""
    reader = csv.DictReader(io.StringIO(text, newline=""))  # quoted cells may hold newlines
    rows = []
    try:
        for record in reader:
            if None in record:  # more cells than header names
                raise UserError(f"{path}:{reader.line_num}: more values than the header has columns")
            rows.append(Row(f"{path}:{reader.line_num}", dict(record)))
    except csv.Error as e:
        raise UserError(f"{path}:{reader.line_num}: invalid CSV ({e})") from None
    return rows


def _read_parquet(path: Path) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise UserError(f"{path}: not a readable Parquet file ({e})") from None
    return [Row(f"{path} row {i}", record) for i, record in enumerate(table.to_pylist())]


def _read_json_array(path: Path, text: str) -> list[Row]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}:{e.colno}: invalid JSON ({e.msg})",
                        hint="the file starts with '[' so it is read as one JSON array; is it cut off?") from None
    if not isinstance(data, list):  # e.g. "[1] [2]" can't parse, but a top-level value other than a list can't be rows
        raise UserError(f"{path}: expected a JSON array of objects")
    return [Row(f"{path} row {i}", item) for i, item in enumerate(data)]


@dataclass
class MalformedLine:
    """A JSON line that doesn't parse: a bad row like any other (reported, or skipped with --skip_bad_rows)."""

    text: str
    problem: str


def _read_json_lines(path: Path, text: str) -> list[Row]:
    rows = []
    # split("\n"), not splitlines(): JSON strings may hold U+2028/U+2029/U+0085 raw, which splitlines() breaks on.
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            rows.append(Row(f"{path}:{number}", json.loads(line)))
        except json.JSONDecodeError as e:
            problem = f"invalid JSON at column {e.colno} ({e.msg}), read as JSON lines: {line[:80]!r}"
            rows.append(Row(f"{path}:{number}", MalformedLine(line, problem)))
    return rows
