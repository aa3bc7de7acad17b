"""One worker thread that answers requests one at a time, from a bounded waiting line.

The model cannot run two `generate` calls at once (on CPU they would also only share the same cores), so every
request is a Job handed to a single worker thread. At most `max_queue` jobs wait while one runs; one more is
refused (QueueFull), which the server answers with 429. A job's events (text deltas, each choice's end, the end
of the job, an error) are handed to its request through `deliver`, a thread-safe callback. A cancelled job (its
client left) is taken out of the line, or, while it runs, stopped within one streamed piece.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from glmtune.data.conversation import Conversation
from glmtune.inference.answers import AnswerDelta, AnswerParts

if TYPE_CHECKING:
    from glmtune.inference.engine import GenerationSettings
    from glmtune.inference.logprobs import TokenLogprob


@dataclass
class AnswerPiece:
    index: int  # which choice
    delta: AnswerDelta  # reasoning, text or a tool call
    logprobs: list[TokenLogprob] | None = None  # the tokens generated since the last piece, when asked for


@dataclass
class ChoiceEnd:
    index: int
    finish_reason: str  # "stop" (a stop token or stop string), "length" or "tool_calls"
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None  # tokens not yet handed on with a piece (those past a stop string)


@dataclass
class JobEnd:
    pass


@dataclass
class JobError:
    error: BaseException


Event = AnswerPiece | ChoiceEnd | JobEnd | JobError


class QueueFull(Exception):
    pass


class DeliveryGate(Protocol):
    """Where a batching worker's deliveries go (the server's Handoff): held while a step's events are handed out,
    then released at once, so that the listeners wake once per step rather than once per event."""

    def hold(self) -> None: ...

    def release(self) -> None: ...


@dataclass(eq=False)  # identity, not field equality: two identical requests are two jobs
class Job:
    conversation: Conversation
    settings: GenerationSettings
    n: int
    stop: list[str]
    seed: int | None
    deliver: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    # A text completion's prompts, as token ids (no chat template; `conversation` is then unused): choice i answers
    # prompts[i // n]. None: a chat completion, whose n choices answer `conversation`.
    prompts: list[list[int]] | None = None
    logprobs: int | None = None  # report each token's log-probability and this many most likely tokens'

    @property
    def choices(self) -> int:
        return self.n * (len(self.prompts) if self.prompts is not None else 1)


class Worker:
    """Runs jobs one after another with `engine.stream` (an Engine, or a stand-in with the same method, whose
    stream has `pieces()`, `parser` and `completion`)."""

    def __init__(self, engine: Any, max_queue: int):
        self.engine, self.max_queue = engine, max_queue
        self._waiting: deque[Job] = deque()
        self._changed = threading.Condition()
        self._closed = False
        self._running: Job | None = None
        self._thread = threading.Thread(target=self._run, name="glmtune-serve-worker", daemon=True)
        self.gate: DeliveryGate | None = None  # set by the server before start(); None: each event goes at once

    def start(self) -> None:
        self._thread.start()

    @property
    def waiting(self) -> int:
        """Jobs in line, not counting the one running."""
        with self._changed:
            return len(self._waiting)

    @property
    def alive(self) -> bool:
        """The worker thread runs (GET /health)."""
        return self._thread.is_alive() and not self._closed

    @property
    def batch_size(self) -> int:
        """Requests being generated now (the /metrics gauge)."""
        return 0 if self._running is None else 1

    def submit(self, job: Job) -> None:
        with self._changed:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull
            self._waiting.append(job)
            self._changed.notify()

    def cancel(self, job: Job) -> None:
        """Stop a job wherever it is; a finished one is left as it is."""
        job.cancelled.set()
        with self._changed:
            if job in self._waiting:
                self._waiting.remove(job)

    def close(self) -> None:
        """Stop: the waiting jobs are dropped and the running one stopped (the server is shutting down)."""
        with self._changed:
            self._closed = True
            for job in [*self._waiting, *filter(None, [self._running])]:
                job.cancelled.set()
            self._waiting.clear()
            self._changed.notify()

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._waiting or self._closed)
                if self._closed:
                    return
                job = self._running = self._waiting.popleft()
            try:
                self._answer(job)
            except BaseException as e:  # handed to the request (a 500), so that the worker lives on
                job.deliver(JobError(e))
            finally:
                with self._changed:
                    self._running = None

    def _answer(self, job: Job) -> None:
        if job.seed is not None:
            from transformers import set_seed

            # Before the first choice: the n choices are n draws, reproducible together. OpenAI's seed is any 64-bit
            # integer; numpy's (which set_seed seeds too) is 0 .. 2**32 - 1.
            set_seed(job.seed % 2**32)
        for index in range(job.choices):
            if not self._answer_choice(job, index):
                return
        job.deliver(JobEnd())


    def _answer_choice(self, job: Job, index: int) -> bool:
        """Generate one choice and hand on its events; False when the job was cancelled on the way."""
        stream = self._stream(job, index)
        # Stop strings cut the raw text, then the answer is split (a stop string inside the reasoning ends it).
        cutter = StopCutter(job.stop)
        splitter = stream.parser.splitter() if job.prompts is None else PlainSplitter()
        recorded = getattr(stream, "logprobs", None)
        handout = Handout(job, index, None if recorded is None else recorded.entries)
        pieces = stream.pieces()
        try:
            for piece in pieces:
                if job.cancelled.is_set():
                    return False  # the `finally` closes the stream, which stops generation within one token
                handout.deliver(splitter.feed(cutter.feed(piece)))
        finally:
            pieces.close()
        handout.deliver(splitter.feed(cutter.flush()) + splitter.finish())
        completion = stream.completion
        reason = "tool_calls" if splitter.parts.tool_calls else "stop" if cutter.stopped else \
            completion.finish_reason
        job.deliver(ChoiceEnd(index, reason, completion.completion_tokens, handout.rest()))
        return True

    def _stream(self, job: Job, index: int) -> Any:
        extra = {} if job.logprobs is None else {"logprobs": job.logprobs}  # stand-in engines take no logprobs
        if job.prompts is not None:
            return self.engine.stream_prompt(job.prompts[index // job.n], job.settings, job.stop or None, **extra)
        return self.engine.stream(job.conversation, job.settings, job.stop or None, **extra)


class Handout:
    """Hands a choice's deltas to its job, each with the log-probabilities of the tokens generated since the
    previous one (when the job asked for them). `recorded`: the choice's entries, a list that grows as its tokens
    are generated (LogprobRecorder.entries, or a batch row's); None: not asked for."""

    def __init__(self, job: Job, index: int, recorded: list[TokenLogprob] | None):
        self.job, self.index, self.recorded = job, index, recorded
        self.taken = 0

    def deliver(self, deltas: list[AnswerDelta]) -> None:
        for delta in deltas:
            self.job.deliver(AnswerPiece(self.index, delta, self.rest()))

    def rest(self) -> list[TokenLogprob] | None:
        """The entries not handed on yet (and now taken)."""
        if self.recorded is None:
            return None
        entries = self.recorded[self.taken:]
        self.taken += len(entries)
        return entries


class PlainSplitter:
    """A text completion's answer as it is: every piece is text (no reasoning or tool calls split off, nothing
    stripped); the interface of AnswerSplitter."""

    def __init__(self) -> None:
        self.parts = AnswerParts()

    def feed(self, text: str) -> list[AnswerDelta]:
        self.parts.content += text
        return [AnswerDelta(content=text)] if text else []

    def finish(self) -> list[AnswerDelta]:
        return []


class StopCutter:
    """Streamed text in, the same text out up to (not including) the first stop string. The last characters that
    could begin a stop string are held back until the next piece shows whether they do."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.stopped = False
        self._pending = ""

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""  # generation ends at the token completing the stop string; whatever follows is dropped
        text = self._pending + piece
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.stopped, self._pending = True, ""
            return text[: min(found)]
        keep = max(len(text) - self.hold, 0)
        self._pending = text[keep:]
        return text[:keep]

    def flush(self) -> str:
        text, self._pending = self._pending, ""
        return text
