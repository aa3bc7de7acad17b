"""A job's events, from the worker thread to its HTTP response, at a cost per batch of ready events rather than per
token: what lets many concurrent streams share the server's one event loop.

- `Handoff`: the worker thread hands events over with one wake-up of the event loop per decoding step (every
  stream's token), not one per event.
- `job_events`: a request's events in batches (all that are ready when it wakes up); the client's presence is
  checked once per batch and at least every DISCONNECT_POLL_S, not per event.
- `StreamedAnswer.sse`: one server-sent-events loop for both endpoints (each gives its own chunk for an event);
  a batch is written as one piece, and text pieces of one choice that are ready together (the client's stream fell
  behind the decoding loop) travel in one chunk, as OpenAI's own chunks may carry several tokens.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from glmtune.inference.answers import AnswerDelta
from glmtune.serve.errors import internal_error
from glmtune.serve.scheduler import AnswerPiece, ChoiceEnd, Event, Job, JobEnd, JobError
from glmtune.serve.schemas import Usage, sse_data

if TYPE_CHECKING:
    from starlette.requests import Request

    from glmtune.serve.metrics import RequestTiming
    from glmtune.serve.scheduler import Worker

DISCONNECT_POLL_S = 0.25  # how often a request waiting on the worker checks that its client is still there


class Inbox:
    """One request's events not yet taken, filled on the event loop by `Handoff`."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.events: list[Event] = []
        self._waiter: asyncio.Future | None = None

    def put(self, event: Event) -> None:
        self.events.append(event)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def take(self, timeout: float) -> list[Event]:
        """Every event ready now, or those that arrive within `timeout` seconds (none: an empty list)."""
        if not self.events:
            # A future and a timer, not asyncio.wait_for, which starts a task on every call.
            waiter = self._waiter = self.loop.create_future()
            timer = self.loop.call_later(timeout, lambda: waiter.done() or waiter.set_result(None))
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        events, self.events = self.events, []
        return events


class Handoff:
    """Events from the worker thread to the inboxes on one event loop, with one wake-up of the loop for many events:
    those delivered while the worker holds the handoff (a decoding step's, see DeliveryGate), and those that follow
    one another before the loop gets to them."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._pending: list[tuple[Inbox, Event]] = []
        self._lock = threading.Lock()
        self._scheduled = False
        self._held = False

    def deliver_to(self, inbox: Inbox) -> Callable[[Event], None]:
        """A job's `deliver` (called from the worker thread) that fills `inbox`."""
        def deliver(event: Event) -> None:
            with self._lock:
                self._pending.append((inbox, event))
                if self._held:
                    return
            self._wake()

        return deliver

    def hold(self) -> None:
        with self._lock:
            self._held = True

    def release(self) -> None:
        with self._lock:
            self._held = False
        self._wake()

    def _wake(self) -> None:
        with self._lock:
            if self._scheduled or not self._pending:
                return
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is gone (shutdown): nobody is listening
            pass

    def _drain(self) -> None:
        with self._lock:
            pending, self._pending, self._scheduled = self._pending, [], False
        for inbox, event in pending:
            inbox.put(event)


async def job_events(job: Job, inbox: Inbox, request: Request, worker: Worker,
                     timing: RequestTiming | None = None) -> AsyncIterator[list[Event]]:
    """The job's events, in batches, until its end (each event shown to `timing`, for /metrics). However this ends
    (the end, an error, the client leaving, the response's task cancelled), the job is cancelled, so that a client
    that left frees the worker."""
    checked = time.monotonic()
    try:
        while True:
            events = await inbox.take(DISCONNECT_POLL_S)
            # Checked here as well as by Starlette: with ASGI 2.4 servers it notices only when a send fails,
            # and a request waiting in line sends nothing.
            now = time.monotonic()
            if not events or now - checked >= DISCONNECT_POLL_S:
                checked = now
                if await request.is_disconnected():
                    return
            if not events:
                continue
            ended = next((k for k, e in enumerate(events) if isinstance(e, JobEnd | JobError)), None)
            events = events if ended is None else events[: ended + 1]
            if timing is not None:
                for event in events:
                    timing.observe(event)
            yield events
            if ended is not None:
                return
    finally:
        worker.cancel(job)


async def each_event(batches: AsyncIterator[list[Event]]) -> AsyncIterator[Event]:
    """The events of `job_events`' batches one by one."""
    async for events in batches:
        for event in events:
            yield event


def merge_pieces(events: list[Event]) -> list[Event]:
    """Consecutive text (or reasoning) pieces of one choice as one piece, with their tokens' log-probabilities
    together; every other event as it is, each choice's events in their order."""
    merged: list[Event] = []
    last: dict[int, int] = {}  # choice -> where its latest event is in `merged`
    for event in events:
        if isinstance(event, AnswerPiece) and event.delta.tool_call is None and event.index in last:
            before = merged[last[event.index]]
            if isinstance(before, AnswerPiece) and before.delta.tool_call is None and \
                    bool(before.delta.reasoning) == bool(event.delta.reasoning):
                delta = AnswerDelta(reasoning=before.delta.reasoning + event.delta.reasoning,
                                    content=before.delta.content + event.delta.content)
                logprobs = None if before.logprobs is None and event.logprobs is None else \
                    [*(before.logprobs or []), *(event.logprobs or [])]
                merged[last[event.index]] = AnswerPiece(event.index, delta, logprobs)
                continue
        if isinstance(event, AnswerPiece | ChoiceEnd):
            last[event.index] = len(merged)
        merged.append(event)
    return merged


class StreamedAnswer:
    """What both endpoints' answers share: the id, the usage, and the server-sent-events loop; a subclass gives
    the chunk of each event (`event_chunks`) and of the usage (`usage_chunk`)."""

    id_prefix = "cmpl-"

    def __init__(self, model_name: str, prompt_tokens: int, choices: int, tokenizer: Any = None,
                 logprobs: bool = False):
        self.id, self.created = f"{self.id_prefix}{uuid.uuid4().hex}", int(time.time())
        self.model_name, self.prompt_tokens, self.choices = model_name, prompt_tokens, choices
        self.tokenizer, self.logprobs = tokenizer, logprobs  # logprobs: the request asked for them

    def usage(self, completion_tokens: int) -> Usage:
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=self.prompt_tokens + completion_tokens)

    async def sse(self, batches: AsyncIterator[list[Event]], include_usage: bool) -> AsyncIterator[str]:
        completion_tokens = 0
        async for events in batches:
            out: list[str] = []
            for event in merge_pieces(events):
                if isinstance(event, JobError):
                    out.append(sse_data(internal_error(event.error).body.decode()))
                    yield "".join(out)
                    return
                if isinstance(event, JobEnd):
                    if include_usage:
                        out.append(self.usage_chunk(self.usage(completion_tokens)))
                    out.append(sse_data("[DONE]"))
                    yield "".join(out)
                    return
                if isinstance(event, ChoiceEnd):
                    completion_tokens += event.completion_tokens
                out += self.event_chunks(event)
            if out:
                yield "".join(out)

    def event_chunks(self, event: AnswerPiece | ChoiceEnd) -> list[str]:
        raise NotImplementedError

    def usage_chunk(self, usage: Usage) -> str:
        raise NotImplementedError
