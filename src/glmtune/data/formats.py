"""Input formats: how each is detected, and how one of its rows becomes a Conversation.

One small reader per format; everything after them sees only conversations. A reader raises RowProblem for
the first thing wrong with a row; `to_conversations` collects them with the row's file:line.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from glmtune.data.conversation import Conversation, Message
from glmtune.data.files import MalformedLine, Row
from glmtune.data.labelled import LabelledConversation
from glmtune.data.preference import PreferenceConversation
from glmtune.errors import MAX_PROBLEMS, UserError


class RowProblem(Exception):
    def __init__(self, field: str, expected: str, found: Any = None, missing: bool = False):
        self.field, self.expected, self.found, self.missing = field, expected, found, missing
        super().__init__(field)

    def describe(self, row: dict[str, Any]) -> str:
        if self.missing:
            return f"field '{self.field}' is missing (found fields: {sorted(row)})"
        return f"field '{self.field}': expected {self.expected}, found {describe_value(self.found)}"


def _text(row: dict[str, Any], key: str, optional: bool = False, where: str | None = None) -> str | None:
    if key not in row or row[key] is None:
        if optional:
            return None
        raise RowProblem(where or key, "a string", missing=key not in row)
    if not isinstance(row[key], str):
        raise RowProblem(where or key, "a string", row[key])
    return row[key]


def _history(row: dict[str, Any]) -> list[Message]:
    """`history` as [[question, answer], ...] (alpaca, ChatGLM2 P-Tuning): every answer is trained."""
    value = row.get("history")
    if value is None or value == "":  # absent, or an empty CSV cell
        return []
    if not (isinstance(value, list) and all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(s, str) for s in p) for p in value)):
        raise RowProblem("history", "a list of [question, answer] string pairs", value)
    messages = []
    for i, (question, answer) in enumerate(value):
        reasoning, answer = split_think(answer, f"history[{i}][1]")
        messages += _exchange(question, answer, reasoning)
    return messages


def _exchange(prompt: str, answer: str | None, reasoning: str | None = None) -> list[Message]:
    """A question and its trained answer (with the reasoning before it, if any); an inference row may have no
    answer."""
    answers = [Message("assistant", answer, train=True, reasoning=reasoning)] if answer is not None else []
    return [Message("user", prompt), *answers]


REASONING_COLUMNS = ("reasoning", "think")


def _reasoning_column(row: dict[str, Any]) -> str | None:
    """The answer's reasoning from a `reasoning` or `think` column (an empty CSV cell: none)."""
    given = [key for key in REASONING_COLUMNS if row.get(key) not in (None, "")]
    if len(given) > 1:
        raise RowProblem(given[1], f"one reasoning column, not both {' and '.join(given)}", row[given[1]])
    return _text(row, given[0]) if given else None


def split_think(content: str, where: str) -> tuple[str | None, str]:
    """(reasoning, answer) of an assistant's text that opens with <think>...</think>, as thinking models write it;
    (None, text) for any other."""
    opened = content.lstrip()
    if not opened.startswith("<think>"):
        return None, content
    reasoning, closed, answer = opened[len("<think>"):].partition("</think>")
    if not closed:
        raise RowProblem(where, "a <think> block closed by </think> before the answer", content)
    return reasoning.strip(), answer.lstrip()


def _answer_with_reasoning(row: dict[str, Any], key: str, optional: bool,
                           think_in_text: bool = False) -> tuple[str | None, str | None]:
    """(answer, reasoning) of a column format's row: the answer column, the reasoning column or, with
    `think_in_text`, a <think> block opening the answer (not both)."""
    answer, reasoning = _text(row, key, optional=optional), _reasoning_column(row)
    if answer is not None and think_in_text:
        found, answer = split_think(answer, key)
        if found is not None and reasoning is not None:
            raise RowProblem(key, "the reasoning in one place: a <think> block or a reasoning column",
                             row[key])
        reasoning = reasoning if found is None else found
    return answer, reasoning


def read_alpaca(row: dict[str, Any], need_answer: bool) -> Conversation:
    instruction, extra = _text(row, "instruction"), _text(row, "input", optional=True)
    prompt = instruction + ("\n" + extra if extra else "")
    messages = _history(row) + _exchange(prompt, *_answer_with_reasoning(row, "output", not need_answer, True))
    return Conversation(messages=messages, system=_text(row, "system", optional=True) or None)


