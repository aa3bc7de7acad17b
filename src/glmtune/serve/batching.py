"""The server's worker with continuous batching: every choice of every admitted request is a row of one running
batch (inference/batch_generation.py), and each decoding step advances them all by one token.

Between steps the worker admits choices from the head of the waiting line while the batch has room
(`max_batch_size` rows, and at most `max_batch_tokens` cache positions counted as rows x the longest prompt +
max_tokens, the most the left-padded cache can come to hold), prefills the ones admitted in one round together (one
forward pass), and drops the rows of finished and cancelled jobs (a client that left). Past that room, requests wait
in the bounded line as before (429 when it is full); the line is first come, first served, so a large request at its
head is not overtaken. A request larger than the whole budget runs alone rather than never. Each choice keeps its
own sampling, seed, budget, stop strings, parser (a text completion's raw prompt is read as plain text), adapter and
log-probabilities, and its events are the serial Worker's: the app cannot tell them apart.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from glmtune.inference.answers import AnswerSplitter
from glmtune.inference.batch_generation import BatchGenerator, Joining, Sampling, Sequence
from glmtune.inference.decoding import AnswerDecoder
from glmtune.serve.scheduler import ChoiceEnd, Handout, Job, JobEnd, JobError, PlainSplitter, StopCutter, Worker


@dataclass(frozen=True)
class BatchLimits:
    """How large the running batch may grow: the `serve` options of the same names."""

    max_batch_size: int = 16
    max_batch_tokens: int = 16384

    @classmethod
    def from_arguments(cls, args: Any) -> BatchLimits:
        return cls(args.max_batch_size, args.max_batch_tokens)


@dataclass(eq=False)
class _Choice:
    """One row of the batch: a job's choice, and what its text has given so far."""

    job: Job
    index: int
    sequence: Sequence
    cutter: StopCutter
    splitter: AnswerSplitter | PlainSplitter
    handout: Handout
    shown: str = ""  # decoded text already handed to the cutter


_Prompt = tuple[list[int], int, Any]  # prompt ids, budget of new tokens, AnswerParser (None: a raw prompt's plain text)


@dataclass
class _Started:
    choices: int = 0  # choices admitted so far
    open: set[int] = field(default_factory=set)  # admitted choices not yet ended


