"""Tokenizing conversations for training: the truncation policy per row, and the batched, parallel map over a
whole dataset (datasets.map with num_proc), with per-row statistics for the report."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from glmtune.data.conversation import Conversation
from glmtune.data.templates import IGNORE_INDEX, AnswerNotLocated, RowNotRenderable, encode_for_training
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
    turns = None if options.last_turn_only else split_by_turn(tokenizer, conversation, stop_ids,
                                                              options.enable_thinking)
    if turns is None:
        return [process_conversation(conversation, tokenizer, stop_ids, options)]
    samples = [process_conversation(turn, tokenizer, stop_ids, options, next_token=following)
               for turn, following in turns]
    samples[0]["split"] = len(samples)
    return samples


def process_conversation(conversation: Conversation, tokenizer: Any, stop_ids: list[int],
                         options: TokenizeOptions, next_token: int | None = None) -> dict[str, Any]:
    """One row's input_ids/labels after the truncation policy, and what happened to it. `next_token`: the stop
    token after its last answer (see encode_for_training)."""
    if options.last_turn_only:
        conversation = _train_last_turn_only(conversation)
    history_untrained = False
    # Encoded without --train_on_prompt: the labels then mark the answers, which truncation keeps and counts.
    encode = functools.partial(encode_for_training, tokenizer, stop_ids=stop_ids, train_on_prompt=False,
                               enable_thinking=options.enable_thinking, next_token=next_token)
    try:
        try:
            ids, labels = encode(conversation)
        except AnswerNotLocated:
            # Templates that write earlier answers as plain history, unlike the last one (ChatGLM-6B's "[Round i]"
            # prompts): the last answer is still trained, the earlier ones stay context, as the model's own training
            # did. Counted in the report.
            last_only = _train_last_turn_only(conversation)
            if last_only == conversation:
                raise
            ids, labels = encode(last_only)
            conversation, history_untrained = last_only, True
    except RowNotRenderable as problem:  # this row only: it is dropped and counted, the run goes on
        return {"input_ids": [], "labels": [], "length": 0, "tokens": 0, "supervised_before": 0, "supervised": 0,
                "cut": False, "dropped": problem.reason, "history_untrained": False, "split": 0,
                "prompt_cut": 0, "answer_cut": 0}
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
            "cut": cut, "dropped": dropped, "history_untrained": history_untrained, "split": 0,
            "prompt_cut": prompt_cut, "answer_cut": answer_cut}


def tokenize_dataset(conversations: list[Conversation], tokenizer: Any, stop_ids: list[int],
                     options: TokenizeOptions, num_proc: int | None, fingerprint: str,
                     process: Callable[..., dict[str, Any] | list[dict[str, Any]]] = process_row,
                     read: Callable[[dict[str, Any]], Conversation] = Conversation.from_record) -> Any:
    """All rows tokenized (kept and dropped, with their statistics), as a datasets.Dataset. `process` turns one row
    into its columns (or into several samples' columns), `read` rebuilds a row from its Arrow record (preference
    pairs have their own)."""
    from datasets import Dataset

    records = Dataset.from_list([c.to_record() for c in conversations])

    def tokenize_batch(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
        results = []
        for r in rows:
            processed = process(read(r), tokenizer, stop_ids, options)
            results += processed if isinstance(processed, list) else [processed]
        return {key: [r[key] for r in results] for key in results[0]}

    # new_fingerprint: datasets would otherwise try to hash the tokenizer in the closure. num_proc 1 maps in this
    # process: datasets would start a worker for it, and pickling a 150k-token tokenizer into it and the rows back
    # cost more than the tokenizing itself (0.3x a plain loop on alpaca_9k with GLM-4's tokenizer).
    return records.map(tokenize_batch, batched=True, batch_size=256, num_proc=num_proc if num_proc != 1 else None,
                       remove_columns=records.column_names, desc="Tokenizing", new_fingerprint=fingerprint)


def _train_last_turn_only(conversation: Conversation) -> Conversation:
    trained = [i for i, m in enumerate(conversation.messages) if m.train]
    if not trained:
        return conversation
    return dataclasses.replace(conversation, messages=[
        dataclasses.replace(m, train=m.train and i == trained[-1]) for i, m in enumerate(conversation.messages)])


def _supervised(labels: list[int]) -> int:
    return len(labels) - labels.count(IGNORE_INDEX)  # list.count runs in C: 10x a generator sum