def read_prompt_response(row: dict[str, Any], need_answer: bool) -> Conversation:
    """ChatGLM2's P-Tuning format: prompt/response plus history [[q, a], ...]."""
    messages = _history(row) + _exchange(_text(row, "prompt"), *_answer_with_reasoning(row, "response",
                                                                                         not need_answer))
    return Conversation(messages=messages)


def pair_reader(prompt_key: str, answer_key: str) -> Callable[[dict[str, Any], bool], Conversation]:
    def read(row: dict[str, Any], need_answer: bool) -> Conversation:
        return Conversation(messages=_exchange(_text(row, prompt_key),
                                               *_answer_with_reasoning(row, answer_key, not need_answer)))
    return read


def read_text(row: dict[str, Any], need_answer: bool) -> Conversation:
    return Conversation(text=_text(row, "text"))


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "function_call": "assistant", "observation": "observation", "tool": "observation",
                  "system": "system"}
MESSAGE_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "observation",
                 "observation": "observation"}


def _turns(row: dict[str, Any], key: str, role_key: str,
           roles: dict[str, str]) -> Iterator[tuple[str, dict[str, Any], str]]:
    """(where, turn, our role) for each turn of a row's list of turns, validated."""
    turns = row.get(key)
    if not isinstance(turns, list) or not turns:
        raise RowProblem(key, f"a non-empty list of turns with '{role_key}'", turns, missing=key not in row)
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise RowProblem(where, f"an object with '{role_key}'", turn)
        if turn.get(role_key) not in roles:
            raise RowProblem(f"{where}.{role_key}", f"one of {sorted(roles)}", turn.get(role_key))
        yield where, turn, roles[turn[role_key]]


def read_sharegpt(row: dict[str, Any], need_answer: bool) -> Conversation:
    messages = []
    for where, turn, role in _turns(row, "conversations", "from", SHAREGPT_ROLES):
        value = _text(turn, "value", where=f"{where}.value")
        call = _tool_call(value) if turn["from"] == "function_call" else None
        reasoning = None
        if role == "assistant" and turn["from"] != "function_call":
            reasoning, value = split_think(value, f"{where}.value")
        messages.append(Message(role, value, train=role == "assistant", tool_call=call, reasoning=reasoning))
    return _conversation(messages, row, _text(row, "system", optional=True))


def _tool_call(value: str) -> dict[str, Any] | None:
    """A function_call turn's {"name", "arguments"}, so that each template can write calls its own way."""
    try:
        call = json.loads(value)
    except json.JSONDecodeError:
        return None
    if isinstance(call, dict) and isinstance(call.get("name"), str):
        return {"name": call["name"], "arguments": call.get("arguments", {})}
    return None


def read_messages(row: dict[str, Any], need_answer: bool) -> Conversation:
    """OpenAI-style messages; content as a string or typed parts; per-message `loss_weight` or `train`."""
    messages = []
    for where, turn, role in _turns(row, "messages", "role", MESSAGE_ROLES):
        train = role == "assistant"
        if "loss_weight" in turn:
            if not isinstance(turn["loss_weight"], (int, float)) or isinstance(turn["loss_weight"], bool):
                raise RowProblem(f"{where}.loss_weight", "a number", turn["loss_weight"])
            train = train and turn["loss_weight"] > 0
        if "train" in turn:
            if not isinstance(turn["train"], bool):
                raise RowProblem(f"{where}.train", "true or false", turn["train"])
            train = train and turn["train"]
        messages.append(_message(turn, where, role, train))
    return _conversation(messages, row, None)


def _message(turn: dict[str, Any], where: str, role: str, train: bool) -> Message:
    """One OpenAI message: an assistant's reasoning (`reasoning_content`, or a <think> block opening its content)
    and `tool_calls` (its content may then be null), a tool result's `tool_call_id`."""
    calls = _openai_calls(turn, where, role)
    content = "" if turn.get("content") is None and calls else _content(turn.get("content"), f"{where}.content")
    reasoning = None
    for key in ("reasoning_content", "reasoning"):
        if turn.get(key) is None:
            continue
        if role != "assistant":
            raise RowProblem(f"{where}.{key}", "reasoning only on assistant messages", turn[key])
        reasoning = _text(turn, key, where=f"{where}.{key}")
    if role == "assistant" and reasoning is None:
        reasoning, content = split_think(content, f"{where}.content")
    call_id = _text(turn, "tool_call_id", optional=True, where=f"{where}.tool_call_id") if role == "observation" \
        else None
    return Message(role, content, train=train, tool_call=calls or None, reasoning=reasoning, tool_call_id=call_id)


