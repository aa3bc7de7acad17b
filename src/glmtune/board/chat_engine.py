"""The Chat page's model: glmtune's inference engine (the one infer, chat and serve use), loaded once per model and
adapter and shared by every browser; one answer is generated at a time."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from glmtune.board.command_line import glmtune_command
from glmtune.data.conversation import Conversation, Message

if TYPE_CHECKING:
    from glmtune.inference.engine import Engine, GenerationSettings

_lock = threading.Lock()
_loaded: dict[tuple[str, str | None], Engine] = {}


def engine(model: str, adapter: str | None) -> Engine:
    """The engine for (model, adapter); loading another one frees the previous (one model in memory at a time)."""
    from glmtune.inference.engine import Engine

    key = (model, adapter or None)
    if key not in _loaded:
        _loaded.clear()
        _loaded[key] = Engine(model, adapter or None)
    return _loaded[key]


def conversation(history: list[dict[str, str]], message: str, system: str | None) -> Conversation:
    """The chat so far (Gradio's messages: {"role", "content"}) and the new user message, as glmtune's form."""
    messages = [Message(turn["role"], _text(turn["content"])) for turn in history if turn["role"] in ("user",
                                                                                                   "assistant")]
    return Conversation(messages=[*messages, Message("user", message)], system=system or None)


def stream_answer(model: str, adapter: str | None, chat: Conversation, settings: GenerationSettings,
                  base: bool = False) -> Iterator[str]:
    """The answer so far, growing as it streams; `base`: as the base model answers (the adapter disabled)."""
    with _lock:
        loaded = engine(model, adapter)
        with loaded.adapter_disabled() if base else contextlib.nullcontext():
            text = ""
            for piece in loaded.stream(chat, settings):
                text += piece
                yield text


def chat_command(model: str, adapter: str | None, system: str | None, temperature: float, top_p: float,
                 max_new_tokens: int) -> list[str]:
    return glmtune_command("chat", {"model": model, "peft_path": adapter, "system": system,
                                    "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens})


def _text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # Gradio 6 may hand back [{"type": "text", "text": ...}]
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)

