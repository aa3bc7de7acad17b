"""How serve's streamed answers travel: text pieces that are ready together go in one chunk, which the official
openai client still reads as the same answer; the worker's events of one decoding step wake the event loop once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from glmtune.inference.answers import AnswerDelta
from glmtune.inference.logprobs import TokenLogprob
from glmtune.inference.tool_calls import ToolCall
from glmtune.serve.app import Answer
from glmtune.serve.completions import CompletionAnswer
from glmtune.serve.scheduler import AnswerPiece, ChoiceEnd, JobEnd
from glmtune.serve.streamed import Handoff, Inbox, merge_pieces

openai = pytest.importorskip("openai")


def text(index: int, content: str, token: int | None = None) -> AnswerPiece:
    logprobs = None if token is None else [TokenLogprob(token, -0.5, [])]
    return AnswerPiece(index, AnswerDelta(content=content), logprobs)


def test_ready_text_pieces_of_a_choice_merge_in_order_and_nothing_else_does():
    call = AnswerPiece(0, AnswerDelta(tool_call=ToolCall("f", "{}")))
    events = [text(0, "a", 1), text(1, "x"), text(0, "b", 2), AnswerPiece(0, AnswerDelta(reasoning="r")),
              AnswerPiece(0, AnswerDelta(reasoning="s")), call, text(0, "c", 3), ChoiceEnd(0, "stop", 5),
              text(1, "y"), ChoiceEnd(1, "length", 2), JobEnd()]
    merged = merge_pieces(events)
    shown = [(e.index, e.delta.content, e.delta.reasoning, e.delta.tool_call) if isinstance(e, AnswerPiece) else e
             for e in merged]
    assert shown == [(0, "ab", "", None), (1, "xy", "", None), (0, "", "rs", None), (0, "", "", call.delta.tool_call),
                     (0, "c", "", None), ChoiceEnd(0, "stop", 5), ChoiceEnd(1, "length", 2), JobEnd()]
    assert [t.token_id for t in merged[0].logprobs] == [1, 2] and merged[1].logprobs is None


async def batches(*groups):
    for group in groups:
        yield list(group)


def sse_body(answer, *groups) -> bytes:
    async def collect() -> list[str]:
        return [part async for part in answer.sse(batches(*groups), include_usage=True)]

    parts = asyncio.run(collect())
    assert len(parts) == len(groups)  # one write per batch of events
    return "".join(parts).encode()


@contextlib.contextmanager
def replay(body: bytes) -> Iterator[openai.OpenAI]:
    """The official client, against a server that answers every POST with `body` as a streamed response."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_port}/v1", api_key="unused", max_retries=0,
                            timeout=30)
    finally:
        server.shutdown()
        server.server_close()


def test_the_openai_client_reads_chunks_carrying_several_tokens_as_the_same_chat_answer():
    answer = Answer("m", prompt_tokens=4, n=2)
    body = sse_body(answer, [text(0, "Hel"), text(1, "A"), text(0, "lo"), text(0, " you")],
                    [text(1, "B"), ChoiceEnd(0, "stop", 3), ChoiceEnd(1, "length", 2), JobEnd()])
    assert body.count(b"data: ") == 2 + 3 + 2 + 1 + 1  # roles, 3 merged text chunks, ends, usage, [DONE]
    with replay(body) as api:
        chunks = list(api.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                  stream=True))
    texts = ["", ""]
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == ["Hello you", "AB"]
    assert chunks[-1].usage.completion_tokens == 5 and chunks[-1].usage.prompt_tokens == 4


def test_merged_completion_chunks_keep_each_tokens_logprob_and_offset():
    from glmtune.serve.schemas import CompletionLogprobs

    class Tokens:  # token_text's view of a tokenizer: each id is one letter
        def convert_ids_to_tokens(self, ids):
            return chr(96 + ids)

        def decode(self, ids, **_):
            return "".join(chr(96 + i) for i in ids)

    answer = CompletionAnswer("m", prompt_tokens=2, choices=1, tokenizer=Tokens(), logprobs=True)
    body = sse_body(answer, [text(0, "a", 1)], [text(0, "b", 2), text(0, "c", 3), ChoiceEnd(0, "length", 3),
                                                JobEnd()])
    payloads = [json.loads(line[6:]) for line in body.decode().splitlines() if line.startswith("data: {")]
    logprobs = [CompletionLogprobs(**p["choices"][0]["logprobs"]) for p in payloads if p["choices"]]
    assert [p["choices"][0]["text"] for p in payloads if p["choices"]] == ["a", "bc", ""]
    assert [lp.text_offset for lp in logprobs[:2]] == [[0], [1, 2]] and logprobs[1].tokens == ["b", "c"]


def test_a_steps_events_wake_the_event_loop_once():
    async def run() -> tuple[int, list]:
        loop = asyncio.get_running_loop()
        handoff, inboxes = Handoff(loop), [Inbox(loop), Inbox(loop)]
        woken = 0
        drain = handoff._drain

        def counted() -> None:
            nonlocal woken
            woken += 1
            drain()

        handoff._drain = counted
        delivers = [handoff.deliver_to(inbox) for inbox in inboxes]

        def step() -> None:  # the worker thread: one decoding step's events for two streams
            handoff.hold()
            for k in range(3):
                delivers[k % 2](text(0, str(k)))
            handoff.release()

        await loop.run_in_executor(None, step)
        taken = [await inbox.take(1.0) for inbox in inboxes]
        return woken, [[e.delta.content for e in events] for events in taken]

    assert asyncio.run(run()) == (1, [["0", "2"], ["1"]])
