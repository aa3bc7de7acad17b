"""The one internal form every input format is read into."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Message:
    role: str  # "user", "assistant", "observation" (a tool's result)
    content: str
    train: bool = False  # take the loss on this message (assistant turns only)
    # An assistant's call {"name": ..., "arguments": ...} (ShareGPT's function_call turn, whose content is the call's
    # own text), or the list of its calls in OpenAI's form ({"name", "arguments", "id"?} each, content beside them).
    tool_call: dict[str, Any] | list[dict[str, Any]] | None = None
    reasoning: str | None = None  # an assistant's thinking before its answer (<think>...</think>)
    tool_call_id: str | None = None  # a tool result's: the id of the call it answers (OpenAI's form)

    def calls(self) -> list[dict[str, Any]]:
        """The assistant's tool calls, as a list whatever form they came in."""
        if self.tool_call is None:
            return []
        return self.tool_call if isinstance(self.tool_call, list) else [self.tool_call]


@dataclass
class Conversation:
    """A chat: optional system prompt and alternating messages. Plain text rows use `text` instead."""

    messages: list[Message] = field(default_factory=list)
    system: str | None = None
    tools: list[dict] | None = None  # tool definitions, given to the chat template as `tools`
    text: str | None = None  # plain text, trained on every token, no template
    location: str | None = None  # "file:line" of the row it came from, for error messages

    def prompt_part(self) -> Conversation:
        """The conversation up to (not including) its last assistant message: what inference is asked."""
        if self.messages and self.messages[-1].role == "assistant":
            return self.upto(len(self.messages) - 1)
        return self

    def upto(self, n: int) -> Conversation:
        """The same conversation with only its first n messages."""
        return Conversation(messages=self.messages[:n], system=self.system, tools=self.tools, location=self.location)

    def to_chat_messages(self) -> list[dict[str, str]]:
        """The list of {"role", "content"} dicts that `tokenizer.apply_chat_template` takes."""
        out = [{"role": "system", "content": self.system}] if self.system else []
        return out + [{"role": m.role, "content": m.content} for m in self.messages]

    def to_record(self) -> dict[str, Any]:
        """A flat form for an Arrow table (tools as JSON text: their schemas differ from row to row)."""
        return {"messages": [{"role": m.role, "content": m.content, "train": m.train,
                              "tool_call": json.dumps(m.tool_call) if m.tool_call else None,
                              "reasoning": m.reasoning, "tool_call_id": m.tool_call_id} for m in self.messages],
                "system": self.system, "tools": json.dumps(self.tools) if self.tools else None,
                "text": self.text, "location": self.location}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Conversation:
        messages = [Message(m["role"], m["content"], m["train"], json.loads(m["tool_call"]) if m["tool_call"] else None,
                            m.get("reasoning"), m.get("tool_call_id")) for m in record["messages"] or []]
        return cls(messages=messages, system=record["system"],
                   tools=json.loads(record["tools"]) if record["tools"] else None, text=record["text"],
                   location=record["location"])
