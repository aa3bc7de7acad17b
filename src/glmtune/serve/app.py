"""The OpenAI-compatible HTTP API: `GET /v1/models` and `POST /v1/chat/completions`, streamed or not.

Every request is checked before it takes a place in the worker's line (its body by `intake`; here its roles, the
chat template, its limits and the token budget against the model's context), so that a bad request answers 4xx at
once and the worker only generates. Reading and checking are bounded too: at most --max_queue requests are read and
checked at a time (one more answers 429 before its body is read), as many wait in the worker's line (one more
answers 429 once checked: a bad request still learns what is wrong with it), and the checks run on one thread of
their own, off the event loop, so that tokenizing a long prompt never stalls the other clients' streams.
Errors of every kind answer in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from jinja2 import TemplateError
from starlette.exceptions import HTTPException

from glmtune.data.conversation import Conversation
from glmtune.data.templates import encode_prompt
from glmtune.errors import UserError
from glmtune.inference.engine import DEFAULT_MAX_NEW_TOKENS, GenerationSettings
from glmtune.serve.batching import BatchLimits, make_worker
from glmtune.serve.errors import APIError, error_response
from glmtune.serve.intake import RequestLimits, parse_request, read_body
from glmtune.serve.messages import BadRequest, request_conversation, request_thinking
from glmtune.serve.scheduler import AnswerPiece, ChoiceEnd, Job, JobEnd, JobError, QueueFull, Worker
from glmtune.serve.schemas import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    ModelCard,
    ModelList,
    StreamedToolCall,
    ToolCallItem,
    Usage,
)

log = logging.getLogger("glmtune.serve")
DISCONNECT_POLL_S = 0.25  # how often a request waiting on the worker checks that its client is still there
# Below this a temperature is greedy decoding (vLLM's threshold): dividing logits by less overflows to inf, and
# sampling from the NaN probabilities that follow raises.
GREEDY_BELOW_TEMPERATURE = 1e-5
NAME_SHOWN_CHARS = 100  # how much of an unknown model name an error repeats


def create_app(engine: Any, model_name: str, api_key: str | None = None, max_queue: int = 64,
               enable_thinking: bool | None = None, limits: RequestLimits | None = None,
               batching: BatchLimits | None = None) -> FastAPI:
    """The FastAPI app of the OpenAI-compatible API over `engine`; its worker thread runs for the app's lifespan.

    Args:
        engine: a glmtune Engine, or a stand-in with its `tokenizer`, `model.config` and `stream` (the tests inject
            a slow one).
        model_name: the model id /v1/models lists and answers carry.
        api_key: the bearer key every request must send; None for none.
        max_queue: requests that may wait while one is answered; one more answers 429.
        enable_thinking: the chat template's thinking switch (--enable_thinking), unless a request's
            chat_template_kwargs sets it.
        limits: what one request may ask (size, messages, prompt, max_tokens, n); None: serve's defaults.
        batching: how large the running batch may grow; None: serve's defaults.
    """
    limits = limits or RequestLimits.from_arguments()
    worker = make_worker(engine, max_queue, batching)
    context = context_length(engine.model.config)
    created = int(time.time())
    # One thread: the checks tokenize, and two requests' checks would only share the same cores.
    checker = ThreadPoolExecutor(1, thread_name_prefix="glmtune-serve-check")
    admitted = 0  # requests being read or checked; touched on the event loop only

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        yield
        worker.close()
        checker.shutdown(wait=False, cancel_futures=True)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # compare_digest: the time taken must not tell how much of a guessed key was right
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send the header 'Authorization: Bearer KEY' with "
                           "the key the server was started with", code="invalid_api_key")

    app = FastAPI(title="glmtune", lifespan=lifespan, dependencies=[Depends(check_key)])
    app.state.worker = worker
    add_error_handlers(app)

    @app.get("/v1/models")
    def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_name, created=created)])

    @app.get("/v1/models/{name:path}")
    def get_model(name: str) -> ModelCard:
        check_model(name, model_name)
        return ModelCard(id=model_name, created=created)

    def busy() -> APIError:
        return APIError(429, f"the server is busy: {max_queue} requests are already waiting; retry shortly",
                        type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})

    def check(body_bytes: bytes, content_type: str | None) -> tuple[ChatCompletionRequest, Conversation, int, Any]:
        body = parse_request(body_bytes, content_type, limits.max_messages)
        check_model(body.model, model_name)
        return body, *prepare(engine, body, context, enable_thinking, limits)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Any:
        nonlocal admitted
        if admitted >= max_queue:  # refused before its body is read: overload costs little
            raise busy()
        admitted += 1
        try:
            body_bytes = await read_body(request, limits.max_request_bytes)
            loop = asyncio.get_running_loop()
            body, conversation, prompt_tokens, settings = await loop.run_in_executor(
                checker, check, body_bytes, request.headers.get("content-type"))
        finally:
            admitted -= 1
        inbox: asyncio.Queue = asyncio.Queue()

        def deliver(event: Any) -> None:  # called from the worker thread
            with contextlib.suppress(RuntimeError):  # the loop is gone (shutdown): nobody is listening
                loop.call_soon_threadsafe(inbox.put_nowait, event)

        job = Job(conversation, settings, body.n or 1, body.stop_strings(), body.seed, deliver)
        try:
            worker.submit(job)
        except QueueFull:
            raise busy() from None
        events = job_events(job, inbox, request, worker)
        answer = Answer(model_name, prompt_tokens, job.n)
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(answer.sse(events, usage), media_type="text/event-stream")
        return await answer.whole(events)

    return app


def prepare(engine: Any, body: ChatCompletionRequest, context: int | None, enable_thinking: bool | None = None,
            limits: RequestLimits | None = None) -> tuple[Conversation, int, Any]:
    """The conversation, its prompt length and the generation settings, or a 400 that says what is wrong."""
    limits = limits or RequestLimits.from_arguments()
    if body.functions:
        raise APIError(400, "'functions' is not supported by this server: use 'tools'", param="functions")
    unserved = body.unserved()
    if unserved:
        raise APIError(400, f"'{unserved}' is not supported by this server: leave it out", param=unserved)
    if (body.n or 1) > limits.max_n:
        raise APIError(400, f"n is {body.n}; this server answers at most {limits.max_n} choices per request "
                       "(its --max_n)", param="n")
    max_tokens = body.max_completion_tokens or body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    if max_tokens is not None and max_tokens > limits.max_tokens_limit:
        raise APIError(400, f"{param} is {max_tokens}; this server answers at most {limits.max_tokens_limit} "
                       "tokens per choice (its --max_tokens_limit)", param=param)
    try:
        conversation = request_conversation(body)
        thinking = request_thinking(engine.tokenizer, body, enable_thinking)
    except BadRequest as e:
        raise APIError(400, e.message, param=e.param) from None
    try:
        prompt_tokens = len(encode_prompt(engine.tokenizer, conversation, thinking))
    except UserError as e:  # e.g. a chat template that takes no system prompt
        raise APIError(400, e.message, param="messages") from None
    except TemplateError as e:  # the template's own raise_exception (roles out of order, ...) or a tool it can't render
        raise APIError(400, f"the chat template cannot render these messages: {e}", param="messages") from None

    if limits.max_prompt_tokens is not None and prompt_tokens > limits.max_prompt_tokens:
        raise APIError(400, f"the prompt is {prompt_tokens} tokens; this server takes at most "
                       f"{limits.max_prompt_tokens} (its --max_prompt_tokens)", param="messages",
                       code="context_length_exceeded")
    if context is not None and prompt_tokens >= context:
        raise APIError(400, f"the prompt is {prompt_tokens} tokens; the model's context is {context} tokens",
                       param="messages", code="context_length_exceeded")
    if context is not None and max_tokens is not None and prompt_tokens + max_tokens > context:
        raise APIError(400, f"{param} {max_tokens} plus the {prompt_tokens}-token prompt exceed the model's "
                       f"context of {context} tokens: ask for at most {context - prompt_tokens}",
                       param=param, code="context_length_exceeded")
    if max_tokens is None:  # glmtune's default answer length (as `infer` and `chat`), within the context
        max_tokens = min(DEFAULT_MAX_NEW_TOKENS, context - prompt_tokens) if context else DEFAULT_MAX_NEW_TOKENS
    temperature = 1.0 if body.temperature is None else body.temperature
    if temperature < GREEDY_BELOW_TEMPERATURE:
        temperature = 0.0
    settings = GenerationSettings(max_new_tokens=max_tokens, temperature=temperature, top_p=body.top_p or 1.0,
                                  enable_thinking=thinking)
    return conversation, prompt_tokens, settings


async def job_events(job: Job, inbox: asyncio.Queue, request: Request, worker: Worker) -> AsyncIterator[Any]:
    """The job's events until its end. However this ends (the end, an error, the client leaving, the response's
    task cancelled), the job is cancelled, so that a client that left frees the worker."""
    try:
        while True:
            try:
                event = await asyncio.wait_for(inbox.get(), DISCONNECT_POLL_S)
            except TimeoutError:
                event = None
            # Checked here as well as by Starlette: with ASGI 2.4 servers it notices only when a send fails,
            # and a request waiting in line sends nothing.
            if await request.is_disconnected():
                return
            if event is None:
                continue
            yield event
            if isinstance(event, JobEnd | JobError):
                return
    finally:
        worker.cancel(job)


class Answer:
    """Turns a job's events into a chat.completion, or into chat.completion.chunk server-sent events."""

    def __init__(self, model_name: str, prompt_tokens: int, n: int):
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        self.model_name, self.prompt_tokens, self.n = model_name, prompt_tokens, n

    def usage(self, completion_tokens: int) -> Usage:
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=self.prompt_tokens + completion_tokens)

    async def whole(self, events: AsyncIterator[Any]) -> ChatCompletion | JSONResponse:
        texts, reasoning, calls = [""] * self.n, [""] * self.n, [[] for _ in range(self.n)]
        ends = {}
        async for event in events:
            if isinstance(event, AnswerPiece):
                texts[event.index] += event.delta.content
                reasoning[event.index] += event.delta.reasoning
                if event.delta.tool_call:
                    calls[event.index].append(ToolCallItem(**event.delta.tool_call.to_openai()))
            elif isinstance(event, ChoiceEnd):
                ends[event.index] = event
            elif isinstance(event, JobError):
                return internal_error(event.error)
        if len(ends) < self.n:  # the client left; nobody reads this
            return error_response(APIError(499, "the client closed the request", code="client_closed"))
        # OpenAI's content is null when the answer is tool calls alone.
        choices = [Choice(index=i, message=AssistantMessage(content=texts[i] or (None if calls[i] else ""),
                                                            reasoning_content=reasoning[i] or None,
                                                            tool_calls=calls[i] or None),
                          finish_reason=ends[i].finish_reason) for i in range(self.n)]
        return ChatCompletion(id=self.id, created=self.created, model=self.model_name, choices=choices,
                              usage=self.usage(sum(e.completion_tokens for e in ends.values())))

    async def sse(self, events: AsyncIterator[Any], include_usage: bool) -> AsyncIterator[str]:
        completion_tokens = 0
        started: set[int] = set()
        calls = [0] * self.n  # each choice's calls so far: a streamed call's index
        async for event in events:
            if isinstance(event, JobError):
                yield _data(internal_error(event.error).body.decode())
                break
            if isinstance(event, JobEnd):
                if include_usage:
                    yield self._chunk([], usage=self.usage(completion_tokens))
                yield _data("[DONE]")
                break
            if event.index not in started:  # OpenAI opens each choice with the role
                started.add(event.index)
                yield self._chunk([ChunkChoice(index=event.index, delta=Delta(role="assistant", content=""))])
            if isinstance(event, AnswerPiece):
                yield self._chunk([ChunkChoice(index=event.index, delta=self._delta(event, calls))])
            elif isinstance(event, ChoiceEnd):
                completion_tokens += event.completion_tokens
                yield self._chunk([ChunkChoice(index=event.index, delta=Delta(), finish_reason=event.finish_reason)])

    @staticmethod
    def _delta(piece: AnswerPiece, calls: list[int]) -> Delta:
        """A piece as OpenAI streams it: a call whole, with its id, name and arguments, in one delta."""
        delta = piece.delta
        if delta.tool_call:
            calls[piece.index] += 1
            return Delta(tool_calls=[StreamedToolCall(index=calls[piece.index] - 1, **delta.tool_call.to_openai())])
        if delta.reasoning:
            return Delta(reasoning_content=delta.reasoning)
        return Delta(content=delta.content)

    def _chunk(self, choices: list[ChunkChoice], usage: Usage | None = None) -> str:
        chunk = ChatCompletionChunk(id=self.id, created=self.created, model=self.model_name, choices=choices,
                                    usage=usage)
        return _data(chunk.model_dump_json())


def _data(payload: str) -> str:
    return f"data: {payload}\n\n"


def check_model(name: str, model_name: str) -> None:
    if name != model_name:
        shown = name if len(name) <= NAME_SHOWN_CHARS else f"{name[:NAME_SHOWN_CHARS]}..."
        raise APIError(404, f"the model '{shown}' does not exist: this server serves '{model_name}'", param="model",
                       code="model_not_found")


def context_length(config: Any) -> int | None:
    """The longest prompt + answer the model takes, under the names the architectures give it."""
    for name in ("max_position_embeddings", "seq_length", "max_sequence_length", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def internal_error(error: BaseException) -> JSONResponse:
    log.error("generation failed", exc_info=error)
    return error_response(APIError(500, f"generation failed: {type(error).__name__}: {error}", type="server_error"))


def add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:  # 404 route, 405 method, ...
        return error_response(APIError(error.status_code, str(error.detail), code=None, headers=error.headers))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        return internal_error(error)
