"""The OpenAI-compatible HTTP API: `GET /v1/models`, `POST /v1/chat/completions` and `POST /v1/completions`
(streamed or not, with logprobs when asked), and, outside /v1 and the API key, `GET /health` and `GET /metrics`
(Prometheus text).

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
import secrets
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from jinja2 import TemplateError
from starlette.exceptions import HTTPException

from glmtune.data.conversation import Conversation
from glmtune.data.templates import encode_prompt
from glmtune.errors import UserError
from glmtune.serve.adapters import ServedModels
from glmtune.serve.batching import BatchLimits, make_worker
from glmtune.serve.budget import answer_settings, check_asked
from glmtune.serve.completions import CompletionAnswer, prepare_completion
from glmtune.serve.errors import APIError, client_closed, error_response, internal_error
from glmtune.serve.intake import RequestLimits, parse_request, read_body
from glmtune.serve.logprob_fields import chat_logprobs
from glmtune.serve.messages import BadRequest, request_conversation, request_thinking
from glmtune.serve.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from glmtune.serve.metrics import Metrics, MetricsMiddleware, RequestTiming
from glmtune.serve.scheduler import AnswerPiece, ChoiceEnd, Event, Job, JobError, QueueFull
from glmtune.serve.schemas import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    CompletionRequest,
    Delta,
    ModelCard,
    ModelList,
    StreamedToolCall,
    ToolCallItem,
    Usage,
    sse_data,
)
from glmtune.serve.streamed import Handoff, Inbox, StreamedAnswer, each_event, job_events


def create_app(engine: Any, model_name: str, api_key: str | None = None, max_queue: int = 64,
               enable_thinking: bool | None = None, limits: RequestLimits | None = None,
               models: ServedModels | None = None, batching: BatchLimits | None = None) -> FastAPI:
    """The FastAPI app of the OpenAI-compatible API over `engine`; its worker thread runs for the app's lifespan.

    Args:
        engine: a glmtune Engine, or a stand-in with its `tokenizer`, `model.config` and `stream` (the tests inject
            a slow one).
        model_name: the model id /v1/models lists and answers carry (when `models` is None).
        api_key: the bearer key every request must send; None for none.
        max_queue: requests that may wait while one is answered; one more answers 429.
        enable_thinking: the chat template's thinking switch (--enable_thinking), unless a request's
            chat_template_kwargs sets it.
        limits: what one request may ask (size, messages, prompt, max_tokens, n); None: serve's defaults.
        models: the served names and the adapter each answers with (--adapter); None: `model_name` alone, answered
            by the model as loaded.
        batching: how large the running batch may grow; None: serve's defaults.
    """
    limits = limits or RequestLimits.from_arguments()
    models = models or ServedModels({model_name: None})
    worker = make_worker(engine, max_queue, batching)
    context = context_length(engine.model.config)
    created = int(time.time())
    # One thread: the checks tokenize, and two requests' checks would only share the same cores.
    checker = ThreadPoolExecutor(1, thread_name_prefix="glmtune-serve-check")
    admitted = 0  # requests being read or checked; touched on the event loop only
    handoff: Any = None  # the worker's Handoff, made on the event loop when the app starts

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal handoff
        handoff = worker.gate = Handoff(asyncio.get_running_loop())
        worker.start()
        yield
        worker.close()
        checker.shutdown(wait=False, cancel_futures=True)

    # async: FastAPI would run a plain function on its thread pool, a thread hop per request for a header check.
    async def check_key(request: Request) -> None:
        if api_key is None or not request.url.path.startswith("/v1/"):  # /health and /metrics are open, as vLLM's
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # compare_digest: the time taken must not tell how much of a guessed key was right
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send the header 'Authorization: Bearer KEY' with "
                           "the key the server was started with", code="invalid_api_key")

    app = FastAPI(title="glmtune", lifespan=lifespan, dependencies=[Depends(check_key)])
    app.state.worker = worker
    metrics = app.state.metrics = Metrics(lambda: worker.waiting, lambda: worker.batch_size)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    add_error_handlers(app)

    @app.get("/v1/models")
    def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=name, created=created) for name in models.names])

    @app.get("/v1/models/{name:path}")
    def get_model(name: str) -> ModelCard:
        models.adapter_for(name)
        return ModelCard(id=name, created=created)

    def busy() -> APIError:
        return APIError(429, f"the server is busy: {max_queue} requests are already waiting; retry shortly",
                        type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})

    def check(body_bytes: bytes, content_type: str | None) -> tuple[ChatCompletionRequest, Conversation, int, Any]:
        body = parse_request(body_bytes, content_type, limits.max_messages)
        adapter = models.adapter_for(body.model)
        conversation, prompt_tokens, settings = prepare(engine, body, context, enable_thinking, limits)
        settings.adapter = adapter
        return body, conversation, prompt_tokens, settings

    def check_completion(body_bytes: bytes, content_type: str | None) -> tuple[CompletionRequest, list, Any]:
        body = parse_request(body_bytes, content_type, limits.max_messages, CompletionRequest)
        adapter = models.adapter_for(body.model)
        prompts, settings = prepare_completion(engine, body, context, limits)
        settings.adapter = adapter
        return body, prompts, settings

    async def admit(request: Request, checked: Callable[[bytes, str | None], Any]) -> Any:
        """The request read and checked (`checked` on the checker's thread), within --max_queue at a time."""
        nonlocal admitted
        if admitted >= max_queue:  # refused before its body is read: overload costs little
            raise busy()
        admitted += 1
        try:
            body_bytes = await read_body(request, limits.max_request_bytes)
            return await asyncio.get_running_loop().run_in_executor(
                checker, checked, body_bytes, request.headers.get("content-type"))
        finally:
            admitted -= 1

    def launch(request: Request, job_for: Callable[[Callable[[Any], None]], Job], prompt_tokens: int,
               timing: RequestTiming) -> AsyncIterator[list[Event]]:
        """The job (made by `job_for` around its deliver callback) in the worker's line; its events, in batches."""
        inbox = Inbox(handoff.loop)
        job = job_for(handoff.deliver_to(inbox))
        try:
            worker.submit(job)
        except QueueFull:
            raise busy() from None
        metrics.count_prompt(prompt_tokens)
        return job_events(job, inbox, request, worker, timing)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Any:
        timing = metrics.timing()
        body, conversation, prompt_tokens, settings = await admit(request, check)
        events = launch(request, lambda deliver: Job(conversation, settings, body.n or 1, body.stop_strings(),
                                                     body.seed, deliver, logprobs=body.top_logprobs_asked()),
                        prompt_tokens, timing)
        answer = Answer(body.model, prompt_tokens, body.n or 1, engine.tokenizer, bool(body.logprobs))
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(answer.sse(events, usage), media_type="text/event-stream")
        return await answer.whole(events)

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Any:
        timing = metrics.timing()
        body, prompts, settings = await admit(request, check_completion)
        n = body.n or 1
        prompt_tokens = sum(len(p) for p in prompts)
        events = launch(request, lambda deliver: Job(Conversation(), settings, n, body.stop_strings(), body.seed,
                                                     deliver, prompts=prompts, logprobs=body.logprobs),
                        prompt_tokens, timing)
        answer = CompletionAnswer(body.model, prompt_tokens, n * len(prompts), engine.tokenizer,
                                  body.logprobs is not None)
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(answer.sse(events, usage), media_type="text/event-stream")
        return await answer.whole(events)

    @app.get("/health", response_model=None)
    def health() -> Any:
        """200 once the model is loaded and the worker runs (the app exists only once the model is loaded)."""
        if not worker.alive:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    return app


def prepare(engine: Any, body: ChatCompletionRequest, context: int | None, enable_thinking: bool | None = None,
            limits: RequestLimits | None = None) -> tuple[Conversation, int, Any]:
    """The conversation, its prompt length and the generation settings, or a 400 that says what is wrong."""
    limits = limits or RequestLimits.from_arguments()
    if body.functions:
        raise APIError(400, "'functions' is not supported by this server: use 'tools'", param="functions")
    check_asked(body, limits, body.n or 1)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
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
    # No max_tokens: glmtune's default answer length (as `infer` and `chat`), within the context.
    settings = answer_settings(body, prompt_tokens, context, limits, "messages", thinking)
    return conversation, prompt_tokens, settings


class Answer(StreamedAnswer):
    """Turns a job's events into a chat.completion, or into chat.completion.chunk server-sent events."""

    id_prefix = "chatcmpl-"

    def __init__(self, model_name: str, prompt_tokens: int, n: int, tokenizer: Any = None, logprobs: bool = False):
        super().__init__(model_name, prompt_tokens, n, tokenizer, logprobs)
        self.started: set[int] = set()  # choices streamed so far (OpenAI opens each with the role)
        self.calls = [0] * n  # each choice's calls so far: a streamed call's index

    async def whole(self, batches: AsyncIterator[list[Event]]) -> ChatCompletion | JSONResponse:
        n = self.choices
        texts, reasoning, calls = [""] * n, [""] * n, [[] for _ in range(n)]
        entries: list[list[Any]] = [[] for _ in range(n)]
        ends = {}
        async for event in each_event(batches):
            if isinstance(event, AnswerPiece | ChoiceEnd):
                entries[event.index] += event.logprobs or []
            if isinstance(event, AnswerPiece):
                texts[event.index] += event.delta.content
                reasoning[event.index] += event.delta.reasoning
                if event.delta.tool_call:
                    calls[event.index].append(ToolCallItem(**event.delta.tool_call.to_openai()))
            elif isinstance(event, ChoiceEnd):
                ends[event.index] = event
            elif isinstance(event, JobError):
                return internal_error(event.error)
        if len(ends) < n:  # the client left; nobody reads this
            return client_closed()
        # OpenAI's content is null when the answer is tool calls alone.
        choices = [Choice(index=i, message=AssistantMessage(content=texts[i] or (None if calls[i] else ""),
                                                            reasoning_content=reasoning[i] or None,
                                                            tool_calls=calls[i] or None),
                          finish_reason=ends[i].finish_reason, logprobs=self._logprobs(entries[i]))
                   for i in range(n)]
        return ChatCompletion(id=self.id, created=self.created, model=self.model_name, choices=choices,
                              usage=self.usage(sum(e.completion_tokens for e in ends.values())))

    def event_chunks(self, event: AnswerPiece | ChoiceEnd) -> list[str]:
        chunks = []
        if event.index not in self.started:  # OpenAI opens each choice with the role
            self.started.add(event.index)
            chunks.append(self._chunk([ChunkChoice(index=event.index, delta=Delta(role="assistant", content=""))]))
        if isinstance(event, AnswerPiece):
            chunks.append(self._chunk([ChunkChoice(index=event.index, delta=self._delta(event),
                                                   logprobs=self._logprobs(event.logprobs))]))
        else:
            chunks.append(self._chunk([ChunkChoice(index=event.index, delta=Delta(), finish_reason=event.finish_reason,
                                                   logprobs=self._logprobs(event.logprobs) if event.logprobs
                                                   else None)]))
        return chunks

    def usage_chunk(self, usage: Usage) -> str:
        return self._chunk([], usage)

    def _logprobs(self, entries: list[Any] | None) -> ChoiceLogprobs | None:
        return chat_logprobs(self.tokenizer, entries or []) if self.logprobs else None

    def _delta(self, piece: AnswerPiece) -> Delta:
        """A piece as OpenAI streams it: a call whole, with its id, name and arguments, in one delta."""
        delta = piece.delta
        if delta.tool_call:
            self.calls[piece.index] += 1
            return Delta(tool_calls=[StreamedToolCall(index=self.calls[piece.index] - 1,
                                                      **delta.tool_call.to_openai())])
        if delta.reasoning:
            return Delta(reasoning_content=delta.reasoning)
        return Delta(content=delta.content)

    def _chunk(self, choices: list[ChunkChoice], usage: Usage | None = None) -> str:
        chunk = ChatCompletionChunk(id=self.id, created=self.created, model=self.model_name, choices=choices,
                                    usage=usage)
        return sse_data(chunk.model_dump_json())


def context_length(config: Any) -> int | None:
    """The longest prompt + answer the model takes, under the names the architectures give it."""
    for name in ("max_position_embeddings", "seq_length", "max_sequence_length", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


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