def _openai_calls(turn: dict[str, Any], where: str, role: str) -> list[dict[str, Any]]:
    """An assistant's `tool_calls` ([{id, type: function, function: {name, arguments}}]) as {"name", "arguments",
    "id"} each, the arguments a JSON object (given as one, or as a string holding one, as OpenAI writes them)."""
    value = turn.get("tool_calls")
    if value is None or value == []:
        return []
    expected = "a list of calls {type: function, function: {name, arguments}}"
    if role != "assistant":
        raise RowProblem(f"{where}.tool_calls", "tool calls only on assistant messages", value)
    if not isinstance(value, list):
        raise RowProblem(f"{where}.tool_calls", expected, value)
    calls = []
    for j, call in enumerate(value):
        at = f"{where}.tool_calls[{j}]"
        function = call.get("function", call) if isinstance(call, dict) else None  # a bare {name, arguments} too
        if not (isinstance(function, dict) and isinstance(function.get("name"), str)):
            raise RowProblem(at, "a call {type: function, function: {name, arguments}}", call)
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                pass  # refused just below, as any other non-object
        if not isinstance(arguments, dict):
            raise RowProblem(f"{at}.function.arguments", "a JSON object (or a string holding one)",
                             function.get("arguments"))
        call_id = call.get("id") if isinstance(call.get("id"), str) else None
        calls.append({"name": function["name"], "arguments": arguments, **({"id": call_id} if call_id else {})})
    return calls


def _content(value: Any, where: str) -> str:
    """A message's text: a string, or a list of text parts ({"type": "text", "text"|"value": ...})."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for part in value:
            text = part.get("text", part.get("value")) if isinstance(part, dict) else None
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(text, str)):
                raise RowProblem(where, "a string or a list of text parts (other part types are not supported)",
                                 part)
            texts.append(text)
        return "".join(texts)
    raise RowProblem(where, "a string or a list of text parts", value)


def _conversation(messages: list[Message], row: dict[str, Any], system: str | None) -> Conversation:
    """A leading system message becomes the conversation's system prompt; `tools` are parsed if given."""
    if messages and messages[0].role == "system":
        system, messages = messages[0].content, messages[1:]
    if any(m.role == "system" for m in messages):
        raise RowProblem("system", "a system message only at the start", "one later in the conversation")
    tools = row.get("tools")
    if isinstance(tools, str) and tools.strip():
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            raise RowProblem("tools", "a JSON list of tool definitions", tools) from None
    if tools in ("", None):
        tools = None
    elif not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise RowProblem("tools", "a list of tool definitions", tools)
    else:  # bare {name, description, parameters} definitions in the OpenAI form templates expect
        tools = [t if "type" in t else {"type": "function", "function": t} for t in tools]
    return Conversation(messages=messages, system=system or None, tools=tools)


def read_preference(row: dict[str, Any], need_answer: bool) -> Conversation:
    """A prompt (ShareGPT conversations, messages, instruction/input, or a prompt string) and two answers to its last
    turn, `chosen` and `rejected`: strings or assistant messages. Only the answers are compared, so the prompt's own
    answers stay context."""
    if "conversations" in row:
        prompt = read_sharegpt(row, need_answer=False)
    elif "messages" in row:
        prompt = read_messages(row, need_answer=False)
    elif "instruction" in row:
        prompt = read_alpaca(row, need_answer=False)
    elif isinstance(row.get("prompt"), str):
        prompt = Conversation(messages=[Message("user", row["prompt"])], system=_text(row, "system", optional=True))
    else:
        raise RowProblem("prompt", "a string (or the prompt as conversations, messages or instruction/input)",
                         row.get("prompt"), missing="prompt" not in row)
    if not prompt.messages or prompt.messages[-1].role == "assistant":
        raise RowProblem("conversations" if "conversations" in row else "messages" if "messages" in row else "prompt",
                         "a prompt that ends with the turn the answers reply to", "an assistant turn last")
    chosen, chosen_reasoning = _answer(row, "chosen", optional=not need_answer)
    rejected, rejected_reasoning = _answer(row, "rejected", optional=not need_answer)
    history = [dataclasses.replace(m, train=False) for m in prompt.messages]
    answer = [Message("assistant", chosen, train=True, reasoning=chosen_reasoning)] if chosen is not None else []
    return PreferenceConversation(messages=history + answer, system=prompt.system or None, tools=prompt.tools,
                                  rejected=rejected, rejected_reasoning=rejected_reasoning)


