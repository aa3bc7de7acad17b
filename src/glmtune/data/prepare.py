"""prepare: data files -> conversations -> tokenized dataset directory (Arrow: `train` split, optionally
`validation`) + manifest.json, with a cache of earlier identical runs."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from glmtune import __version__
from glmtune.artifacts import atomic_directory, atomic_file, check_writable_output, sha256_text, write_manifest
from glmtune.config import to_plain_dict
from glmtune.data.conversation import Conversation
from glmtune.data.files import Row, read_source
from glmtune.data.formats import FORMATS, BadRow, detect_format, to_conversations
from glmtune.data.labelled import (
    LABELLED,
    LABELLED_COLUMNS,
    PAIRS,
    SUPERVISED,
    check_both_labels,
    dataset_kind,
    labelled_samples,
    tokenize_labelled,
)
from glmtune.data.preference import PREFERENCE_COLUMNS, pair_samples, tokenize_preferences
from glmtune.data.report import PrepareReport, build_report
from glmtune.data.templates import check_reasoning
from glmtune.data.tokenize import TokenizeOptions, tokenize_dataset
from glmtune.disk import DiskFull
from glmtune.errors import UserError

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict

    from glmtune.arguments import ModelArguments, PrepareArguments


def prepare_dataset(model_args: ModelArguments, args: PrepareArguments) -> PrepareReport:
    """Tokenize `args.data` with the model's tokenizer and chat template into the dataset directory
    `args.save_path` (nothing written with `args.dry_run`), printing the report; `glmtune prepare` and a training
    run's data file (glmtune.data.prepared) both go through it.

    Args:
        model_args: --model, whose tokenizer and chat template decide the tokens, and --trust_remote_code.
        args: prepare's options: the data files, their format, save_path, max_seq_length and truncation,
            val_size, the cache, dry_run.
    Returns:
        The report: rows read, kept, cut and dropped, lengths, and the first samples with their trained spans.
    Raises:
        UserError: a missing option, a file or model that can't be read, bad rows (unless `args.skip_bad_rows`),
            an existing `save_path` without `args.overwrite_output_dir`, no row left to train on, or a --val_size
            that leaves no rows on one side.
    """
    if not args.data or (not args.save_path and not args.dry_run):
        raise UserError("--data and --save_path are required (--save_path not with --dry_run)",
                        hint="glmtune prepare --data DATA.json --save_path DIR --model MODEL")
    if not model_args.model:
        raise UserError("--model is required: its tokenizer and chat template decide the tokens")
    data_paths = [Path(p) for p in args.data]
    save_path = Path(args.save_path) if args.save_path else None
    if save_path is not None and not args.dry_run:
        check_writable_output(save_path, args.overwrite_output_dir, "directory", tuple(data_paths))

    # Bad rows stop us before any model is loaded.
    data = load_data(args.data, args.format, columns=args.column_map(), skip_bad_rows=args.skip_bad_rows)
    from glmtune.models.hub import canonical_model_name  # imports torch and transformers: not for --help
    from glmtune.models.loading import load_tokenizer, stop_token_ids, tokenizer_fingerprint

    tokenizer = load_tokenizer(model_args.model, model_args.trust_remote_code)
    stop_ids = stop_token_ids(model_args.model, tokenizer)
    fingerprint = tokenizer_fingerprint(tokenizer)
    check_reasoning(tokenizer, data.conversations, args.enable_thinking)
    options = TokenizeOptions(args.max_seq_length, args.truncation, args.last_turn_only, args.train_on_prompt,
                              args.enable_thinking)
    key = cache_key(data, tokenizer=fingerprint, stop_ids=stop_ids, options=asdict(options),
                    columns=args.column_map(), skip_bad_rows=args.skip_bad_rows)
    kept, report = tokenize_with_cache(data, tokenizer, stop_ids, options, args.num_proc,
                                       default_cache_root() if args.use_cache else None, key)
    splits = split_validation(kept, args.val_size, args.seed)
    report.validation_rows = len(splits["validation"]) if "validation" in splits else 0

    print("\n".join(["", "Dataset report" + (" (dry run: nothing written)" if args.dry_run else ""),
                     *report.lines()]))
    if save_path is None or args.dry_run:
        return report
    rejects = save_dataset(splits, report, data, save_path, args.overwrite_output_dir,
                           to_plain_dict(model_args, args), model=canonical_model_name(model_args.model),
                           tokenizer_fingerprint=fingerprint, stop_ids=stop_ids)
    print(f"saved to:          {save_path}" + (f"\nbad rows written to {rejects}" if rejects else ""))
    return report


@dataclass
class LoadedData:
    inputs: dict[str, str]  # file path or hub name -> hash of its content
    format: str
    rows: list[Any]  # the raw rows of the good conversations, in file order (inference writes them back)
    conversations: list[Conversation]
    bad_rows: list[BadRow]
    rows_read: int


def load_data(sources: list[str], format_name: str | None, need_answer: bool = True,
              columns: dict[str, str] | None = None, skip_bad_rows: bool = False) -> LoadedData:
    """Read and validate data files into conversations.

    Args:
        sources: data files (JSON, JSON lines, CSV, Parquet) or hub dataset names.
        format_name: the format every file is in; None to detect each file's.
        need_answer: rows must carry the answer (training and eval; not infer).
        columns: a file's field names mapped to the format's ({"question": "instruction"}).
        skip_bad_rows: keep going past malformed rows (returned in `bad`) instead of refusing them.
    Returns:
        The conversations, the rows they came from, the bad rows, each file's format and content hash.
    Raises:
        UserError: a file that can't be read, a format that can't be detected, or bad rows without
            `skip_bad_rows`.
    """
    conversations, rows, bad, formats, rows_read, inputs = [], [], [], [], 0, {}
    for source in sources:
        file_rows, inputs[source] = read_source(source)
        if columns:
            file_rows = [_rename(row, columns) for row in file_rows]
        fmt = FORMATS[format_name] if format_name else detect_format(file_rows, need_answer)
        good, file_bad = to_conversations(file_rows, fmt, need_answer, skip_bad_rows)
        bad_locations = {b.location for b in file_bad}  # malformed JSON lines among them
        rows += [row.data for row in file_rows if row.location not in bad_locations]
        conversations += good
        bad += file_bad
        formats.append(fmt.name)
        rows_read += len(file_rows)
    return LoadedData(inputs, ",".join(dict.fromkeys(formats)), rows, conversations, bad, rows_read)


def _rename(row: Row, columns: dict[str, str]) -> Row:
    if not isinstance(row.data, dict):
        return row
    return Row(row.location, {columns.get(key, key): value for key, value in row.data.items()})


def tokenize_with_cache(data: LoadedData, tokenizer: Any, stop_ids: list[int], options: TokenizeOptions,
                        num_proc: int | None, cache_root: Path | None, key: str) -> tuple[Any, PrepareReport]:
    """The kept rows (input_ids, labels) and the report. A second run with the same key (data, tokenizer,
    template, options) reuses the cached result instead of tokenizing again."""
    from datasets import load_from_disk

    entry = cache_root / key if cache_root is not None else None
    if entry is not None and (entry / "report.json").is_file():
        logger.debug(f"reusing the prepare cache entry {entry}")  # what to delete when a reuse surprises
        report = PrepareReport(**json.loads((entry / "report.json").read_text(encoding="utf-8")))
        report.reused_cache = True
        return load_from_disk(str(entry / "dataset")), report

    if not data.conversations:
        raise UserError(f"every row of {', '.join(data.inputs)} is bad ({len(data.bad_rows)} skipped)",
                        problems=[f"{b.location}: {b.problem}" for b in data.bad_rows[:20]])
    report = PrepareReport(format=data.format, max_seq_length=options.max_seq_length, rows_read=data.rows_read,
                           bad_rows_skipped=len(data.bad_rows))
    kind = dataset_kind(data.conversations)
    tokenize = TOKENIZE[kind]
    tokenized = tokenize(data.conversations, tokenizer, stop_ids, options, num_proc, key)
    report = build_report(report, tokenized, tokenizer, options.truncation)
    if kind == PAIRS:  # both answers shown, not only the chosen one
        report.samples = pair_samples(tokenizer, tokenized, len(report.samples))
    elif kind == LABELLED:  # each answer with its label
        report.samples = labelled_samples(tokenizer, tokenized, len(report.samples))
    if report.kept == 0:
        raise UserError(f"no row of {', '.join(data.inputs)} is left to train on",
                        problems=report.lines(), hint="raise --max_seq_length, or check that the rows have answers")
    kept = tokenized.filter(lambda reason: not reason, input_columns="dropped").select_columns(COLUMNS[kind])
    if kind == LABELLED:
        report.desirable = sum(kept["label"])
        report.undesirable = len(kept) - report.desirable
        check_both_labels(report.desirable, report.undesirable, f"the kept rows of {', '.join(data.inputs)}")
    if entry is not None:
        try:
            with atomic_directory(entry, overwrite=True) as tmp:
                kept.save_to_disk(str(tmp / "dataset"))
                (tmp / "report.json").write_text(json.dumps(asdict(report), ensure_ascii=False), encoding="utf-8")
        except (OSError, DiskFull) as e:  # a read-only or full cache must not fail the run: the result is in hand
            logger.warning(f"could not write the prepare cache {entry}: {e}")
    return kept, report


TOKENIZE = {SUPERVISED: tokenize_dataset, PAIRS: tokenize_preferences, LABELLED: tokenize_labelled}
COLUMNS = {SUPERVISED: ["input_ids", "labels"], PAIRS: PREFERENCE_COLUMNS, LABELLED: LABELLED_COLUMNS}


def cache_key(data: LoadedData, **settings: Any) -> str:
    """A hash of everything that decides the tokenized result, the code that reads and renders data included, and
    glmtune's own tokenizer classes (how they encode text can change while their vocabulary, and so the tokenizer's
    fingerprint, stays the same)."""
    from glmtune.models.chatglm import official_encode  # the package of glmtune's own tokenizer classes

    sources = [*Path(__file__).parent.glob("*.py"), *Path(official_encode.__file__).parent.glob("*.py")]
    code = "".join(sorted(p.read_text(encoding="utf-8") for p in sources))
    fields = {"version": __version__, "code": sha256_text(code), "inputs": list(data.inputs.values()),
              "format": data.format,
              "rows": data.rows_read, "bad_rows": len(data.bad_rows), **settings}
    return sha256_text(json.dumps(fields, sort_keys=True, default=str))[:32]


def default_cache_root() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "glmtune" / "prepare"


def split_validation(kept: Dataset, val_size: float, seed: int) -> DatasetDict:
    """DatasetDict with `train`, and `validation` when val_size > 0 (a fraction below 1, else a row count)."""
    from datasets import DatasetDict

    if not val_size:
        return DatasetDict({"train": kept})
    count = round(val_size * len(kept)) if val_size < 1 else int(val_size)
    if not 1 <= count < len(kept):
        raise UserError(f"--val_size {val_size} leaves {count} validation rows of {len(kept)}",
                        hint="the validation split needs at least one row, and the train split too")
    split = kept.train_test_split(test_size=count, seed=seed, shuffle=True)
    return DatasetDict({"train": split["train"], "validation": split["test"]})


def save_dataset(splits: DatasetDict, report: PrepareReport, data: LoadedData, save_path: Path,
                 overwrite: bool, config: dict[str, Any], **manifest_fields: Any) -> Path | None:
    """Write the dataset directory, and the skipped bad rows to a rejects file beside it; returns that file."""
    rejects = rejects_path(save_path) if data.bad_rows else None
    # "preference" (pairs or labelled rows: what the released code checks) and "kind", which tells them apart
    kind = dataset_kind(data.conversations)
    # Each split's share of the Arrow table under it (filter and the validation split keep the whole table).
    arrow_bytes = sum(split.data.nbytes * split.num_rows // max(split.data.num_rows, 1) for split in splits.values())
    with atomic_directory(save_path, overwrite, tuple(map(Path, data.inputs)), "the prepared dataset",
                          arrow_bytes) as tmp:
        splits.save_to_disk(str(tmp))
        write_manifest(tmp, "prepare", config, inputs=data.inputs,
                       preference=kind != SUPERVISED, kind=kind, **manifest_fields, report=asdict(report))
        if rejects is not None:
            with atomic_file(rejects, overwrite=True, what="the rejected rows") as tmp_rejects:
                tmp_rejects.write_text("".join(json.dumps({"location": b.location, "problem": b.problem,
                                                           "row": b.data}, ensure_ascii=False) + "\n"
                                               for b in data.bad_rows), encoding="utf-8")
    return rejects


def rejects_path(save_path: Path) -> Path:
    return save_path.parent / f"{save_path.name}.rejects.jsonl"
