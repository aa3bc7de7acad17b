"""Input formats: which fields each has, how it is detected, and how a row becomes a Conversation.

Readers are small and separate; everything after them sees only conversations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from glmtune.data.conversation import Conversation, Message
from glmtune.data.files import Row
from glmtune.errors import MAX_PROBLEMS, UserError


def _exchange(prompt: str, answer: str | None) -> list[Message]:
    """A question and its trained answer; an inference row may have no answer."""
    answer_part = [Message("assistant", answer, train=True)] if answer is not None else []
    return [Message("user", prompt), *answer_part]


def _alpaca(row: dict[str, Any]) -> Conversation:
    messages = []
    for question, answer in row.get("history") or []:
        messages += _exchange(question, answer)
    prompt = row["instruction"] + ("\n" + row["input"] if row.get("input") else "")
    messages += _exchange(prompt, row.get("output"))
    return Conversation(messages=messages, system=row.get("system") or None)


def _pair(prompt_key: str, answer_key: str) -> Callable[[dict[str, Any]], Conversation]:
    def convert(row: dict[str, Any]) -> Conversation:
        return Conversation(messages=_exchange(row[prompt_key], row.get(answer_key)))
    return convert


def _text(row: dict[str, Any]) -> Conversation:
    return Conversation(text=row["text"])


@dataclass(frozen=True)
class Format:
    name: str
    required: tuple[str, ...]
    optional: tuple[str, ...]
    to_conversation: Callable[[dict[str, Any]], Conversation]
    description: str
    answer: str | None = None  # the field inference does without (it is what the model is asked for)

    def required_fields(self, need_answer: bool) -> tuple[str, ...]:
        return self.required if need_answer else tuple(k for k in self.required if k != self.answer)

    def optional_fields(self, need_answer: bool) -> tuple[str, ...]:
        return self.optional if need_answer or self.answer is None else (*self.optional, self.answer)


# Detection order matters: the first format whose required fields a row has wins.
FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("alpaca", ("instruction", "output"), ("input", "system", "history"), _alpaca,
           "instruction/input/output, optional system and history [[q, a], ...]", answer="output"),
    Format("prompt_completion", ("prompt", "completion"), (), _pair("prompt", "completion"),
           "prompt/completion", answer="completion"),
    Format("context_target", ("context", "target"), (), _pair("context", "target"), "context/target",
           answer="target"),
    Format("text", ("text",), (), _text, "text (loss on every token)"),
)}


def detect_format(rows: list[Row], need_answer: bool = True) -> Format:
    first = rows[0]
    if not isinstance(first.data, dict):
        raise UserError(f"{first.location}: expected a JSON object, found {_describe(first.data)}")
    for fmt in FORMATS.values():
        if all(key in first.data for key in fmt.required_fields(need_answer)):
            return fmt
    known = "; ".join(f"{f.name}: {f.description}" for f in FORMATS.values())
    raise UserError(f"{first.location}: cannot tell the data format from the fields {sorted(first.data)}",
                    hint=f"rows need the fields of one format ({known}), or pass --format")


def to_conversations(rows: list[Row], fmt: Format, need_answer: bool = True) -> list[Conversation]:
    """Validate every row against the format and convert it; report up to MAX_PROBLEMS bad rows at once.

    need_answer=False (inference) accepts rows without the answer field.
    """
    conversations, problems = [], []
    for row in rows:
        found = _row_problems(row, fmt.required_fields(need_answer), fmt.optional_fields(need_answer))
        if found:
            problems += found
            if len(problems) >= MAX_PROBLEMS:
                break
            continue
        conversation = fmt.to_conversation(row.data)
        conversation.location = row.location
        conversations.append(conversation)
    if problems:
        raise UserError(f"{len(problems)} problem(s) in the data (format '{fmt.name}': {fmt.description})",
                        problems=problems[:MAX_PROBLEMS],
                        hint="fix these rows, or pass --format if the format was detected wrongly")
    return conversations


def _row_problems(row: Row, required: tuple[str, ...], optional: tuple[str, ...]) -> list[str]:
    data = row.data
    if not isinstance(data, dict):
        return [f"{row.location}: expected a JSON object, found {_describe(data)}"]
    problems = []
    for key in required:
        if key not in data:
            problems.append(f"{row.location}: field '{key}' is missing (found fields: {sorted(data)})")
        elif not isinstance(data[key], str):
            problems.append(f"{row.location}: field '{key}': expected a string, found {_describe(data[key])}")
    for key in optional:
        value = data.get(key)
        if value is None:
            continue
        if key == "history":
            if not (isinstance(value, list) and all(
                    isinstance(p, list) and len(p) == 2 and all(isinstance(s, str) for s in p) for p in value)):
                problems.append(f"{row.location}: field 'history': expected a list of [question, answer] "
                                f"string pairs, found {_describe(value)}")
        elif not isinstance(value, str):
            problems.append(f"{row.location}: field '{key}': expected a string, found {_describe(value)}")
    return problems


def _describe(value: Any) -> str:
    kind = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(value), type(value).__name__)
    shown = repr(value)
    return f"{kind} ({shown[:60]}{'...' if len(shown) > 60 else ''})"
