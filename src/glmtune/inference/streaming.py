"""One answer streamed as it is generated, and what is counted about an answer (tokens, why it ended).

transformers' `generate` is a blocking call, so it runs in a worker thread and its `TextIteratorStreamer` hands
the decoded pieces over a queue; the streamer holds back an incomplete multi-byte character until the token that
completes it arrives. Stopping early (Ctrl-C in `chat`, a client leaving `serve`) sets an event that a stopping
criterion checks before each new token, so the worker ends within one token.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from transformers import StoppingCriteria, TextIteratorStreamer

from glmtune.inference.answers import AnswerDelta, AnswerParser, AnswerParts
from glmtune.inference.decoding import AnswerDecoder
from glmtune.inference.logprobs import LogprobRecorder
from glmtune.inference.tool_calls import ToolCall


@dataclass
class Completion:
    text: str  # the answer without its reasoning and tool calls, stripped (as `infer` writes it)
    prompt_tokens: int
    completion_tokens: int  # generated tokens up to and including the stop token
    finish_reason: str  # "stop" (a stop token), "length" (the budget ran out) or "tool_calls" (the model called one)
    reasoning: str | None = None  # the think block's text, when the answer had one
    tool_calls: list[ToolCall] = field(default_factory=list)

    def extra_fields(self) -> dict[str, Any]:
        """What infer and eval write beside the answer's text: `reasoning` and `tool_calls` (OpenAI's form), when
        the model thought or called a tool."""
        fields: dict[str, Any] = {}
        if self.reasoning:
            fields["reasoning"] = self.reasoning
        if self.tool_calls:
            fields["tool_calls"] = [call.to_openai() for call in self.tool_calls]
        return fields


def count_completion(parts: AnswerParts, prompt_tokens: int, new_ids: list[int], stop_ids: list[int]) -> Completion:
    """new_ids: what generate produced after the prompt, within the budget (a batch pads finished rows)."""
    stops = set(stop_ids)
    end = next((i + 1 for i, token in enumerate(new_ids) if token in stops), None)
    reason = "tool_calls" if parts.tool_calls else "length" if end is None else "stop"
    return Completion(parts.content, prompt_tokens, len(new_ids) if end is None else end, reason, parts.reasoning,
                      parts.tool_calls)


class TextStream:
    """Iterate for the answer's text pieces (its reasoning and tool calls left out), or `deltas()` for all of it;
    `pieces()` gives the raw decoded text, markers included. Once iteration ends, `completion` holds the whole
    answer and its counts: read through deltas(), the very parts (and tool-call ids) the deltas gave; read through
    pieces(), the whole text split once at its end. Closing the iterator early (or an exception in the reader, such
    as KeyboardInterrupt) stops the generation; `completion` then stays None. With `logprobs` (how many most
    likely tokens to report per step, 0 for none), `logprobs.entries` grows by one entry per generated token, each
    before that token's text is handed on; without, `logprobs` is None."""

    def __init__(self, model: Any, tokenizer: Any, input_ids: Any, attention_mask: Any, generation_config: Any,
                 stop_ids: list[int], parser: AnswerParser | None = None, logprobs: int | None = None,
                 generate_kwargs: dict[str, Any] | None = None):
        self.completion: Completion | None = None
        self.parser = parser or AnswerParser()
        self.logprobs = None if logprobs is None else LogprobRecorder(logprobs)
        self._model, self._tokenizer = model, tokenizer
        self._input_ids, self._attention_mask = input_ids, attention_mask  # (1, prompt)
        self._config, self._stop_ids = generation_config, stop_ids
        self._generate_kwargs = generate_kwargs or {}  # e.g. peft's adapter_names (generation_kwargs_for)
        self._cancel = threading.Event()
        self._text, self._new_ids = "", []

    def __iter__(self) -> Iterator[str]:
        deltas = self.deltas()
        try:
            for delta in deltas:
                if delta.content:
                    yield delta.content
        finally:
            deltas.close()  # closing this iterator stops the generation, as closing pieces() does

    def deltas(self) -> Iterator[AnswerDelta]:
        splitter = self.parser.splitter()
        generated = self._generate()
        try:
            yield from splitter.deltas(generated)
        finally:
            generated.close()
        self.completion = self._complete(splitter.parts)

    def pieces(self) -> Iterator[str]:
        yield from self._generate()
        self.completion = self._complete(self.parser.parse(self._text))

    def _complete(self, parts: AnswerParts) -> Completion:
        return count_completion(parts, self._input_ids.shape[1], self._new_ids, self._stop_ids)

    def _generate(self) -> Iterator[str]:
        """The decoded pieces; once exhausted, `_text` and `_new_ids` hold the whole answer."""
        from transformers import StoppingCriteriaList

        decoder = AnswerDecoder(self._tokenizer)
        # The decoder stands in for the tokenizer: the streamer only decodes.
        streamer = TextIteratorStreamer(decoder, skip_prompt=True) if self.logprobs is None else \
            _RecordingStreamer(decoder, self.logprobs)
        result: dict[str, Any] = {}

        def work() -> None:
            try:
                hooked = contextlib.nullcontext() if self.logprobs is None else self.logprobs.hooked(self._model)
                # The tokenizer lets transformers match the config's stop strings, if any.
                with hooked:
                    result["output"] = self._model.generate(
                        input_ids=self._input_ids, attention_mask=self._attention_mask,
                        generation_config=self._config, streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([_Cancelled(self._cancel)]), tokenizer=self._tokenizer,
                        **self._generate_kwargs)
            except BaseException as e:  # handed to the reader, which re-raises it
                result["error"] = e
                streamer.end()  # wakes the reader, which would otherwise wait forever

        worker = threading.Thread(target=work, name="glmtune-generate", daemon=True)
        worker.start()
        try:
            yield from streamer
        except BaseException:  # GeneratorExit (closed early), KeyboardInterrupt, ...
            self._cancel.set()
            raise
        finally:
            worker.join()
        if "error" in result:
            raise result["error"]
        self._new_ids = result["output"][0, self._input_ids.shape[1]:].tolist()
        self._text = decoder.decode(self._new_ids)


class _RecordingStreamer(TextIteratorStreamer):
    """A TextIteratorStreamer that records each new token's log-probability before handing its text on."""

    def __init__(self, decoder: AnswerDecoder, recorder: LogprobRecorder):
        super().__init__(decoder, skip_prompt=True)
        self.recorder = recorder

    def put(self, value: Any) -> None:
        if not (self.skip_prompt and self.next_tokens_are_prompt):  # the first call hands over the prompt
            self.recorder.record(int(value.reshape(-1)[0]))
        super().put(value)


class _Cancelled(StoppingCriteria):
    """A stopping criterion (transformers calls it after each token) that is true once the event is set."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)
