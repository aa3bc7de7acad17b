"""Tokenizing conversations for training: the truncation policy per row, and the batched, parallel map over a
whole dataset (datasets.map with num_proc), with per-row statistics for the report."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from glmtune.data.control import encode_marked_batch, mark_conversation
from glmtune.data.conversation import Conversation
from glmtune.data.single_render import training_text_once
from glmtune.data.templates import (
    IGNORE_INDEX,
    AnswerNotLocated,
    RowNotRenderable,
    TrainingText,
    encode_for_training,
    end_token,
    label_training_text,
    training_text,
)
from glmtune.data.truncation import cut_left
from glmtune.data.turns import split_by_turn

NO_SUPERVISED = "no supervised token left"
TOO_LONG = "longer than --max_seq_length (--truncation drop)"


@dataclass(frozen=True)
class TokenizeOptions:
    max_seq_length: int
    truncation: str = "right"  # right: cut the end; left: cut the start, keeping the answer (data/truncation.py); drop
    last_turn_only: bool = False  # train on the last assistant turn only
    train_on_prompt: bool = False  # take the loss on the prompts too
    enable_thinking: bool | None = None  # the chat template's thinking switch (None: its default)


def process_row(conversation: Conversation, tokenizer: Any, stop_ids: list[int],
                options: TokenizeOptions) -> list[dict[str, Any]]:
    """A row's training samples: one, or one per trained assistant turn where the chat template writes a turn
    differently in history than when it is generated (data/turns.py; not with --last_turn_only). The first sample
    of a split row says in `split` how many it became."""
    return process_rows([conversation], tokenizer, stop_ids, options)


def process_rows(conversations: list[Conversation], tokenizer: Any, stop_ids: list[int],
                 options: TokenizeOptions) -> list[dict[str, Any]]:
    """process_row of each conversation, their samples in order, the renderings encoded in one batch call
    (control.encode_marked_batch): the same ids as one call per row, with less time in Python."""
    samples: list[tuple[_Rendered | RowNotRenderable, int | None, int]] = []  # (rendered, next token, split)
    for conversation in conversations:  # rendered row by row, so that an error names the first row that has one
        turns = None if options.last_turn_only else split_by_turn(tokenizer, conversation, stop_ids,
                                                                  options.enable_thinking)
        if turns is None:
            samples.append((_render(conversation, tokenizer, options), None, 0))
        else:
            samples += [(_render(turn, tokenizer, options), following, len(turns) if k == 0 else 0)
                        for k, (turn, following) in enumerate(turns)]
    texts = [r.text.text for r, _, _ in samples if isinstance(r, _Rendered) and r.text is not None]
    encoded = iter(encode_marked_batch(tokenizer, texts))
    last = end_token(tokenizer, stop_ids)  # what encode_for_training appends at a conversation's end
    results = []
    for rendered, following, split in samples:
        text_encoded = next(encoded) if isinstance(rendered, _Rendered) and rendered.text is not None else None
        result = _sample(rendered, text_encoded, tokenizer, stop_ids, options,
                         following if following is not None else last)
        if split:
            result["split"] = split
        results.append(result)
    return results


def process_conversation(conversation: Conversation, tokenizer: Any, stop_ids: list[int],
                         options: TokenizeOptions, next_token: int | None = None) -> dict[str, Any]:
    """One row's input_ids/labels after the truncation policy, and what happened to it. `next_token`: the stop
    token after its last answer (see encode_for_training)."""
    return _sample(_render(conversation, tokenizer, options), None, tokenizer, stop_ids, options, next_token)


@dataclass(frozen=True)
class _Rendered:
    conversation: Conversation  # as rendered: its last answer alone trained where the template rewrites history
    text: TrainingText | None  # None: a plain-text row (no template)
    history_untrained: bool


def _render(conversation: Conversation, tokenizer: Any, options: TokenizeOptions) -> _Rendered | RowNotRenderable:
    """A sample's rendering, or why the row can't be rendered (it is then dropped and counted, the run goes on)."""
    if options.last_turn_only:
        conversation = _train_last_turn_only(conversation)
    if conversation.text is not None:
        return _Rendered(conversation, None, False)
    try:
        try:
            return _Rendered(conversation, _training_text(tokenizer, conversation, options), False)
        except AnswerNotLocated:
            # Templates that write earlier answers as plain history, unlike the last one (ChatGLM-6B's "[Round i]"
            # prompts): the last answer is still trained, the earlier ones stay context, as the model's own training
            # did. Counted in the report.
            last_only = _train_last_turn_only(conversation)
            if last_only == conversation:
                raise
            return _Rendered(last_only, _training_text(tokenizer, last_only, options), True)
    except RowNotRenderable as problem:
        return problem


def _training_text(tokenizer: Any, conversation: Conversation, options: TokenizeOptions) -> TrainingText:
    """templates.training_text, from one rendering where that locates the answer as its two would
    (data/single_render.py)."""
    once = training_text_once(tokenizer, mark_conversation(tokenizer, conversation), options.enable_thinking)
    return once or training_text(tokenizer, conversation, options.enable_thinking)


def _sample(rendered: _Rendered | RowNotRenderable, encoded: tuple[list[int], Sequence[int]] | None, tokenizer: Any,
            stop_ids: list[int], options: TokenizeOptions, next_token: int | None) -> dict[str, Any]:
    """A rendered sample's input_ids/labels after the truncation policy, and its statistics for the report."""
    if isinstance(rendered, RowNotRenderable):
        return {"input_ids": [], "labels": [], "length": 0, "tokens": 0, "supervised_before": 0, "supervised": 0,
                "cut": False, "dropped": rendered.reason, "history_untrained": False, "split": 0,
                "prompt_cut": 0, "answer_cut": 0}
    conversation = rendered.conversation
    # Encoded without --train_on_prompt: the labels then mark the answers, which truncation keeps and counts.
    encode = functools.partial(encode_for_training, tokenizer, stop_ids=stop_ids, train_on_prompt=False,
                               enable_thinking=options.enable_thinking, next_token=next_token)
    if rendered.text is None:
        ids, labels = encode(conversation)
    else:
        ids, labels = label_training_text(tokenizer, rendered.text, stop_ids, encoded, next_token=next_token)
    length, answer_before = len(ids), _supervised(labels)
    cut = length > options.max_seq_length
    dropped = ""
    if cut and options.truncation == "drop":
        ids, labels, dropped = [], [], TOO_LONG
    elif cut and options.truncation == "left":
        ids, labels, dropped = cut_left(tokenizer, encode, conversation, options.max_seq_length, ids, labels)
    elif cut:
        ids, labels = ids[: options.max_seq_length], labels[: options.max_seq_length]
    answer_cut = answer_before - _supervised(labels)
    prompt_cut = max(0, (length - answer_before) - (len(ids) - _supervised(labels)))
    if options.train_on_prompt:
        labels = list(ids)
    supervised = _supervised(labels)
    if not dropped and supervised == 0:  # nothing to learn from: never train on such a row silently
        dropped = NO_SUPERVISED + (" after truncation" if cut else "")
    return {"input_ids": ids, "labels": labels, "length": length, "tokens": len(ids),
            "supervised_before": length if options.train_on_prompt else answer_before, "supervised": supervised,
            "cut": cut, "dropped": dropped, "history_untrained": rendered.history_untrained, "split": 0,
            "prompt_cut": prompt_cut, "answer_cut": answer_cut}


