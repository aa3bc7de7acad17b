"""A generated answer split into its reasoning (`<think>...</think>`), its text and its tool calls, whole or while
it streams.

One incremental splitter does both: the whole answer is fed at once and finished. While streaming, text that may
still turn out to be a marker (`<think>`, `</think>`, `<tool_call>`, a tool's name at the start of a GLM-4 answer)
is held back until the next piece resolves it, so a partial marker is never sent as text. Reasoning and text are
stripped of surrounding whitespace as the batched answer always was (whitespace is held until something follows).
A call that is not well formed stays in the text: the model wrote it, the client sees it.

ChatGLM3 and GLM-4 write several calls, or text and then a call, as several `<|assistant|>` segments in one answer
(`Let me look.<|assistant|>get_weather\n...`): each segment is read as ChatGLM3's own `process_response` reads it
(split on `<|assistant|>`, a first line that names a tool makes the segment a call), except that every text segment
is kept, not only the last.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from glmtune.inference.tool_calls import ToolCall, ToolCallForm, parse_name_line, parse_tagged, tool_names

THINK, END_THINK = "<think>", "</think>"
CALL, END_CALL = "<tool_call>", "</tool_call>"
SEGMENT = "<|assistant|>"  # a new assistant segment inside one answer (ChatGLM3, GLM-4)


@dataclass
class AnswerParts:
    content: str = ""
    reasoning: str | None = None  # None: the answer had no (or an empty) think block
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass
class AnswerDelta:
    """One streamed piece: exactly one of its fields is set."""

    reasoning: str = ""
    content: str = ""
    tool_call: ToolCall | None = None


@dataclass
class AnswerParser:
    """How to read one conversation's answer: the model's call form, the tools it was offered, and whether the
    prompt already opened the think block (templates whose generation prompt ends in `<think>`)."""

    form: ToolCallForm = "none"
    tools: list[dict[str, Any]] | None = None
    in_reasoning: bool = False

    def splitter(self) -> AnswerSplitter:
        return AnswerSplitter(self)

    def parse(self, text: str) -> AnswerParts:
        splitter = self.splitter()
        splitter.feed(text)
        splitter.finish()
        return splitter.parts


class AnswerSplitter:
    """Feed the answer's raw text (markers kept) piece by piece; each call returns the deltas now certain.
    `parts` holds the whole so far; after finish(), the whole answer."""

    def __init__(self, parser: AnswerParser):
        self.parser, self.parts = parser, AnswerParts()
        self._names = tool_names(parser.tools)
        self._state = "reasoning" if parser.in_reasoning else "start"
        self._buffer = ""
        self._reasoning, self._content = _Stripped(), _Stripped()
        self._out: list[AnswerDelta] = []

    def feed(self, text: str) -> list[AnswerDelta]:
        self._buffer += text
        self._advance(final=False)
        return self._take()

    def finish(self) -> list[AnswerDelta]:
        """The end of the answer: whatever was held back is resolved (a marker left incomplete is text)."""
        self._advance(final=True)
        self._reasoning.end()
        self._content.end()
        if self.parts.reasoning is not None:
            self.parts.reasoning = self.parts.reasoning or None
        return self._take()

    def deltas(self, pieces: Iterable[str]) -> Iterator[AnswerDelta]:
        """All deltas of a stream of pieces, the end included."""
        for piece in pieces:
            yield from self.feed(piece)
        yield from self.finish()

    def _take(self) -> list[AnswerDelta]:
        out, self._out = self._out, []
        return out

    def _advance(self, final: bool) -> None:
        """Consume the buffer while its state can be decided; each state returns False to wait for more text."""
        steps = {"start": self._start, "reasoning": self._in_reasoning, "answer_start": self._answer_start,
                 "name_line": self._name_line, "content": self._in_content, "call": self._in_call}
        while steps[self._state](final):
            pass

    def _start(self, final: bool) -> bool:
        text = self._buffer.lstrip()
        if text.startswith(THINK):
            self._buffer, self._state = text[len(THINK):], "reasoning"
            self.parts.reasoning = self.parts.reasoning or ""
            return True
        if not final and THINK.startswith(text):  # nothing yet, or a beginning of <think>
            return False
        self._state = "answer_start"
        return True

    def _in_reasoning(self, final: bool) -> bool:
        if self.parts.reasoning is None:
            self.parts.reasoning = ""
        if self._emit_before((END_THINK,), self._emit_reasoning, final) is None:
            return False
        self._buffer, self._state = self._buffer[len(END_THINK):], "answer_start"
        return True

    def _answer_start(self, final: bool) -> bool:
        self._state = "name_line" if self.parser.form == "name_line" and self._names else "content"
        return True

    def _name_line(self, final: bool) -> bool:
        """GLM-4 / ChatGLM3: a segment whose first line is a tool's name is a call, read once the segment ends (at
        the next `<|assistant|>` or the answer's end)."""
        text = self._buffer.lstrip()
        line, newline, _ = text.partition("\n")
        if not newline:
            if not final and any(name.startswith(text) for name in self._names):
                return False
            self._state = "content"
            return True
        if line.strip() not in self._names:
            self._state = "content"
            return True
        end = text.find(SEGMENT)
        if end < 0 and not final:
            return False
        call = parse_name_line(text if end < 0 else text[:end], self._names)
        if call is None:  # not a well-formed call: the model's text as it is
            self._state = "content"
            return True
        self._emit_call(call)
        self._buffer, self._state = "" if end < 0 else text[end:], "content"
        return True

    def _in_content(self, final: bool) -> bool:
        markers = (CALL, SEGMENT) if self.parser.form == "tagged" else (SEGMENT,)
        marker = self._emit_before(markers, self._emit_content, final)
        if marker == CALL:
            self._state = "call"
        elif marker == SEGMENT:  # the marker itself is no text; the next segment may be a call
            self._buffer, self._state = self._buffer[len(SEGMENT):], "answer_start"
        return marker is not None

    def _emit_before(self, markers: tuple[str, ...], emit: Callable[[str], None], final: bool) -> str | None:
        """Emit the buffer up to the first of `markers` and keep that marker onwards (returning it); without one,
        emit all but an end that could still become one (None: wait for more text)."""
        found = [(at, marker) for marker in markers if (at := self._buffer.find(marker)) >= 0]
        if found:
            at, marker = min(found)
        else:
            marker = None
            at = len(self._buffer) - (0 if final else max(_partial_suffix(self._buffer, m) for m in markers))
        emit(self._buffer[:at])
        self._buffer = self._buffer[at:]
        return marker

    def _in_call(self, final: bool) -> bool:
        end = self._buffer.find(END_CALL)
        if end < 0:
            if final:  # never closed (the budget ran out): text
                self._emit_content(self._buffer)
                self._buffer = ""
            return False
        block = self._buffer[: end + len(END_CALL)]
        call = parse_tagged(block[len(CALL): end], self.parser.tools)
        if call is None:
            self._emit_content(block)
        else:
            self._emit_call(call)
        self._buffer, self._state = self._buffer[end + len(END_CALL):], "content"
        return True

    def _emit_reasoning(self, text: str) -> None:
        if piece := self._reasoning.feed(text):
            self.parts.reasoning = (self.parts.reasoning or "") + piece
            self._out.append(AnswerDelta(reasoning=piece))

    def _emit_content(self, text: str) -> None:
        if piece := self._content.feed(text):
            self.parts.content += piece
            self._out.append(AnswerDelta(content=piece))

    def _emit_call(self, call: ToolCall) -> None:
        self.parts.tool_calls.append(call)
        self._out.append(AnswerDelta(tool_call=call))


class _Stripped:
    """Text pieces in, the same text out without its leading and trailing whitespace: trailing whitespace is held
    until something follows it, and dropped at the end."""

    def __init__(self) -> None:
        self._pending, self._started = "", False

    def feed(self, piece: str) -> str:
        text = self._pending + piece
        if not self._started:
            text = text.lstrip()
        body = text.rstrip()
        self._pending = text[len(body):]
        self._started = self._started or bool(body)
        return body

    def end(self) -> None:
        self._pending = ""


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that begins `marker` (and may become it with the next piece)."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0
