"""`POST /v1/completions`, OpenAI's legacy text completion, for tools that still call it: the prompt is continued as
it is, with no chat template, and the answer is plain text (no reasoning or tool calls split off).

The prompt is a text, several texts, token ids, or several lists of token ids; texts are tokenized as vLLM does,
with the tokenizer's special tokens (GLM's `[gMASK]<sop>` prefix). Each prompt is answered with n choices, choice
i answering prompt i // n. As OpenAI, max_tokens defaults to 16. `echo`, `suffix`, `best_of` other than n,
penalties and logit_bias are refused (a 400), not ignored.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from glmtune.serve.budget import answer_settings, check_asked
from glmtune.serve.errors import APIError, client_closed, internal_error
from glmtune.serve.intake import RequestLimits
from glmtune.serve.logprob_fields import completion_logprobs
from glmtune.serve.scheduler import AnswerPiece, ChoiceEnd, Event, JobError
from glmtune.serve.schemas import CompletionChoice, CompletionRequest, TextCompletion, Usage, sse_data
from glmtune.serve.streamed import StreamedAnswer, each_event

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for completions


def prepare_completion(engine: Any, body: CompletionRequest, context: int | None,
                       limits: RequestLimits) -> tuple[list[list[int]], Any]:
    """The prompts as token ids and the generation settings, or a 400 that says what is wrong."""
    texts_or_ids = [body.prompt] if isinstance(body.prompt, str) or isinstance(body.prompt[0], int) else body.prompt
    check_asked(body, limits, (body.n or 1) * len(texts_or_ids))
    vocabulary = len(engine.tokenizer)
    prompts = []
    for k, prompt in enumerate(texts_or_ids):
        where = "prompt" if len(texts_or_ids) == 1 else f"prompt.{k}"
        ids = engine.tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise APIError(400, f"{where}: the prompt is no tokens", param="prompt")
        if max(ids) >= vocabulary:
            raise APIError(400, f"{where}: token id {max(ids)} is not in the model's vocabulary of {vocabulary}",
                           param="prompt")
        prompts.append(ids)
    settings = answer_settings(body, max(len(p) for p in prompts), context, limits, "prompt",
                               default_max_tokens=DEFAULT_COMPLETION_TOKENS)
    return prompts, settings


class CompletionAnswer(StreamedAnswer):
    """Turns a job's events into a text_completion, or into text_completion server-sent events."""

    def __init__(self, model_name: str, prompt_tokens: int, choices: int, tokenizer: Any, logprobs: bool):
        super().__init__(model_name, prompt_tokens, choices, tokenizer, logprobs)
        self.offsets = [0] * choices  # each choice's text streamed so far: where its next token starts

    async def whole(self, batches: AsyncIterator[list[Event]]) -> TextCompletion | Any:
        texts, entries = [""] * self.choices, [[] for _ in range(self.choices)]
        ends: dict[int, ChoiceEnd] = {}
        async for event in each_event(batches):
            if isinstance(event, AnswerPiece):
                texts[event.index] += event.delta.content
            elif isinstance(event, ChoiceEnd):
                ends[event.index] = event
            elif isinstance(event, JobError):
                return internal_error(event.error)
            if isinstance(event, AnswerPiece | ChoiceEnd):
                entries[event.index] += event.logprobs or []
        if len(ends) < self.choices:  # the client left; nobody reads this
            return client_closed()
        choices = [CompletionChoice(index=i, text=texts[i], finish_reason=ends[i].finish_reason,
                                    logprobs=completion_logprobs(self.tokenizer, entries[i]) if self.logprobs
                                    else None) for i in range(self.choices)]
        return TextCompletion(id=self.id, created=self.created, model=self.model_name, choices=choices,
                              usage=self.usage(sum(e.completion_tokens for e in ends.values())))

    def event_chunks(self, event: AnswerPiece | ChoiceEnd) -> list[str]:
        logprobs = None
        if self.logprobs:
            logprobs = completion_logprobs(self.tokenizer, event.logprobs or [], self.offsets[event.index])
            self.offsets[event.index] += sum(len(t) for t in logprobs.tokens)
        if isinstance(event, AnswerPiece):
            choice = CompletionChoice(index=event.index, text=event.delta.content, logprobs=logprobs,
                                      finish_reason=None)
        else:
            choice = CompletionChoice(index=event.index, text="", logprobs=logprobs, finish_reason=event.finish_reason)
        return [self._chunk([choice])]

    def usage_chunk(self, usage: Usage) -> str:
        return self._chunk([], usage)

    def _chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        chunk = TextCompletion(id=self.id, created=self.created, model=self.model_name, choices=choices, usage=usage)
        return sse_data(chunk.model_dump_json())
