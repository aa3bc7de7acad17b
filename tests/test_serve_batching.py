"""Continuous batching in serve: requests that join a running batch at different steps, and leave it at different
steps (budgets, stop tokens, stop strings, a client leaving), get the answers they would get alone.

The greedy reference is the serial Worker, which generates with transformers' `generate` one request at a time: an
independent implementation. Seeded sampling is compared with the same request alone in the batching worker
(what is guaranteed: a seeded answer does not depend on what shares its batch)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import pytest

from glmtune.data.conversation import Conversation, Message
from glmtune.inference.engine import Engine, GenerationSettings
from glmtune.serve.app import create_app
from glmtune.serve.background import running
from glmtune.serve.batching import BatchLimits, BatchWorker, make_worker
from glmtune.serve.scheduler import AnswerPiece, ChoiceEnd, Job, JobEnd, JobError, Worker

openai = pytest.importorskip("openai")

MODEL = "tiny"


@pytest.fixture(scope="module")
def engine(tiny_model) -> Engine:
    return Engine(str(tiny_model))


@pytest.fixture(scope="module")
def questions(demo_rows) -> list[str]:
    return [row["instruction"] for row in demo_rows[:6]]


@dataclass
class Outcome:
    """What one job delivered: each choice's text and end, in the order they came."""

    texts: dict[int, str] = field(default_factory=dict)
    ends: dict[int, ChoiceEnd] = field(default_factory=dict)
    logprobs: dict[int, list] = field(default_factory=dict)  # each choice's TokenLogprob entries, pieces' and end's
    pieces: int = 0
    done: threading.Event = field(default_factory=threading.Event)

    def deliver(self, event) -> None:
        if isinstance(event, AnswerPiece | ChoiceEnd) and event.logprobs is not None:
            self.logprobs.setdefault(event.index, []).extend(event.logprobs)
        if isinstance(event, AnswerPiece):
            self.texts[event.index] = self.texts.get(event.index, "") + event.delta.content
            self.pieces += 1
        elif isinstance(event, ChoiceEnd):
            self.ends[event.index] = event
        elif isinstance(event, JobError):
            raise AssertionError(f"the job failed: {event.error!r}")
        if isinstance(event, JobEnd):
            self.done.set()

    def answer(self, index: int = 0) -> tuple[str, str, int]:
        end = self.ends[index]
        return self.texts.get(index, ""), end.finish_reason, end.completion_tokens


def job(question: str, outcome: Outcome, max_tokens: int, stop: list[str] | None = None, temperature: float = 0.0,
        seed: int | None = None, n: int = 1, prompts: list[list[int]] | None = None,
        logprobs: int | None = None) -> Job:
    """A chat job over `question`, or with `prompts` a text completion's (raw token ids; `question` unused)."""
    settings = GenerationSettings(max_new_tokens=max_tokens, temperature=temperature)
    return Job(Conversation(messages=[Message("user", question)]), settings, n, stop or [], seed, outcome.deliver,
               prompts=prompts, logprobs=logprobs)


