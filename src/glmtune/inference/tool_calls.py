"""Tool calls as GLM models write them, read into OpenAI's form (an id, the function's name, its arguments as JSON).

The forms:
- tagged (GLM-4.5/4.6/4.7): `<tool_call>NAME\n<arg_key>K</arg_key>\n<arg_value>V</arg_value>...</tool_call>`
  (GLM-4.7 writes it without the newlines: `<tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value>...`), a
  value written as JSON unless it is a string; the Hermes form `<tool_call>{"name": ..., "arguments": ...}
  </tool_call>` (Qwen and others) is read too.
- name line (GLM-4-9B-chat, GLM-4-0414, GLM-Z1, ChatGLM3): an answer (or one of its `<|assistant|>` segments) is
  `NAME\n{JSON arguments}` (GLM-4) or `NAME\n```python\ntool_call(k=v, ...)\n```` (ChatGLM3). Such an answer is
  told from an ordinary one only by NAME being one of the conversation's tools, as the models' own demos do. Their
  templates write a call in history as an assistant message's `metadata` (the name) and content (the arguments).
Each parser returns None for text that is not a well-formed call, which is then kept as the answer's text.
"""

from __future__ import annotations

import ast
import json
import re
import secrets
from dataclasses import dataclass
from typing import Any, Literal

from glmtune.data.templates import METADATA_CALLS

ToolCallForm = Literal["tagged", "name_line", "none"]

_PAIR = re.compile(r"\s*<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.DOTALL)
_CODE_BLOCK = re.compile(r"^```(?:python)?\s*\n(.*?)\n?```$", re.DOTALL)


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object's text, as OpenAI's API carries it
    id: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            self.id = f"call_{secrets.token_hex(12)}"

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def tool_call_form(chat_template: str | None) -> ToolCallForm:
    """How the model of this chat template writes a call: the template writes calls in history that way."""
    template = chat_template or ""
    if "<tool_call>" in template:
        return "tagged"
    if METADATA_CALLS.search(template) or "tool_call(" in template or "tool_calls" in template:
        return "name_line"
    return "none"


def tool_names(tools: list[dict[str, Any]] | None) -> set[str]:
    """The function names of tool definitions ({"type": "function", "function": {...}} or bare {name, ...})."""
    names = set()
    for tool in tools or []:
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            names.add(function["name"])
    return names


def parse_tagged(body: str, tools: list[dict[str, Any]] | None = None) -> ToolCall | None:
    """The call inside `<tool_call>...</tool_call>` (body: what lies between the tags)."""
    text = body.strip()
    if text.startswith("{"):
        return _hermes(text)
    name, _, rest = text.partition("<arg_key>")
    name, rest = name.strip(), "<arg_key>" + rest if rest else ""
    if not name or any(c in name for c in "<>\n"):
        return None
    string_params = _string_parameters(tools, name)
    arguments: dict[str, Any] = {}
    position = 0
    for match in _PAIR.finditer(rest):
        if match.start() != position:
            return None  # text between the pairs: not the form
        key, value = match.group(1).strip(), match.group(2)
        arguments[key] = value if key in string_params else _json_or_text(value)
        position = match.end()
    if rest[position:].strip():
        return None
    return ToolCall(name, json.dumps(arguments, ensure_ascii=False))


def parse_name_line(text: str, names: set[str]) -> ToolCall | None:
    """A whole answer that is one call: `NAME\n{JSON}` (GLM-4) or `NAME\n```python\ntool_call(...)\n```` (ChatGLM3).
    NAME must be one of the tools'."""
    name, newline, rest = text.strip().partition("\n")
    name, rest = name.strip(), rest.strip()
    if not newline or name not in names:
        return None
    block = _CODE_BLOCK.match(rest)
    arguments = _python_call(block.group(1)) if block else _json_object(rest)
    if arguments is None:
        return None
    return ToolCall(name, json.dumps(arguments, ensure_ascii=False))


def _hermes(text: str) -> ToolCall | None:
    call = _json_object(text)
    if call is None or not isinstance(call.get("name"), str) or not call["name"]:
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    if isinstance(arguments, str):
        arguments = _json_object(arguments)
    if not isinstance(arguments, dict):
        return None
    return ToolCall(call["name"], json.dumps(arguments, ensure_ascii=False))


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _json_or_text(value: str) -> Any:
    """An XML argument's value: JSON when it reads as JSON (numbers, lists, objects...), else the text itself."""
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _string_parameters(tools: list[dict[str, Any]] | None, name: str) -> set[str]:
    """The parameters of tool `name` whose schema says string: their values stay text even when they read as JSON
    ("42" for a string parameter is the string "42")."""
    for tool in tools or []:
        function = tool.get("function", tool) if isinstance(tool, dict) else {}
        if isinstance(function, dict) and function.get("name") == name:
            properties = (function.get("parameters") or {}).get("properties") or {}
            return {k for k, v in properties.items() if isinstance(v, dict) and v.get("type") == "string"}
    return set()


def _python_call(code: str) -> dict[str, Any] | None:
    """The keyword arguments of ChatGLM3's `tool_call(k=v, ...)`, read as literals (never evaluated)."""
    try:
        tree = ast.parse(code.strip(), mode="eval")
    except SyntaxError:
        return None
    call = tree.body
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "tool_call") \
            or call.args or any(k.arg is None for k in call.keywords):
        return None
    try:
        return {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    except (ValueError, SyntaxError, TypeError):
        return None
