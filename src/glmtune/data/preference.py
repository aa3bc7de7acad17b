"""Preference pairs for DPO: a prompt and two answers to it, `chosen` and `rejected`, rendered to ids by the same
templates as supervised rows.

A pair is a Conversation (the prompt and the chosen answer, so inference and eval read it as a row whose reference
is the chosen answer) that also carries the rejected answer. Tokenized, it becomes what TRL's DPO collator takes:
`prompt_ids` (the conversation through the generation prompt) and `chosen_ids` / `rejected_ids` (the answer and the
template's end-of-turn token: exactly the span SFT would train), with the report's per-row statistics.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glmtune.data.conversation import Conversation, Message
from glmtune.data.templates import IGNORE_INDEX, RowNotRenderable, encode_for_training
from glmtune.errors import UserError

PREFERENCE_COLUMNS = ["prompt_ids", "chosen_ids", "rejected_ids"]
PROMPT_TOO_LONG = "prompt alone fills --max_seq_length"
SAME_ANSWERS = "chosen and rejected are the same"


@dataclass
class PreferenceConversation(Conversation):
    """The prompt plus the chosen answer as its last (trained) message, and the rejected answer to the same prompt."""

    rejected: str | None = None

    def to_record(self) -> dict[str, Any]:
        return {**super().to_record(), "rejected": self.rejected}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> PreferenceConversation:
        conversation = Conversation.from_record(record)
        return cls(**{f.name: getattr(conversation, f.name) for f in dataclasses.fields(Conversation)},
                   rejected=record["rejected"])

    def with_answer(self, answer: str) -> Conversation:
        """The prompt followed by `answer`: the conversation SFT would train on that answer."""
        return Conversation(messages=[*self.messages[:-1], Message("assistant", answer, train=True)],
                            system=self.system, tools=self.tools, location=self.location)


def is_preference_data(conversations: list[Conversation]) -> bool:
    """Whether the rows are preference pairs; a mix of pairs and supervised rows is refused."""
    pairs = sum(isinstance(c, PreferenceConversation) for c in conversations)
    if 0 < pairs < len(conversations):
        raise UserError(f"the data mixes {pairs} preference pairs (chosen/rejected) with "
                        f"{len(conversations) - pairs} supervised rows",
                        hint="prepare preference data (for `glmtune dpo`) and supervised data (for `glmtune train`) "
                             "into separate dataset directories")
    return pairs > 0


def read_prepared_manifest(dataset_path: str | None, preference: bool) -> tuple[Path, dict[str, Any]]:
    """The directory and manifest of a prepared dataset (--dataset_path) of the kind the command trains on: train
    takes supervised rows, dpo takes preference pairs; the other kind is refused."""
    from glmtune.artifacts import read_manifest

    if not dataset_path:
        raise UserError("--dataset_path is required", hint="make one with `glmtune prepare`")
    dataset_dir = Path(dataset_path)
    manifest = read_manifest(dataset_dir, "prepare", "dataset directory")
    if bool(manifest.get("preference")) != preference:
        _refuse_kind(dataset_dir, preference)
    return dataset_dir, manifest


def _refuse_kind(dataset_dir: Path, preference: bool) -> None:
    if preference:
        raise UserError(f"{dataset_dir} holds supervised rows (one answer each); `glmtune dpo` trains on preference "
                        "pairs", hint="prepare rows with a chosen and a rejected answer (conversations + chosen + "
                                      "rejected, or prompt/chosen/rejected), or train on this dataset with "
                                      "`glmtune train`")
    raise UserError(f"{dataset_dir} holds preference pairs (chosen/rejected); `glmtune train` trains on one answer per "
                    "row", hint=f"tune on it with `glmtune dpo --dataset_path {dataset_dir}`")


def encode_pair(tokenizer: Any, pair: PreferenceConversation, stop_ids: list[int],
                enable_thinking: bool | None = None) -> tuple[list[int], list[int], list[int]]:
    """(prompt_ids, chosen_ids, rejected_ids). Each answer is rendered in its conversation as SFT renders it (so its
    first tokens, e.g. GLM-4's newline after <|assistant|>, and its end-of-turn token are the same); the prompt is
    what both renderings share before their answers: the conversation through the generation prompt."""
    sequences = []
    for answer in (pair.messages[-1].content, pair.rejected or ""):
        ids, labels = encode_for_training(tokenizer, pair.with_answer(answer), stop_ids,
                                          enable_thinking=enable_thinking)
        trained = [k for k, label in enumerate(labels) if label != IGNORE_INDEX]
        if not trained:
            raise RowNotRenderable(f"{pair.location}: an answer renders to no token", reason="empty answer")
        sequences.append((ids, trained[0], trained[-1] + 1))
    (chosen, chosen_start, chosen_end), (rejected, rejected_start, rejected_end) = sequences
    # The two prompts are the same unless a tokenizer merges the prompt's last token with an answer's first.
    shared = 0
    while shared < min(chosen_start, rejected_start) and chosen[shared] == rejected[shared]:
        shared += 1
    return chosen[:shared], chosen[shared:chosen_end], rejected[shared:rejected_end]


def process_pair(pair: PreferenceConversation, tokenizer: Any, stop_ids: list[int], options: Any) -> dict[str, Any]:
    """One pair's ids after prepare's truncation rule, and what happened to it (the columns the report reads).
    A pair's length is the prompt plus its longer answer: the longest sequence DPO runs. 'right' cuts both answers'
    ends to fit, 'left' first drops the oldest exchanges of the prompt, 'drop' leaves the pair out; a pair whose
    prompt alone fills --max_seq_length is dropped (no answer token would be left to compare)."""
    from glmtune.data.tokenize import TOO_LONG

    try:
        prompt, chosen, rejected = encode_pair(tokenizer, pair, stop_ids, options.enable_thinking)
    except RowNotRenderable as problem:
        return _stats([], [], [], length=0, supervised_before=0, cut=False, dropped=problem.reason)
    limit = options.max_seq_length
    length, supervised_before = len(prompt) + max(len(chosen), len(rejected)), len(chosen) + len(rejected)
    cut, dropped = length > limit, ""
    if cut and options.truncation == "drop":
        prompt, chosen, rejected, dropped = [], [], [], TOO_LONG
    elif cut:
        if options.truncation == "left":
            prompt, chosen, rejected = _drop_oldest_exchanges(tokenizer, pair, stop_ids, limit,
                                                              options.enable_thinking)
        room = limit - len(prompt)
        chosen, rejected = chosen[:room], rejected[:room]
        if room < 1:
            prompt, dropped = [], PROMPT_TOO_LONG
    if not dropped and chosen == rejected:  # no preference left to learn
        dropped = SAME_ANSWERS + (" after truncation" if cut else "")
    return _stats(prompt, chosen, rejected, length, supervised_before, cut, dropped)


def _drop_oldest_exchanges(tokenizer: Any, pair: PreferenceConversation, stop_ids: list[int], limit: int,
                           enable_thinking: bool | None = None) -> tuple[list[int], list[int], list[int]]:
    """The pair with whole exchanges dropped from the start of its prompt (the system prompt stays) until it fits,
    or down to the last question."""
    messages = pair.messages
    starts = [i for i, m in enumerate(messages[:-1]) if m.role == "user" and i > 0]
    encoded = encode_pair(tokenizer, pair, stop_ids, enable_thinking)
    for start in starts:
        if len(encoded[0]) + max(len(encoded[1]), len(encoded[2])) <= limit:
            break
        encoded = encode_pair(tokenizer, dataclasses.replace(pair, messages=messages[start:]), stop_ids,
                              enable_thinking)
    return encoded


def _stats(prompt: list[int], chosen: list[int], rejected: list[int], length: int, supervised_before: int,
           cut: bool, dropped: str) -> dict[str, Any]:
    # input_ids/labels: the chosen sequence as SFT would see it, for the report's row statistics.
    return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected,
            "input_ids": prompt + chosen, "labels": [IGNORE_INDEX] * len(prompt) + chosen,
            "length": length, "tokens": len(prompt) + len(chosen) + len(rejected),
            "supervised_before": supervised_before, "supervised": len(chosen) + len(rejected), "cut": cut,
            "dropped": dropped, "history_untrained": False}


def tokenize_preferences(pairs: list[PreferenceConversation], tokenizer: Any, stop_ids: list[int], options: Any,
                         num_proc: int | None, fingerprint: str) -> Any:
    """All pairs tokenized (kept and dropped, with their statistics), as a datasets.Dataset."""
    from glmtune.data.tokenize import tokenize_dataset

    if options.last_turn_only or options.train_on_prompt:
        raise UserError("--last_turn_only and --train_on_prompt are for supervised rows, not preference pairs",
                        hint="leave them out: a pair always compares its two answers to the last turn")
    return tokenize_dataset(pairs, tokenizer, stop_ids, options, num_proc, fingerprint, process=process_pair,
                            read=PreferenceConversation.from_record)


def pair_samples(tokenizer: Any, tokenized: Any, count: int) -> list[str]:
    """The first kept pairs as text: the prompt, then each answer between the report's marks."""
    from glmtune.data.report import MARK_CLOSE, MARK_OPEN

    kept = [i for i, reason in enumerate(tokenized["dropped"]) if not reason][:count]
    return [f"{tokenizer.decode(row['prompt_ids'])}\n"
            f"  chosen:   {MARK_OPEN}{tokenizer.decode(row['chosen_ids'])}{MARK_CLOSE}\n"
            f"  rejected: {MARK_OPEN}{tokenizer.decode(row['rejected_ids'])}{MARK_CLOSE}"
            for row in tokenized.select(kept)]