def _answer(row: dict[str, Any], key: str, optional: bool) -> tuple[str | None, str | None]:
    """A preference answer and its reasoning: a string, a ShareGPT message {from: gpt, value} or an OpenAI one
    {role: assistant, content, reasoning_content?}, read as the same forms are in a conversation (a <think> block
    opening the text is the reasoning)."""
    value = row.get(key)
    expected = "a string or an assistant message ({from: gpt, value} or {role: assistant, content})"
    if value is None:
        if optional:
            return None, None
        raise RowProblem(key, expected, value, missing=key not in row)
    if isinstance(value, str):
        return split_think(value, key)[::-1]
    if isinstance(value, dict) and value.get("from") in ("gpt", "assistant"):
        return split_think(_text(value, "value", where=f"{key}.value"), f"{key}.value")[::-1]
    if isinstance(value, dict) and value.get("role") == "assistant":
        message = _message(value, key, "assistant", train=True)
        if message.tool_call:
            raise RowProblem(f"{key}.tool_calls", "a text answer (preference pairs compare text, not tool calls)",
                             value["tool_calls"])
        return message.content, message.reasoning
    raise RowProblem(key, expected, value)


LABEL_TEXT = {"true": True, "false": False}  # a CSV cell holds no booleans


def _label(row: dict[str, Any], optional: bool) -> bool | None:
    """A labelled row's `label`: a JSON boolean, or the text true/false (any case). Numbers are refused: 1/0 are as
    often a classifier's class ids as a judgement of the answer."""
    value = row.get("label")
    if value is None and optional:
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in LABEL_TEXT:
        return LABEL_TEXT[value.strip().lower()]
    raise RowProblem("label", "true (a desirable answer) or false (an undesirable one)", value,
                     missing="label" not in row)


def read_labelled(row: dict[str, Any], need_answer: bool) -> Conversation:
    """A prompt and one answer judged by `label` (KTO): TRL's unpaired form prompt/completion/label (strings, or
    lists of messages), instruction/input/output/label, or ShareGPT conversations / OpenAI messages ending in the
    judged assistant turn plus a row-level label. Only that last answer is trained; earlier ones stay context."""
    if "conversations" in row:
        conversation, where = read_sharegpt(row, need_answer), "conversations"
    elif "messages" in row:
        conversation, where = read_messages(row, need_answer), "messages"
    elif "instruction" in row:
        conversation, where = read_alpaca(row, need_answer), "output"
    elif isinstance(row.get("prompt"), list):  # TRL's conversational form: lists of {role, content}
        completion = row.get("completion") if need_answer or row.get("completion") is not None else []
        if not isinstance(completion, list):
            raise RowProblem("completion", "a list of messages, as the prompt is", completion,
                             missing="completion" not in row)
        conversation = read_messages({**row, "messages": row["prompt"] + completion}, need_answer)
        where = "completion"
    elif isinstance(row.get("prompt"), str):
        answer, reasoning = _answer_with_reasoning(row, "completion", not need_answer, think_in_text=True)
        conversation = Conversation(messages=_exchange(row["prompt"], answer, reasoning),
                                    system=_text(row, "system", optional=True) or None)
        where = "completion"
    else:
        raise RowProblem("prompt", "a string or a list of messages (or the row as conversations, messages or "
                         "instruction/output)", row.get("prompt"), missing="prompt" not in row)
    label = _label(row, optional=not need_answer)
    messages = conversation.messages
    if need_answer and (not messages or messages[-1].role != "assistant"):
        raise RowProblem(where, "the assistant's answer last: the answer the label judges",
                         messages[-1].role if messages else "no message")
    judged = [dataclasses.replace(m, train=need_answer and i == len(messages) - 1) for i, m in enumerate(messages)]
    return LabelledConversation(messages=judged, system=conversation.system, tools=conversation.tools, label=label)


