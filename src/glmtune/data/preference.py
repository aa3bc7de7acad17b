"""Preference pairs for DPO: a prompt and two answers to it, `chosen` and `rejected`, rendered to ids by the same
templates as supervised rows.

A pair is a Conversation (the prompt and the chosen answer, so inference and eval read it as a row whose reference
is the chosen answer) that also carries the rejected answer. Tokenized, it becomes what TRL's DPO collator takes:
`prompt_ids` (the conversation through the generation prompt) and `chosen_ids` / `rejected_ids` (the answer and the
template's end-of-turn token: exactly the span SFT would train), with the report's per-row statistics. An answer may
carry reasoning (a thinking model's `<think>...</think>`), rendered where the template writes it in a generated turn.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glmtune.data.conversation import Conversation, Message
from glmtune.data.templates import IGNORE_INDEX, RowNotRenderable, check_reasoning, encode_for_training
from glmtune.data.truncation import shorten_left
from glmtune.errors import UserError

PREFERENCE_COLUMNS = ["prompt_ids", "chosen_ids", "rejected_ids"]
PROMPT_TOO_LONG = "prompt alone fills --max_seq_length"
SAME_ANSWERS = "chosen and rejected are the same"


@dataclass
class PreferenceConversation(Conversation):
    """The prompt plus the chosen answer as its last (trained) message (its reasoning on that message), and the
    rejected answer to the same prompt with its own reasoning."""

    rejected: str | None = None
    rejected_reasoning: str | None = None

    def to_record(self) -> dict[str, Any]:
        # rejected_reasoning is a key of its own (not a change of "rejected"), so records stay readable as before
        return {**super().to_record(), "rejected": self.rejected, "rejected_reasoning": self.rejected_reasoning}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> PreferenceConversation:
        conversation = Conversation.from_record(record)
        return cls(**{f.name: getattr(conversation, f.name) for f in dataclasses.fields(Conversation)},
                   rejected=record["rejected"], rejected_reasoning=record.get("rejected_reasoning"))

    def with_answer(self, answer: str, reasoning: str | None = None) -> Conversation:
        """The prompt followed by `answer` (after `reasoning`): the conversation SFT would train on that answer."""
        return Conversation(messages=[*self.messages[:-1], Message("assistant", answer, train=True,
                                                                   reasoning=reasoning)],
                            system=self.system, tools=self.tools, location=self.location)

    def answers(self) -> tuple[tuple[str, str | None], tuple[str, str | None]]:
        """((chosen, its reasoning), (rejected, its reasoning))."""
        chosen = self.messages[-1]
        return (chosen.content, chosen.reasoning), (self.rejected or "", self.rejected_reasoning)


def read_prepared_manifest(dataset_path: str | None, preference: bool,
                           labelled: bool = False) -> tuple[Path, dict[str, Any]]:
    """The directory and manifest of a prepared dataset (--dataset_path) of a kind the command trains on: train
    takes supervised rows, dpo and its kin take preference pairs, and with `labelled` (kto) rows labelled desirable or
    not too; another kind is refused."""
    from glmtune.artifacts import read_manifest
    from glmtune.data.labelled import LABELLED, PAIRS, SUPERVISED

    if not dataset_path:
        raise UserError("--dataset_path is required", hint="make one with `glmtune prepare`")
    dataset_dir = Path(dataset_path)
    manifest = read_manifest(dataset_dir, "prepare", "dataset directory")
    # "kind" is recent: before it, "preference" told pairs from supervised rows
    kind = manifest.get("kind") or (PAIRS if manifest.get("preference") else SUPERVISED)
    accepted = {PAIRS, LABELLED} if labelled else {PAIRS} if preference else {SUPERVISED}
    if kind not in accepted:
        _refuse_kind(dataset_dir, kind, preference)
    return dataset_dir, manifest


def _refuse_kind(dataset_dir: Path, kind: str, preference: bool) -> None:
    from glmtune.data.labelled import LABELLED

    if kind == LABELLED:
        command = "`glmtune train` trains on one answer per row, with no label" if not preference else \
            "`glmtune dpo`, `orpo` and `simpo` compare a chosen and a rejected answer to each prompt"
        raise UserError(f"{dataset_dir} holds rows labelled desirable or not (one answer each, for KTO); {command}",
                        hint=f"tune on it with `glmtune kto --dataset_path {dataset_dir}`, or prepare "
                             + ("pairs (prompt/chosen/rejected)" if preference else
                                "the desirable answers alone without their label"))
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
    what both renderings share before their answers: the conversation through the generation prompt. An answer's
    reasoning is part of it, as the template writes it in the turn it generates (GLM-4.5+: `\n<think>...</think>`)."""
    sequences = []
    for answer, reasoning in pair.answers():
        ids, labels = encode_for_training(tokenizer, pair.with_answer(answer, reasoning), stop_ids,
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
    ends to fit (a pair whose prompt alone fills --max_seq_length is dropped: no answer token would be left to
    compare), 'left' cuts the prompt's start as it does a supervised row's (data/truncation.py: the oldest exchanges,
    then the start of the prompt's text) and keeps both answers whole, dropping the pair only when its longer answer
    alone does not fit; 'drop' leaves the pair out."""
    from glmtune.data.tokenize import TOO_LONG

    try:
        prompt, chosen, rejected = encode_pair(tokenizer, pair, stop_ids, options.enable_thinking)
    except RowNotRenderable as problem:
        return _stats([], [], [], length=0, before=(0, 0), cut=False, dropped=problem.reason)
    limit = options.max_seq_length
    length, before = len(prompt) + max(len(chosen), len(rejected)), (len(prompt), len(chosen) + len(rejected))
    cut, dropped = length > limit, ""
    if cut and options.truncation == "drop":
        prompt, chosen, rejected, dropped = [], [], [], TOO_LONG
    elif cut and options.truncation == "left":
        prompt, chosen, rejected, dropped = _cut_prompt_left(tokenizer, pair, stop_ids, limit, options.enable_thinking)
    elif cut:
        room = limit - len(prompt)
        chosen, rejected = chosen[:room], rejected[:room]
        if room < 1:
            prompt, dropped = [], PROMPT_TOO_LONG
    if not dropped and chosen == rejected:  # no preference left to learn
        dropped = SAME_ANSWERS + (" after truncation" if cut else "")
    return _stats(prompt, chosen, rejected, length, before, cut, dropped)


def _cut_prompt_left(tokenizer: Any, pair: PreferenceConversation, stop_ids: list[int], limit: int,
                     enable_thinking: bool | None) -> tuple[list[int], list[int], list[int], str]:
    """(prompt, chosen, rejected, why dropped or "") of a pair too long for `limit`, its prompt cut from the start
    by --truncation left's rule for supervised rows, applied to the pair's longer sequence; then rendered again."""
    def encode_longer(conversation: Conversation) -> tuple[list[int], list[int]]:
        prompt, chosen, rejected = encode_pair(tokenizer, conversation, stop_ids, enable_thinking)
        longer = max(chosen, rejected, key=len)
        return prompt + longer, [IGNORE_INDEX] * len(prompt) + longer

    shortened, _, _, dropped = shorten_left(tokenizer, encode_longer, pair, limit, *encode_longer(pair))
    if dropped:
        return [], [], [], dropped
    return (*encode_pair(tokenizer, shortened, stop_ids, enable_thinking), "")


def _stats(prompt: list[int], chosen: list[int], rejected: list[int], length: int, before: tuple[int, int],
           cut: bool, dropped: str) -> dict[str, Any]:
    """The report's columns; `before`: the prompt's tokens and both answers' before truncation."""
    # input_ids/labels: the chosen sequence as SFT would see it, for the report's row statistics.
    prompt_before, supervised_before = before
    return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected,
            "input_ids": prompt + chosen, "labels": [IGNORE_INDEX] * len(prompt) + chosen,
            "length": length, "tokens": len(prompt) + len(chosen) + len(rejected),
            "supervised_before": supervised_before, "supervised": len(chosen) + len(rejected), "cut": cut,
            "dropped": dropped, "history_untrained": False,
            "prompt_cut": prompt_before - len(prompt), "answer_cut": supervised_before - len(chosen) - len(rejected)}


def tokenize_preferences(pairs: list[PreferenceConversation], tokenizer: Any, stop_ids: list[int], options: Any,
                         num_proc: int | None, fingerprint: str) -> Any:
    """All pairs tokenized (kept and dropped, with their statistics), as a datasets.Dataset."""
    from glmtune.data.tokenize import tokenize_dataset

    if options.last_turn_only or options.train_on_prompt:
        raise UserError("--last_turn_only and --train_on_prompt are for supervised rows, not preference pairs",
                        hint="leave them out: a pair always compares its two answers to the last turn")
    # prepare checks the chosen answers' reasoning (on the pairs' messages); the rejected ones' the same way
    rejected_with_reasoning = [p.with_answer(*p.answers()[1]) for p in pairs if p.rejected_reasoning]
    if rejected_with_reasoning:
        check_reasoning(tokenizer, rejected_with_reasoning, options.enable_thinking)
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
