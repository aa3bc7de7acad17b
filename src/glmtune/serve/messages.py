"""A chat completion request -> the Conversation the engine answers, and its thinking switch.

The messages are read by the same reader as `prepare` and `infer --input` use for OpenAI-style rows (a `tool`
message becomes an observation turn); what only the API carries is added to them here: an assistant's
`reasoning_content` and `tool_calls`, a tool result's `tool_call_id`, and the request's `tools`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from glmtune.data.conversation import Conversation, Message
from glmtune.data.formats import RowProblem, read_messages
from glmtune.data.templates import thinking_switch
from glmtune.errors import UserError
from glmtune.serve.schemas import ChatCompletionRequest, ChatMessage

SERVED_TOOL_CHOICES = (None, "auto", "none")


class BadRequest(Exception):
    """A request the server answers 400, naming the parameter at fault."""

    def __init__(self, message: str, param: str | None):
        super().__init__(message)
        self.message, self.param = message, param


def request_conversation(body: ChatCompletionRequest) -> Conversation:
    """The request's messages and tools as a Conversation.

    Raises:
        BadRequest: a system message after the first, an assistant message last, a tool call whose arguments are
            not a JSON object, tools that are not function definitions, an unserved tool_choice.
    """
    turns = [{"role": "system" if m.role == "developer" else m.role, "content": _text(m)} for m in body.messages]
    for i, turn in enumerate(turns[1:], start=1):
        if turn["role"] == "system":
            raise BadRequest(f"messages.{i}: a system message may only come first", f"messages.{i}.role")
    try:
        conversation = read_messages({"messages": turns}, need_answer=False)
    except RowProblem as e:
        raise BadRequest(f"messages: {e.describe({'messages': turns})}", "messages") from None
    if not conversation.messages or conversation.messages[-1].role == "assistant":
        raise BadRequest("the last message must be a user or tool message: it is what the model answers", "messages")
    first = 1 if turns[0]["role"] == "system" else 0  # read_messages took it as the system prompt
    messages: list[Message] = []
    for i, (request, message) in enumerate(zip(body.messages[first:], conversation.messages, strict=True),
                                           start=first):
        messages += _with_api_fields(request, message, f"messages.{i}")
    tools = None if body.tool_choice == "none" else _tools(body)
    return dataclasses.replace(conversation, messages=messages, tools=tools)


def request_thinking(tokenizer: Any, body: ChatCompletionRequest, default: bool | None) -> bool | None:
    """The thinking switch of this request: its chat_template_kwargs' enable_thinking, else the server's
    --enable_thinking. A template without the switch refuses it (a 400)."""
    kwargs = body.chat_template_kwargs or {}
    unknown = sorted(set(kwargs) - {"enable_thinking"})
    if unknown:
        raise BadRequest(f"chat_template_kwargs: only 'enable_thinking' is supported, not {unknown}",
                         "chat_template_kwargs")
    value = kwargs.get("enable_thinking", default)
    if value is not None and not isinstance(value, bool):
        raise BadRequest(f"chat_template_kwargs.enable_thinking must be true or false, not {value!r}",
                         "chat_template_kwargs.enable_thinking")
    try:
        thinking_switch(tokenizer, value)
    except UserError as e:
        raise BadRequest(f"chat_template_kwargs.enable_thinking: {e.message.removeprefix('--enable_thinking: ')}",
                         "chat_template_kwargs.enable_thinking") from None
    return value


def _text(message: ChatMessage) -> str:
    content = message.content
    return content if isinstance(content, str) else "".join(p.text for p in content or [])


def _with_api_fields(request: ChatMessage, message: Message, where: str) -> list[Message]:
    """The message with its reasoning, call id and calls (OpenAI's list form, which keeps the text written beside
    the calls and their ids)."""
    if request.role == "tool":
        return [dataclasses.replace(message, tool_call_id=request.tool_call_id)]
    if request.role != "assistant":
        return [message]
    message = dataclasses.replace(message, reasoning=request.reasoning_content or None)
    if not request.tool_calls:
        return [message]
    calls = []
    for k, call in enumerate(request.tool_calls):
        try:
            arguments = json.loads(call.function.arguments or "{}")
        except json.JSONDecodeError:
            arguments = None
        if not isinstance(arguments, dict):
            raise BadRequest(f"{where}.tool_calls.{k}.function.arguments must be a JSON object's text",
                             f"{where}.tool_calls")
        calls.append({"name": call.function.name, "arguments": arguments, **({"id": call.id} if call.id else {})})
    return [dataclasses.replace(message, tool_call=calls)]


def _tools(body: ChatCompletionRequest) -> list[dict[str, Any]] | None:
    if body.tool_choice not in SERVED_TOOL_CHOICES:
        raise BadRequest("tool_choice: only 'auto' and 'none' are supported by this server", "tool_choice")
    for k, tool in enumerate(body.tools or []):
        function = tool.get("function")
        if tool.get("type") != "function" or not isinstance(function, dict) or \
                not isinstance(function.get("name"), str) or not function["name"]:
            raise BadRequest(f"tools.{k}: expected {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}",
                             f"tools.{k}")
    return body.tools or None