@dataclass(frozen=True)
class Format:
    name: str
    keys: tuple[str, ...]  # the fields a row of this format has; the first format whose keys a row has wins
    read: Callable[[dict[str, Any], bool], Conversation]
    description: str
    answer: str | None = None  # a key inference does without (it is what the model is asked for)

    def matches(self, row: dict[str, Any], need_answer: bool) -> bool:
        return all(k in row for k in self.keys if need_answer or k != self.answer)


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("sharegpt", ("conversations",), read_sharegpt,
           "conversations of {from, value} (human/gpt/system/function_call/observation), optional tools"),
    Format("messages", ("messages",), read_messages,
           "messages of {role, content}, optional loss_weight/train per message"),
    Format("alpaca", ("instruction", "output"), read_alpaca,
           "instruction/input/output, optional system and history [[q, a], ...]", answer="output"),
    Format("prompt_response", ("prompt", "response"), read_prompt_response,
           "prompt/response, optional history [[q, a], ...] (ChatGLM2 P-Tuning)", answer="response"),
    Format("prompt_completion", ("prompt", "completion"), pair_reader("prompt", "completion"),
           "prompt/completion", answer="completion"),
    Format("context_target", ("context", "target"), pair_reader("context", "target"), "context/target",
           answer="target"),
    Format("content_summary", ("content", "summary"), pair_reader("content", "summary"),
           "content/summary (AdvertiseGen, ChatGLM P-Tuning)", answer="summary"),
    Format("text", ("text",), read_text, "text (loss on every token)"),
    # Last: detected by its chosen/rejected fields before any other format is tried (see detect_format).
    Format("preference", ("chosen", "rejected"), read_preference,
           "a prompt (conversations, messages, instruction/input or prompt) with a chosen and a rejected answer, "
           "for `glmtune dpo`"),
    # Detected by a true/false `label` before any other format is tried (see detect_format).
    Format("labelled", ("label",), read_labelled,
           "a prompt (prompt, instruction/input, conversations or messages) with one answer (completion, output, or "
           "the last assistant turn) and a true/false label, for `glmtune kto`"),
)}


def detect_format(rows: list[Row], need_answer: bool = True) -> Format:
    first = next((row for row in rows if not isinstance(row.data, MalformedLine)), rows[0])
    if isinstance(first.data, MalformedLine):
        raise UserError(f"{first.location}: {first.data.problem}", hint="no line of the file is valid JSON")
    if not isinstance(first.data, dict):
        raise UserError(f"{first.location}: expected a JSON object, found {describe_value(first.data)}")
    if "chosen" in first.data or "rejected" in first.data:  # a row missing one is then named by its reader
        return FORMATS["preference"]
    if _labelled(rows):
        return FORMATS["labelled"]
    for fmt in FORMATS.values():
        if fmt.matches(first.data, need_answer):
            return fmt
    known = "; ".join(f"{f.name}: {f.description}" for f in FORMATS.values())
    raise UserError(f"{first.location}: cannot tell the data format from the fields {sorted(first.data)}",
                    hint=f"rows need the fields of one format ({known}), or pass --format "
                         "(and --columns to rename fields)")


def _labelled(rows: list[Row]) -> bool:
    """Whether the rows are labelled (KTO): some row has a `label` and an answer to judge. Any row, not only the
    first, so that a row that lacks its label is named by the reader rather than trained on as a supervised row.
    Plain-text rows with a label (a classifier's corpus) keep their text format."""
    return any(isinstance(row.data, dict) and "label" in row.data and "text" not in row.data for row in rows)


@dataclass
class BadRow:
    location: str
    problem: str
    data: Any


def to_conversations(rows: list[Row], fmt: Format, need_answer: bool = True,
                     skip_bad_rows: bool = False) -> tuple[list[Conversation], list[BadRow]]:
    """Validate and convert every row. Bad rows stop the run (up to MAX_PROBLEMS are listed at once), or
    with skip_bad_rows are returned apart.

    need_answer=False (inference) accepts rows without the answer field.
    """
    conversations, bad = [], []
    for row in rows:
        if isinstance(row.data, MalformedLine):
            bad.append(BadRow(row.location, row.data.problem, row.data.text))
        elif not isinstance(row.data, dict):
            bad.append(BadRow(row.location, f"expected a JSON object, found {describe_value(row.data)}", row.data))
        else:
            try:
                conversation = fmt.read(row.data, need_answer)
            except RowProblem as problem:
                bad.append(BadRow(row.location, problem.describe(row.data), row.data))
            else:
                conversation.location = row.location
                conversations.append(conversation)
        if len(bad) >= MAX_PROBLEMS and not skip_bad_rows:
            break
    if bad and not skip_bad_rows:
        raise UserError(f"{len(bad)} bad row(s) in the data (format '{fmt.name}': {fmt.description})",
                        problems=[f"{b.location}: {b.problem}" for b in bad[:MAX_PROBLEMS]],
                        hint="fix these rows, pass --skip_bad_rows to leave them out, or pass --format if the "
                             "format was detected wrongly")
    return conversations, bad


def describe_value(value: Any) -> str:
    kind = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(value), type(value).__name__)
    shown = repr(value)
    return f"{kind} ({shown[:60]}{'...' if len(shown) > 60 else ''})"