class BatchWorker(Worker):
    """The Worker's line, cancel and close, over a continuous batch from `engine.batch_generator()`."""

    def __init__(self, engine: Any, max_queue: int, generator: BatchGenerator, limits: BatchLimits | None = None):
        super().__init__(engine, max_queue)
        self.generator, self.limits = generator, limits or BatchLimits()
        self.decoder = AnswerDecoder(engine.tokenizer)
        self._rows: list[_Choice] = []
        self._jobs: dict[Job, _Started] = {}
        self._prepared: dict[Job, list[_Prompt]] = {}
        self.peak_batch_size = 0  # the most rows the batch has held (tests and benchmarks read it)

    @property
    def batch_size(self) -> int:
        """Rows in the running batch."""
        return len(self._rows)

    def close(self) -> None:
        with self._changed:
            for row in self._rows:
                row.job.cancelled.set()
        super().close()

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._waiting or self._rows or self._closed)
                if self._closed:
                    return
                admitted = self._admit()
            with self._delivering():
                self._start(admitted)
            self._drop_cancelled()
            try:
                self.generator.step()
            except BaseException as e:  # every running job gets it (a 500); the worker lives on with an empty batch
                for job in {row.job for row in self._rows}:
                    self._fail(job, e)
                continue
            with self._delivering():
                for row in list(self._rows):
                    self._advance(row)

    @contextlib.contextmanager
    def _delivering(self) -> Iterator[None]:
        """A step's events for every row, handed over together (see DeliveryGate)."""
        if self.gate is None:
            yield
            return
        self.gate.hold()
        try:
            yield
        finally:
            self.gate.release()

    def _admit(self) -> list[tuple[Job, int]]:
        """Choices from the head of the line that fit in the batch now (called with the lock held)."""
        admitted: list[tuple[Job, int]] = []
        rows = len(self._rows)
        longest = max((row.sequence.footprint for row in self._rows), default=0)
        while self._waiting:
            job = self._waiting[0]
            if job not in self._prepared:
                try:
                    self._prepared[job] = self._prepare(job)
                except BaseException as e:
                    self._waiting.popleft()
                    job.deliver(JobError(e))
                    continue
            started = self._jobs.setdefault(job, _Started())
            prompt, budget, _ = self._prepared[job][started.choices // job.n]
            longest = max(longest, len(prompt) + budget)
            if rows and (rows + 1 > self.limits.max_batch_size or (rows + 1) * longest > self.limits.max_batch_tokens):
                break
            admitted.append((job, started.choices))
            started.choices += 1
            rows += 1
            if started.choices == job.choices:
                self._waiting.popleft()
        return admitted

    def _prepare(self, job: Job) -> list[_Prompt]:
        """Each of the job's prompts, its budget and its parser (None: plain text): the serial Worker's checks."""
        if job.prompts is None:
            return [self.engine.prepare(job.conversation, job.settings)]
        return [(prompt, self.engine.prompt_budget(prompt, job.settings), None) for prompt in job.prompts]

    def _start(self, admitted: list[tuple[Job, int]]) -> None:
        """Prefill the admitted choices together and hand over their first tokens."""
        starting = []
        for job, index in admitted:
            if job.cancelled.is_set() or job not in self._jobs:  # its client left, or an earlier choice failed it
                self._forget(job)
                continue
            prompt, budget, parser = self._prepared[job][index // job.n]
            # Choice i draws from seed + i: each choice repeats with its seed, whatever shares the batch.
            seed = None if job.seed is None else job.seed + index
            sampling = Sampling(job.settings.temperature, job.settings.top_p, seed)
            starting.append((job, index, parser, Joining(prompt, budget, sampling, job.settings.adapter, job.logprobs)))
        try:
            sequences = self.generator.add_many([joining for *_, joining in starting])
        except BaseException as e:  # each of their jobs gets it (a 500); the running rows are untouched
            for job in {job for job, *_ in starting}:
                self._fail(job, e)
            return
        rows = []
        for (job, index, parser, _), sequence in zip(starting, sequences, strict=True):
            self._jobs[job].open.add(index)  # all of them before any can end its job
            splitter = PlainSplitter() if parser is None else parser.splitter()
            handout = Handout(job, index, None if job.logprobs is None else sequence.entries)
            rows.append(_Choice(job, index, sequence, StopCutter(job.stop), splitter, handout))
        self._rows.extend(rows)
        self.peak_batch_size = max(self.peak_batch_size, len(self._rows))
        for row in rows:
            self._advance(row)

    def _advance(self, row: _Choice) -> None:
        """Hand over the text the row's new token completed; end the choice if its sequence or a stop string did."""
        job, sequence = row.job, row.sequence
        text = self.decoder.decode(sequence.new_ids)
        if sequence.finished is None and text.endswith("\ufffd"):
            return  # an incomplete multi-byte character: wait for the token that completes it
        piece, row.shown = text[len(row.shown):], text
        row.handout.deliver(row.splitter.feed(row.cutter.feed(piece)))
        if sequence.finished is None and not row.cutter.stopped:
            return
        self.generator.remove(sequence)  # a stop string ends it before its budget does
        self._rows.remove(row)
        row.handout.deliver(row.splitter.feed(row.cutter.flush()) + row.splitter.finish())
        reason = "tool_calls" if row.splitter.parts.tool_calls else "stop" if row.cutter.stopped else \
            sequence.finished or "length"
        job.deliver(ChoiceEnd(row.index, reason, len(sequence.new_ids), row.handout.rest()))
        started = self._jobs[job]
        started.open.discard(row.index)
        if started.choices == job.choices and not started.open:
            self._forget(job)
            job.deliver(JobEnd())

    def _drop_cancelled(self) -> None:
        """A client that left: its rows leave the batch before the next step (and a job that left the line after
        it was prepared is forgotten)."""
        for row in [r for r in self._rows if r.job.cancelled.is_set()]:
            self.generator.remove(row.sequence)
            self._rows.remove(row)
        for job in [j for j in self._prepared if j.cancelled.is_set()]:
            self._forget(job)

    def _fail(self, job: Job, error: BaseException) -> None:
        for row in [r for r in self._rows if r.job is job]:
            self.generator.remove(row.sequence)
            self._rows.remove(row)
        with self._changed:
            if job in self._waiting:
                self._waiting.remove(job)
        self._forget(job)
        job.deliver(JobError(error))

    def _forget(self, job: Job) -> None:
        self._jobs.pop(job, None)
        self._prepared.pop(job, None)


def make_worker(engine: Any, max_queue: int, limits: BatchLimits | None = None) -> Worker:
    """A BatchWorker when the engine can batch its model, else the serial Worker (a stand-in engine with only
    `stream`, or a model whose cache rows can't be joined: see batch_generation.supports_batched_steps)."""
    generator = engine.batch_generator() if hasattr(engine, "batch_generator") else None
    if generator is None:
        return Worker(engine, max_queue)
    return BatchWorker(engine, max_queue, generator, limits)
