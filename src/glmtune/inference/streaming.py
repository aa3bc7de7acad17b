"""One answer streamed as it is generated, and what is counted about an answer (tokens, why it ended).

transformers' `generate` is a blocking call, so it runs in a worker thread and its `TextIteratorStreamer` hands
the decoded pieces over a queue; the streamer holds back an incomplete multi-byte character until the token that
completes it arrives. Stopping early (Ctrl-C in `chat`, a client leaving `serve`) sets an event that a stopping
criterion checks before each new token, so the worker ends within one token.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from transformers import StoppingCriteria


@dataclass
class Completion:
    text: str  # decoded without special tokens, stripped (as `infer` writes it)
    prompt_tokens: int
    completion_tokens: int  # generated tokens up to and including the stop token
    finish_reason: str  # "stop" (a stop token) or "length" (the budget ran out)


def count_completion(text: str, prompt_tokens: int, new_ids: list[int], stop_ids: list[int]) -> Completion:
    """new_ids: what generate produced after the prompt, within the budget (a batch pads finished rows)."""
    stops = set(stop_ids)
    end = next((i + 1 for i, token in enumerate(new_ids) if token in stops), None)
    if end is None:
        return Completion(text, prompt_tokens, len(new_ids), "length")
    return Completion(text, prompt_tokens, end, "stop")


class TextStream:
    """Iterate for the answer's text pieces; once iteration ends, `completion` holds the whole answer and its
    counts. Closing the iterator early (or an exception in the reader, such as KeyboardInterrupt) stops the
    generation; `completion` then stays None."""

    def __init__(self, model: Any, tokenizer: Any, input_ids: Any, attention_mask: Any, generation_config: Any,
                 stop_ids: list[int]):
        self.completion: Completion | None = None
        self._model, self._tokenizer = model, tokenizer
        self._input_ids, self._attention_mask = input_ids, attention_mask  # (1, prompt)
        self._config, self._stop_ids = generation_config, stop_ids
        self._cancel = threading.Event()

    def __iter__(self) -> Iterator[str]:
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        streamer = TextIteratorStreamer(self._tokenizer, skip_prompt=True, skip_special_tokens=True)
        result: dict[str, Any] = {}

        def work() -> None:
            try:
                # The tokenizer lets transformers match the config's stop strings, if any.
                result["output"] = self._model.generate(
                    input_ids=self._input_ids, attention_mask=self._attention_mask, generation_config=self._config,
                    streamer=streamer, stopping_criteria=StoppingCriteriaList([_Cancelled(self._cancel)]),
                    tokenizer=self._tokenizer)
            except BaseException as e:  # handed to the reader, which re-raises it
                result["error"] = e
                streamer.end()  # wakes the reader, which would otherwise wait forever

        worker = threading.Thread(target=work, name="glmtune-generate", daemon=True)
        worker.start()
        try:
            yield from strip_stream(streamer)
        except BaseException:  # GeneratorExit (closed early), KeyboardInterrupt, ...
            self._cancel.set()
            raise
        finally:
            worker.join()
        if "error" in result:
            raise result["error"]
        new_ids = result["output"][0, self._input_ids.shape[1]:].tolist()
        text = self._tokenizer.decode(new_ids, skip_special_tokens=True).strip()
        self.completion = count_completion(text, self._input_ids.shape[1], new_ids, self._stop_ids)


def strip_stream(pieces: Iterable[str]) -> Iterator[str]:
    """The pieces with the answer's leading and trailing whitespace left out, so that they join to the same text
    as the batched answer (`.strip()`): GLM-4's answers start with the newline after `<|assistant|>`. Whitespace
    is held back until something follows it."""
    pending, started = "", False
    for piece in pieces:
        text = pending + piece
        if not started:
            text = text.lstrip()
        body = text.rstrip()
        pending = text[len(body):]
        if body:
            started = True
            yield body


class _Cancelled(StoppingCriteria):
    """A stopping criterion (transformers calls it after each token) that is true once the event is set."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)
