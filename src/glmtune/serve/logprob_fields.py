"""Recorded token log-probabilities in OpenAI's two shapes: chat's `logprobs.content` (one object per token, with
its bytes and top_logprobs) and the legacy completions' parallel lists."""

from __future__ import annotations

from typing import Any

from glmtune.inference.logprobs import TokenLogprob, token_bytes, token_text
from glmtune.serve.schemas import ChoiceLogprobs, CompletionLogprobs, TokenLogprobItem, TopLogprob


def chat_logprobs(tokenizer: Any, entries: list[TokenLogprob]) -> ChoiceLogprobs:
    return ChoiceLogprobs(content=[
        TokenLogprobItem(**_token(tokenizer, e.token_id, e.logprob),
                         top_logprobs=[TopLogprob(**_token(tokenizer, i, lp)) for i, lp in e.top])
        for e in entries])


def completion_logprobs(tokenizer: Any, entries: list[TokenLogprob], offset: int = 0) -> CompletionLogprobs:
    """`offset`: where the first token starts in the choice's text (the length of the pieces streamed before)."""
    tokens = [token_text(tokenizer, e.token_id) for e in entries]
    starts = []
    for token in tokens:
        starts.append(offset)
        offset += len(token)
    return CompletionLogprobs(tokens=tokens, token_logprobs=[e.logprob for e in entries],
                              top_logprobs=[{token_text(tokenizer, i): lp for i, lp in e.top} for e in entries],
                              text_offset=starts)


def _token(tokenizer: Any, token_id: int, logprob: float) -> dict[str, Any]:
    return {"token": token_text(tokenizer, token_id), "logprob": logprob,
            "bytes": list(token_bytes(tokenizer, token_id))}