def wait_until(condition, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def staggered(worker: Worker, specs: list[dict], after_pieces: int = 2) -> list[Outcome]:
    """Submit each job once the one before it has delivered `after_pieces` pieces (it is mid-answer then), so that
    each joins a running batch at a later step than the one before."""
    outcomes = []
    for spec in specs:
        if outcomes:
            last = outcomes[-1]
            wait_until(lambda last=last: last.pieces >= after_pieces or last.done.is_set())
        outcomes.append(Outcome())
        worker.submit(job(outcome=outcomes[-1], **spec))
    for outcome in outcomes:
        assert outcome.done.wait(120)
    return outcomes


def one_at_a_time(worker: Worker, specs: list[dict]) -> list[Outcome]:
    outcomes = []
    for spec in specs:
        outcomes.append(Outcome())
        worker.submit(job(outcome=outcomes[-1], **spec))
        assert outcomes[-1].done.wait(120)
    return outcomes


@pytest.fixture(scope="module")
def serial(engine):
    worker = Worker(engine, max_queue=16)
    worker.start()
    yield worker
    worker.close()


@pytest.fixture
def batching(engine):
    worker = make_worker(engine, 16, BatchLimits(max_batch_size=8, max_batch_tokens=8 * 512))
    assert isinstance(worker, BatchWorker)
    worker.start()
    yield worker
    worker.close()


def test_greedy_answers_joining_and_leaving_a_running_batch_equal_one_at_a_time_answers(serial, batching, questions):
    budgets = [40, 7, 25, 3, 33, 12]
    plain = one_at_a_time(serial, [{"question": q, "max_tokens": b} for q, b in zip(questions, budgets, strict=True)])
    # A stop string from the middle of two answers: those end early, at different steps.
    specs = [{"question": q, "max_tokens": b} for q, b in zip(questions, budgets, strict=True)]
    for k in (0, 2):
        text = plain[k].texts[0]
        specs[k]["stop"] = [text[len(text) // 2: len(text) // 2 + 3], "never-said"]
    expected = one_at_a_time(serial, specs)
    assert any(e.answer()[1] == "stop" for e in expected[:3:2]), "no stop string ended an answer: a weak test"
    batched = staggered(batching, specs)
    assert [b.answer()[:2] for b in batched] == [e.answer()[:2] for e in expected]
    for b, e in zip(batched, expected, strict=True):
        # A stop string ends the batch's sequence at the token whose text completes it; `generate`'s
        # StopStringCriteria matches token strings, which misses a stop string inside a byte-level token's
        # partial character, and generates on to the budget (the text is cut all the same).
        assert b.answer()[2] == e.answer()[2] if e.answer()[1] != "stop" else b.answer()[2] <= e.answer()[2]
    assert batching.peak_batch_size >= 3  # they did share the batch


def test_requests_arriving_together_are_prefilled_as_one_padded_batch_and_answer_as_alone(serial, engine,
                                                                                          questions):
    """Prompts of different lengths admitted in one round share one left-padded prefill; padding, positions and
    mask leave each answer (greedy text, length, log-probabilities) as the serial Worker's, also for the rows that
    join the batch already running."""
    specs = [{"question": q * (1 + i % 3), "max_tokens": 6 + 5 * i, "logprobs": 2 if i % 2 else None}
             for i, q in enumerate(questions)]
    expected = one_at_a_time(serial, specs)
    worker = make_worker(engine, 16, BatchLimits(max_batch_size=4, max_batch_tokens=4 * 512))
    sizes: list[int] = []
    add_many = worker.generator.add_many
    worker.generator.add_many = lambda joining: sizes.append(len(joining)) or add_many(joining)
    outcomes = [Outcome() for _ in specs]
    for spec, outcome in zip(specs, outcomes, strict=True):
        worker.submit(job(outcome=outcome, **spec))  # all in line before the worker starts
    worker.start()
    try:
        for outcome in outcomes:
            assert outcome.done.wait(120)
    finally:
        worker.close()
    assert sizes[0] == 4  # the first round prefilled a full batch at once
    assert len({len(engine.prepare(Conversation(messages=[Message("user", s["question"])]), GenerationSettings())[0])
                for s in specs[:4]}) > 1  # of different lengths: padded
    for o, e in zip(outcomes, expected, strict=True):
        assert o.answer() == e.answer()
        assert [t.token_id for t in o.logprobs.get(0, [])] == [t.token_id for t in e.logprobs.get(0, [])]
        assert [t.logprob for t in o.logprobs.get(0, [])] == pytest.approx([t.logprob for t in e.logprobs.get(0, [])],
                                                                          abs=1e-4)


def test_seeded_samples_in_a_batch_equal_the_same_request_alone(batching, questions):
    specs = [{"question": q, "max_tokens": 10 + 6 * i, "temperature": 0.9, "seed": 100 + i, "n": 1 + i % 2}
             for i, q in enumerate(questions[:5])]
    alone = one_at_a_time(batching, specs)
    together = staggered(batching, specs, after_pieces=1)
    for a, t, spec in zip(alone, together, specs, strict=True):
        assert [a.answer(i) for i in range(spec["n"])] == [t.answer(i) for i in range(spec["n"])]
    assert alone[1].answer(0) != alone[1].answer(1)  # the choices of one request are different draws


def test_logprobs_and_raw_prompts_in_a_running_batch_equal_one_at_a_time_answers(serial, batching, engine,
                                                                                 questions):
    """Each row's log-probabilities come from its own row of the step's raw logits, and are handed on with the same
    pieces as the serial Worker's; a text completion's raw prompts are continued as plain text, choice i answering
    prompts[i // n]."""
    ids = [engine.tokenizer(q)["input_ids"] for q in questions[:2]]
    specs = [{"question": questions[0], "max_tokens": 20, "logprobs": 3},
             {"question": "", "max_tokens": 9, "prompts": ids, "n": 2},
             {"question": questions[2], "max_tokens": 14, "logprobs": 0, "stop": ["never-said"]},
             {"question": "", "max_tokens": 12, "prompts": ids[1:], "logprobs": 2},
             {"question": questions[3], "max_tokens": 6}]
    expected = one_at_a_time(serial, specs)
    batched = staggered(batching, specs, after_pieces=1)
    for b, e, spec in zip(batched, expected, specs, strict=True):
        choices = spec.get("n", 1) * len(spec.get("prompts") or [None])
        assert [b.answer(i) for i in range(choices)] == [e.answer(i) for i in range(choices)]
        assert b.logprobs.keys() == e.logprobs.keys() == (set(range(choices)) if "logprobs" in spec else set())
        for i in b.logprobs:
            mine, theirs = b.logprobs[i], e.logprobs[i]
            assert [t.token_id for t in mine] == [t.token_id for t in theirs]
            assert len(mine) == b.answer(i)[2]  # one entry per generated token
            assert [t.logprob for t in mine] == pytest.approx([t.logprob for t in theirs], abs=1e-4)
            assert [[t for t, _ in m.top] for m in mine] == [[t for t, _ in m.top] for m in theirs]
            assert all(len(m.top) == spec["logprobs"] for m in mine)
    # Choice i answers prompts[i // n]: the second prompt's two choices agree, and begin its longer answer alone.
    second = batched[1].answer(2)[0]
    assert batched[1].answer(3)[0] == second != batched[1].answer(0)[0] and batched[3].answer(0)[0].startswith(second)
    assert batching.peak_batch_size >= 3


def test_a_cancelled_job_leaves_the_batch_at_the_next_step_and_the_others_finish(serial, batching, questions):
    specs = [{"question": q, "max_tokens": 30} for q in questions[:3]]
    expected = one_at_a_time(serial, specs)
    leaving = Outcome()
    leaver = job(questions[3], leaving, max_tokens=2000)
    batching.submit(leaver)
    wait_until(lambda: leaving.pieces >= 3)
    outcomes = staggered(batching, specs, after_pieces=1)
    batching.cancel(leaver)
    wait_until(lambda: batching.batch_size == 0)
    assert [o.answer() for o in outcomes] == [e.answer() for e in expected]
    assert not leaving.done.is_set() and len(leaving.ends) == 0


def test_requests_past_the_batch_limits_wait_in_line_and_then_run(engine, questions):
    worker = make_worker(engine, 16, BatchLimits(max_batch_size=2, max_batch_tokens=4096))
    worker.start()
    try:
        outcomes = staggered(worker, [{"question": q, "max_tokens": 20} for q in questions[:5]], after_pieces=0)
    finally:
        worker.close()
    assert all(o.answer()[2] > 0 for o in outcomes)
    assert worker.peak_batch_size == 2


def test_streamed_and_whole_answers_over_http_in_one_batch_equal_greedy_alone(engine, questions):
    app = create_app(engine, MODEL, batching=BatchLimits(max_batch_size=8))
    with running(app) as base:
        api = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)

        def ask(question: str, max_tokens: int, stream: bool) -> str:
            kwargs = {"model": MODEL, "messages": [{"role": "user", "content": question}], "temperature": 0,
                      "max_tokens": max_tokens}
            if not stream:
                return api.chat.completions.create(**kwargs).choices[0].message.content
            return "".join(chunk.choices[0].delta.content or "" for chunk in
                           api.chat.completions.create(stream=True, **kwargs) if chunk.choices)

        cases = [(q, 8 + 5 * i, i % 2 == 0) for i, q in enumerate(questions)]
        alone = [ask(*case) for case in cases]
        results: list[str | None] = [None] * len(cases)

        def run(i: int) -> None:
            results[i] = ask(*cases[i])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(cases))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    assert results == alone
    assert app.state.worker.peak_batch_size >= 2


class OneAtATime:
    """The engine without `batch_generator`: serve falls back on the serial Worker, as for ChatGLM-6B."""

    def __init__(self, engine: Engine):
        self._engine = engine

    def __getattr__(self, name: str):
        if name == "batch_generator":
            raise AttributeError(name)
        return getattr(self._engine, name)


def streamed_features(api, question: str) -> dict:
    """One streamed chat answer and one streamed text completion that use logprobs, a stop string, include_usage and
    a seed: what each worker must serve alike."""
    def chat(**kwargs) -> tuple[str, str, list, object]:
        text, reason, entries, usage = "", None, [], None
        for chunk in api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                                 stream=True, stream_options={"include_usage": True}, **kwargs):
            usage = chunk.usage or usage
            for choice in chunk.choices:
                text += choice.delta.content or ""
                reason = choice.finish_reason or reason
                entries += [(t.token, t.logprob) for t in (choice.logprobs.content or [])] \
                    if choice.logprobs else []
        return text, reason, entries, (usage.prompt_tokens, usage.completion_tokens)

    plain = chat(max_tokens=16, temperature=0)[0]
    stop = plain[len(plain) // 2: len(plain) // 2 + 2]
    completion = "".join(c.choices[0].text for c in api.completions.create(
        model=MODEL, prompt=question, max_tokens=7, temperature=0, stream=True, logprobs=1) if c.choices)
    return {"greedy": chat(max_tokens=16, temperature=0, logprobs=True, top_logprobs=2),
            "stopped": chat(max_tokens=16, temperature=0, stop=[stop]), "stop": stop, "completion": completion,
            "seeded": [chat(max_tokens=12, temperature=1.0, seed=7)[0] for _ in range(2)]}


def test_the_serial_and_the_batching_worker_serve_every_feature_alike(engine, questions):
    """logprobs, stop strings, include_usage and text completions answer the same from both workers; a seed repeats
    its sample in each (the draws differ between them: the serial one seeds torch's global generator)."""
    found = {}
    for name, served in (("serial", OneAtATime(engine)), ("batching", engine)):
        app = create_app(served, MODEL)
        with running(app) as base:
            api = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
            found[name] = streamed_features(api, questions[1])
        assert isinstance(app.state.worker, BatchWorker) == (name == "batching")
    serial, batching = found["serial"], found["batching"]
    for result in (serial, batching):
        assert result["stopped"][1] == "stop" and result["stop"] not in result["stopped"][0]
        assert result["seeded"][0] == result["seeded"][1]
        assert len(result["greedy"][2]) == result["greedy"][3][1] > 0  # a logprob per generated token
    (text, reason, entries, usage), theirs = serial.pop("greedy"), batching.pop("greedy")
    assert (text, reason, usage) == (theirs[0], theirs[1], theirs[3])
    assert [t for t, _ in entries] == [t for t, _ in theirs[2]]
    assert [lp for _, lp in entries] == pytest.approx([lp for _, lp in theirs[2]], abs=1e-4)
    assert {k: v for k, v in serial.items() if k != "seeded"} == {k: v for k, v in batching.items() if k != "seeded"}


def test_a_client_leaving_mid_stream_over_http_frees_its_row_while_the_others_finish(engine, questions):
    import http.client
    import json
    from urllib.parse import urlsplit

    app = create_app(engine, MODEL, batching=BatchLimits(max_batch_size=8))
    with running(app) as base:
        api = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)

        def ask(question: str) -> str:
            return "".join(c.choices[0].delta.content or "" for c in api.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=30,
                stream=True) if c.choices)

        alone = [ask(q) for q in questions[:3]]
        parts = urlsplit(base)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        conn.request("POST", "/v1/chat/completions", json.dumps({
            "model": MODEL, "messages": [{"role": "user", "content": questions[3]}], "max_tokens": 2000,
            "temperature": 0, "stream": True}), {"Content-Type": "application/json"})
        response = conn.getresponse()
        for _ in range(4):  # the role chunk and some text: the long answer is under way
            while not response.fp.readline().startswith(b"data: "):
                pass
        results: list[str | None] = [None] * 3

        def run(i: int) -> None:
            results[i] = ask(questions[i])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
        wait_until(lambda: app.state.worker.batch_size == 4)  # the long answer shares the batch with the others
        response.close()
        conn.close()
        for thread in threads:
            thread.join(120)
        wait_until(lambda: app.state.worker.batch_size == 0, seconds=10)  # 2000 tokens would take far longer
    assert results == alone
    assert app.state.worker.peak_batch_size >= 3
