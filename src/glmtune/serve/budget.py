"""What a chat or text completion request may ask, and the generation settings it gets: the checks both endpoints
share (choices, max_tokens, the prompt against --max_prompt_tokens and the model's context, sampling)."""

from __future__ import annotations

from typing import Any

from glmtune.inference.engine import DEFAULT_MAX_NEW_TOKENS, GenerationSettings
from glmtune.serve.errors import APIError
from glmtune.serve.intake import RequestLimits

# Below this a temperature is greedy decoding (vLLM's threshold): dividing logits by less overflows to inf, and
# sampling from the NaN probabilities that follow raises.
GREEDY_BELOW_TEMPERATURE = 1e-5


def check_asked(body: Any, limits: RequestLimits, choices: int) -> None:
    """Refuse, before the prompt is read, an unserved field, more choices than --max_n, or a max_tokens over
    --max_tokens_limit (a 400 naming the field)."""
    unserved = body.unserved()
    if unserved:
        raise APIError(400, f"'{unserved}' is not supported by this server: leave it out", param=unserved)
    if choices > limits.max_n:
        raise APIError(400, f"n is {body.n}; this server answers at most {limits.max_n} choices per request "
                       "(its --max_n)" if choices == (body.n or 1) else
                       f"{choices} choices asked (n times the prompts); this server answers at most "
                       f"{limits.max_n} per request (its --max_n)", param="n")
    max_tokens, param = asked_tokens(body)
    if max_tokens is not None and max_tokens > limits.max_tokens_limit:
        raise APIError(400, f"{param} is {max_tokens}; this server answers at most {limits.max_tokens_limit} "
                       "tokens per choice (its --max_tokens_limit)", param=param)


def asked_tokens(body: Any) -> tuple[int | None, str]:
    """The request's answer budget and the field that gave it (chat's newer max_completion_tokens wins)."""
    newer = getattr(body, "max_completion_tokens", None)
    return (newer, "max_completion_tokens") if newer else (body.max_tokens, "max_tokens")


def answer_settings(body: Any, prompt_tokens: int, context: int | None, limits: RequestLimits, prompt_param: str,
                    thinking: bool | None = None, default_max_tokens: int = DEFAULT_MAX_NEW_TOKENS
                    ) -> GenerationSettings:
    """The generation settings of a prompt of `prompt_tokens` tokens, or a 400 when it is over --max_prompt_tokens
    or it and the answer do not fit the model's context. No max_tokens: `default_max_tokens`, within the context."""
    max_tokens, param = asked_tokens(body)
    if limits.max_prompt_tokens is not None and prompt_tokens > limits.max_prompt_tokens:
        raise APIError(400, f"the prompt is {prompt_tokens} tokens; this server takes at most "
                       f"{limits.max_prompt_tokens} (its --max_prompt_tokens)", param=prompt_param,
                       code="context_length_exceeded")
    if context is not None and prompt_tokens >= context:
        raise APIError(400, f"the prompt is {prompt_tokens} tokens; the model's context is {context} tokens",
                       param=prompt_param, code="context_length_exceeded")
    if context is not None and max_tokens is not None and prompt_tokens + max_tokens > context:
        raise APIError(400, f"{param} {max_tokens} plus the {prompt_tokens}-token prompt exceed the model's "
                       f"context of {context} tokens: ask for at most {context - prompt_tokens}",
                       param=param, code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = min(default_max_tokens, context - prompt_tokens) if context else default_max_tokens
    temperature = 1.0 if body.temperature is None else body.temperature
    if temperature < GREEDY_BELOW_TEMPERATURE:
        temperature = 0.0
    return GenerationSettings(max_new_tokens=max_tokens, temperature=temperature, top_p=body.top_p or 1.0,
                              enable_thinking=thinking)