def tokenize_dataset(conversations: list[Any], tokenizer: Any, stop_ids: list[int],
                     options: TokenizeOptions, num_proc: int | None, fingerprint: str,
                     process: Callable[..., dict[str, Any] | list[dict[str, Any]]] = process_row,
                     read: Callable[[dict[str, Any]], Any] = Conversation.from_record) -> Any:
    """All rows tokenized (kept and dropped, with their statistics), as a datasets.Dataset. `process` turns one row
    into its columns (or into several samples' columns), `read` rebuilds a row from its Arrow record (preference
    pairs have their own) where worker processes read them."""
    from datasets import Dataset
    from datasets.utils import tqdm

    def tokenize_rows(rows: list[Any]) -> dict[str, list[Any]]:
        if process is process_row:  # the supervised rows: all the batch's renderings encoded in one call
            results = process_rows(rows, tokenizer, stop_ids, options)
        else:
            results = []
            for row in rows:
                processed = process(row, tokenizer, stop_ids, options)
                results += processed if isinstance(processed, list) else [processed]
        return {key: [r[key] for r in results] for key in results[0]}

    if num_proc in (None, 1):
        # In this process, without datasets.map: it would write the rows into an Arrow table and read each batch back
        # into Python first (a fifth of the time on alpaca_9k with GLM-4's tokenizer), and for num_proc 1 start a
        # worker, pickling a 150k-token tokenizer into it and the rows back (0.3x a plain loop). The columns become
        # one table, typed as map types them (datasets' optimized types: input_ids int32).
        columns: dict[str, list[Any]] = {}
        with tqdm(total=len(conversations), desc="Tokenizing", unit=" examples") as progress:
            for start in range(0, len(conversations), _BATCH):
                with _collector_paused():
                    batch = tokenize_rows(conversations[start: start + _BATCH])
                for key, values in batch.items():
                    columns.setdefault(key, []).extend(values)
                progress.update(min(_BATCH, len(conversations) - start))
        return Dataset.from_dict(columns)

    records = Dataset.from_list([c.to_record() for c in conversations])

    def tokenize_batch(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        return tokenize_rows([read(dict(zip(batch, values, strict=True))) for values in zip(*batch.values(),
                                                                                               strict=True)])

    # new_fingerprint: datasets would otherwise try to hash the tokenizer in the closure.
    with _tokenizers_parallelism_kept():
        return records.map(tokenize_batch, batched=True, batch_size=_BATCH, num_proc=num_proc,
                           remove_columns=records.column_names, desc="Tokenizing", new_fingerprint=fingerprint)


_BATCH = 256  # rows whose renderings are encoded in one call


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the block (a batch of rows). Tokenizing makes many short-lived lists
    and dicts and few cycles, and the collections they set off walked every object alive, the conversations among
    them (alpaca_9k: half a million objects; 0.1-0.3 s of a 2 s run). Between batches it runs as usual, so the
    cycles a batch leaves (a refused row's exception and its frames) are collected as they would be."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@contextlib.contextmanager
def _tokenizers_parallelism_kept() -> Iterator[None]:
    """TOKENIZERS_PARALLELISM as it was after the block. datasets' map with num_proc sets it to false for its worker
    processes and then puts back a copy of os.environ, which leaves false in the process's own environment, the one
    the tokenizers library reads: every later batch encoded in this process would take one core (a serial prepare
    after a parallel one: about 1.2x slower on alpaca_9k, 2 cores)."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    try:
        yield
    finally:
        set_environment_variable("TOKENIZERS_PARALLELISM", before)


def set_environment_variable(name: str, value: str | None) -> None:
    """`name` set to `value` (None: unset) in os.environ and in the process's own environment, whichever object
    os.environ now is (datasets replaces it with a copy, which still writes through when set)."""
    if value is None:
        os.environ.pop(name, None)
        os.unsetenv(name)  # (os.environ may not hold it while the process's environment does)
    else:
        os.environ[name] = value


def _train_last_turn_only(conversation: Conversation) -> Conversation:
    trained = [i for i, m in enumerate(conversation.messages) if m.train]
    if not trained:
        return conversation
    return dataclasses.replace(conversation, messages=[
        dataclasses.replace(m, train=m.train and i == trained[-1]) for i, m in enumerate(conversation.messages)])


def _supervised(labels: list[int]) -> int:
    return len(labels) - labels.count(IGNORE_INDEX)  # list.count runs in C: 10x a generator sum
