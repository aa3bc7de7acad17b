"""Tokenizing conversations for training: the truncation policy per row, and the batched, parallel map over a
whole dataset (datasets.map with num_proc), with per-row statistics for the report."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from glmtune.data.conversation import Conversation, Message
from glmtune.data.templates import IGNORE_INDEX, AnswerNotLocated, RowNotRenderable, encode_for_training

TRUNCATION_RULES = ("right", "left", "drop")
NO_SUPERVISED = "no supervised token left"
TOO_LONG = "longer than --max_seq_length (--truncation drop)"


@dataclass(frozen=True)
class TokenizeOptions:
    max_seq_length: int
    truncation: str = "right"  # right: cut the end; left: drop the oldest turns, then cut the start; drop
    last_turn_only: bool = False  # train on the last assistant turn only
    train_on_prompt: bool = False  # take the loss on the prompts too


def process_conversation(conversation: Conversation, tokenizer: Any, stop_ids: list[int],
                         options: TokenizeOptions) -> dict[str, Any]:
    """One row's input_ids/labels after the truncation policy, and what happened to it."""
    if options.last_turn_only:
        conversation = _train_last_turn_only(conversation)
    history_untrained = False
    try:
        try:
            ids, labels = encode_for_training(tokenizer, conversation, stop_ids, options.train_on_prompt)
        except AnswerNotLocated:
            # Templates that write earlier answers as plain history, unlike the last one (ChatGLM-6B's "[Round i]"
            # prompts, templates that strip earlier reasoning): the last answer is still trained, the earlier ones
            # stay context, as the model's own training did. Counted in the report.
            last_only = _train_last_turn_only(conversation)
            if last_only == conversation:
                raise
            ids, labels = encode_for_training(tokenizer, last_only, stop_ids, options.train_on_prompt)
            conversation, history_untrained = last_only, True
    except RowNotRenderable as problem:  # this row only: it is dropped and counted, the run goes on
        return {"input_ids": [], "labels": [], "length": 0, "tokens": 0, "supervised_before": 0, "supervised": 0,
                "cut": False, "dropped": problem.reason, "history_untrained": False}
    length, supervised_before = len(ids), _supervised(labels)
    cut = length > options.max_seq_length
    dropped = ""
    if cut and options.truncation == "drop":
        ids, labels, dropped = [], [], TOO_LONG
    elif cut:
        ids, labels = _truncate(tokenizer, conversation, stop_ids, options, ids, labels)
    supervised = _supervised(labels)
    if not dropped and supervised == 0:  # nothing to learn from: never train on such a row silently
        dropped = NO_SUPERVISED + (" after truncation" if cut else "")
    return {"input_ids": ids, "labels": labels, "length": length, "tokens": len(ids),
            "supervised_before": supervised_before, "supervised": supervised, "cut": cut, "dropped": dropped,
            "history_untrained": history_untrained}


def tokenize_dataset(conversations: list[Conversation], tokenizer: Any, stop_ids: list[int],
                     options: TokenizeOptions, num_proc: int | None, fingerprint: str,
                     process: Callable[..., dict[str, Any]] = process_conversation,
                     read: Callable[[dict[str, Any]], Conversation] = Conversation.from_record) -> Any:
    """All rows tokenized (kept and dropped, with their statistics), as a datasets.Dataset. `process` turns one row
    into its columns, `read` rebuilds a row from its Arrow record (preference pairs have their own)."""
    from datasets import Dataset

    records = Dataset.from_list([c.to_record() for c in conversations])

    def tokenize_batch(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
        results = [process(read(r), tokenizer, stop_ids, options) for r in rows]
        return {key: [r[key] for r in results] for key in results[0]}

    # new_fingerprint: datasets would otherwise try to hash the tokenizer in the closure.
    return records.map(tokenize_batch, batched=True, batch_size=256, num_proc=num_proc,
                       remove_columns=records.column_names, desc="Tokenizing", new_fingerprint=fingerprint)


def _train_last_turn_only(conversation: Conversation) -> Conversation:
    trained = [i for i, m in enumerate(conversation.messages) if m.train]
    if not trained:
        return conversation
    return dataclasses.replace(conversation, messages=[
        Message(m.role, m.content, m.train and i == trained[-1]) for i, m in enumerate(conversation.messages)])


def _truncate(tokenizer: Any, conversation: Conversation, stop_ids: list[int], options: TokenizeOptions,
              ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    limit = options.max_seq_length
    if options.truncation == "right":
        return ids[:limit], labels[:limit]
    if conversation.text is not None:  # plain text: keep its end
        return ids[-limit:], labels[-limit:]
    # left: keep the last trained answer and as much of the conversation before it as fits. Untrained turns after
    # it go first, then whole exchanges from the start, so the template's opening tokens and the answer's own
    # prompt stay; if that last exchange alone is still too long, its answer is cut at the end.
    messages = conversation.messages
    trained = [i for i, m in enumerate(messages) if m.role == "assistant" and m.train]
    last = trained[-1] if trained else len(messages) - 1
    starts = [0] + [i for i, m in enumerate(messages) if m.role == "user" and 0 < i < last]
    for start in starts:
        shorter = dataclasses.replace(conversation, messages=messages[start: last + 1])
        ids, labels = encode_for_training(tokenizer, shorter, stop_ids, options.train_on_prompt)
        if len(ids) <= limit:
            break
    return ids[:limit], labels[:limit]


def _supervised(labels: list[int]) -> int:
    return len(labels) - labels.count(IGNORE_INDEX)  # list.count runs in C: 10x a generator sum
