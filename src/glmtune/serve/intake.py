"""Reading a chat completion request before anything else sees it: its size, its encoding, its JSON, how deep it
nests, its fields' types and ranges, and how many messages it has.

Each refusal is a 4xx in OpenAI's error shape that names what was wrong. The body is read and parsed here rather than
by FastAPI, whose parsing answers every one of these faults with the same "There was an error parsing the body", lets
a lone UTF-16 surrogate through to the tokenizer (which cannot encode it: a 500), and leaves nesting unbounded (the
chat template renders `tools` recursively).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request

from glmtune.serve.errors import APIError
from glmtune.serve.schemas import ChatCompletionRequest

if TYPE_CHECKING:
    from glmtune.arguments import ServeArguments

# Deeper than any tool schema seen in practice (a dozen levels), far below Python's recursion limit of 1,000, which
# json, pydantic and the chat template's `tojson` would otherwise hit.
MAX_JSON_DEPTH = 64
BODY_TIMEOUT_S = 30.0  # a client that takes longer to send its request is answered 408 and its connection freed
MAX_VALIDATION_ERRORS = 5
Request_ = TypeVar("Request_", bound=BaseModel)


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask of the server: the `serve` options of the same names."""

    max_request_bytes: int
    max_messages: int
    max_prompt_tokens: int | None  # None: the model's context
    max_tokens_limit: int
    max_n: int

    @classmethod
    def from_arguments(cls, args: ServeArguments | None = None) -> RequestLimits:
        """The limits `args` set; None: the options' defaults."""
        if args is None:
            from glmtune.arguments import ServeArguments

            args = ServeArguments()
        return cls(args.max_request_bytes, args.max_messages, args.max_prompt_tokens, args.max_tokens_limit,
                   args.max_n)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, read no further than `limit` bytes: a declared length over it is refused before reading any.

    Raises:
        APIError: 413 for a body over the limit, 408 for one that does not arrive in time, 499 when the client
            left while sending it.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:  # a chunked body declares no length
                    raise _too_large(limit)
                chunks.append(chunk)
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {BODY_TIMEOUT_S:.0f} s",
                       code="request_timeout") from None
    except ClientDisconnect:
        raise APIError(499, "the client closed the request", code="client_closed") from None
    return b"".join(chunks)


def parse_request(body: bytes, content_type: str | None, max_messages: int,
                  schema: type[Request_] = ChatCompletionRequest) -> Request_:
    """A body's bytes -> the validated request (a chat completion's, or `schema`'s).

    Raises:
        APIError: 400, saying what is wrong and where (`param`: the field's path, as `messages.0.content`).
    """
    media = (content_type or "").split(";")[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        # Required as FastAPI requires it: a browser page cannot send it without the server's consent (CORS).
        raise APIError(400, f"the request body must be a JSON object sent with 'Content-Type: application/json', "
                       f"not {content_type or 'no content type'}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid UTF-8 (byte {e.start}: {e.reason})") from None
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as e:
        raise APIError(400, f"the request body is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") \
            from None
    except RecursionError:
        raise APIError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as e:  # NaN, Infinity: Python's json reads them, JSON has no such values
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, not a JSON {_json_type(data)}")
    check_json(data)
    messages = data.get("messages")
    if isinstance(messages, list) and len(messages) > max_messages:
        raise APIError(400, f"messages: {len(messages)} messages; this server takes at most {max_messages} "
                       "(its --max_messages)", param="messages", code="too_many_messages")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise validation_error(e, data) from None


def check_json(data: Any) -> None:
    """Refuse nesting deeper than MAX_JSON_DEPTH and text that is not Unicode (a lone UTF-16 surrogate, which JSON's
    `\\ud800` escapes can write but no UTF-8 encoder takes). Iterative: the depth is the client's to choose. A
    value's path is kept as a (parent's trail, key) pair and spelled out only for a refusal."""
    stack: list[tuple[Any, tuple | None, int]] = [(data, None, 0)]
    while stack:
        value, trail, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            path = _spelled(trail)
            raise APIError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels (at {path})",
                           param=path.split(".")[0])
        if isinstance(value, str):
            _check_text(value, trail)
        elif isinstance(value, dict):
            for key, item in value.items():
                _check_text(key, trail)
                stack.append((item, (trail, key), depth + 1))
        elif isinstance(value, list):
            stack += [(item, (trail, i), depth + 1) for i, item in enumerate(value)]


def _spelled(trail: tuple | None) -> str:
    parts = []
    while trail is not None:
        trail, key = trail
        parts.append(str(key))
    return ".".join(reversed(parts))


def validation_error(error: ValidationError, data: Any) -> APIError:
    """pydantic's errors -> one 400 naming each field at fault (the first as `param`). A union's branches each give
    an error; where one branch reached deeper into the input (`stop.1` under `stop`), that one is meant."""
    found: dict[str, list[str]] = {}
    for problem in error.errors(include_url=False):
        param = _input_path(problem["loc"], data, problem["type"] == "missing")
        if problem["type"] == "extra_forbidden" and len(problem["loc"]) == 1:
            text = f"Unrecognized request argument supplied: {param}"  # OpenAI's own words
        elif problem["type"] == "extra_forbidden":
            text = "unknown field"
        else:
            text = problem["msg"]
        found.setdefault(param, []).append(text)
    params = [p for p in found if not any(other.startswith(f"{p}.") for other in found)] or list(found)
    lines = [found[p][0] if found[p][0].startswith("Unrecognized") else
             f"{p or 'body'}: {' or '.join(dict.fromkeys(found[p]))}" for p in params]
    more = len(lines) - MAX_VALIDATION_ERRORS
    return APIError(400, "; ".join(lines[:MAX_VALIDATION_ERRORS]) + (f"; and {more} more" if more > 0 else ""),
                    param=params[0] or None)


def _input_path(loc: tuple[Any, ...], data: Any, missing: bool) -> str:
    """A pydantic location as a path into the request (`messages.0.content`): the keys and indexes that are in the
    input, and a missing field's name, without pydantic's names of union branches (`str`, `list[...]`)."""
    parts, value = [], data
    for k, part in enumerate(loc):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and isinstance(part, int) and 0 <= part < len(value):
            value = value[part]
        elif missing and k == len(loc) - 1:
            parts.append(str(part))
            break
        elif isinstance(part, str):  # a union branch's name
            continue
        else:
            break
        parts.append(str(part))
    return ".".join(parts)


def _check_text(text: str, trail: tuple | None) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        path = _spelled(trail)
        raise APIError(400, f"{path or 'body'}: a lone UTF-16 surrogate ({text[e.start]!a}) is not text: encode "
                       "characters outside the Basic Multilingual Plane as a surrogate pair", param=path or None) \
            from None


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON value")


def _json_type(value: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is over {limit} bytes, this server's --max_request_bytes",
                    code="request_too_large")
