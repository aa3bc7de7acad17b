"""glmtune serve under hostile or careless clients: every refusal's status and OpenAI error shape (a body over the
size limit, too many messages, a prompt too long, wrong types and ranges, unknown fields, malformed JSON, invalid
UTF-8, deep nesting, huge max_tokens and n), and clients that are slow or leave mid-stream. No client input may
answer 5xx. The servers and helpers are test_serve's."""

from __future__ import annotations

import json
import socket
import struct
from types import SimpleNamespace
from urllib.parse import urlsplit

import pytest
from test_serve import MODEL, SlowEngine, post, url, user  # noqa: F401 (url: the tiny model's server fixture)

from glmtune.serve.background import running

LIMITS = {"max_request_bytes": 4096, "max_messages": 8, "max_prompt_tokens": 64, "max_tokens_limit": 100, "max_n": 4}


@pytest.fixture(scope="module")
def limited(tokenizer):
    """A server over test_serve's stand-in engine (the tiny tokenizer, "word word ..." answers) with small limits."""
    from glmtune.serve.app import create_app
    from glmtune.serve.intake import RequestLimits

    engine = SlowEngine(tokenizer)
    engine.release.set()
    with running(create_app(engine, MODEL, limits=RequestLimits(**LIMITS))) as base:
        yield SimpleNamespace(url=base, engine=engine)


def exchange(base: str, request: bytes) -> tuple[int, dict]:
    """Send raw bytes over a new connection; the status and JSON body answered."""
    parts = urlsplit(base)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as conn:
        conn.sendall(request)
        answer = conn.makefile("rb").read()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def raw_post(body: bytes, content_type: str | None = "application/json", length: int | None = None,
             chunked: bool = False) -> bytes:
    headers = ["POST /v1/chat/completions HTTP/1.1", "Host: x", "Connection: close"]
    headers += [f"Content-Type: {content_type}"] if content_type else []
    if chunked:
        headers.append("Transfer-Encoding: chunked")
        body = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 1000]), body[i:i + 1000])
                        for i in range(0, len(body), 1000)) + b"0\r\n\r\n"
    else:
        headers.append(f"Content-Length: {len(body) if length is None else length}")
    return "\r\n".join(headers).encode() + b"\r\n\r\n" + body


def ask(**fields) -> dict:
    return {"model": MODEL, "messages": user("hi"), "max_tokens": 2, **fields}


def assert_refused(status: int, answer: dict, expected: int, param: str | None = None, says: str = "") -> None:
    assert status == expected, answer
    assert set(answer) == {"error"} and set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["param"] == param and says in answer["error"]["message"], answer


def test_a_request_within_the_limits_is_answered(limited):
    status, answer = post(limited.url, ask(n=4, max_tokens=100, messages=user("hi") * 8), key=None)
    assert status == 200 and [c["index"] for c in answer["choices"]] == [0, 1, 2, 3]


def test_a_body_over_the_size_limit_is_413_whether_its_length_is_declared_or_not(limited):
    body = json.dumps(ask(messages=user("x" * 5000))).encode()
    assert_refused(*exchange(limited.url, raw_post(body)), 413, says="4096 bytes")
    assert_refused(*exchange(limited.url, raw_post(body, chunked=True)), 413, says="--max_request_bytes")
    # Just under the limit is read and answered.
    fits = json.dumps(ask(messages=user("x" * 10))).encode()
    assert exchange(limited.url, raw_post(fits, chunked=True))[0] == 200


def test_a_body_that_does_not_arrive_in_time_is_408(limited, monkeypatch):
    from glmtune.serve import intake

    monkeypatch.setattr(intake, "BODY_TIMEOUT_S", 0.5)
    body = json.dumps(ask()).encode()
    # A client that declares 10 bytes more than it sends, then waits.
    assert_refused(*exchange(limited.url, raw_post(body, length=len(body) + 10)), 408, says="did not arrive")


def test_too_many_messages_and_a_prompt_too_long_are_400(limited):
    assert_refused(*post(limited.url, ask(messages=user("hi") * 9), key=None), 400, "messages", "at most 8")
    status, answer = post(limited.url, ask(messages=user("word " * 80)), key=None)
    assert_refused(status, answer, 400, "messages", "--max_prompt_tokens")
    assert answer["error"]["code"] == "context_length_exceeded"


def test_huge_max_tokens_and_n_are_refused_naming_the_limit(limited):
    assert_refused(*post(limited.url, ask(max_tokens=10**12), key=None), 400, "max_tokens", "--max_tokens_limit")
    assert_refused(*post(limited.url, ask(max_completion_tokens=101), key=None), 400, "max_completion_tokens")
    assert_refused(*post(limited.url, ask(n=5), key=None), 400, "n", "--max_n")
    assert_refused(*post(limited.url, ask(n=10**6), key=None), 400, "n")  # beyond OpenAI's 128 too


WRONG_FIELDS = {
    "a string temperature": ({"temperature": "hot"}, "temperature"),
    "a temperature above 2": ({"temperature": 2.5}, "temperature"),
    "top_p 0": ({"top_p": 0}, "top_p"),
    "a string n": ({"n": "2"}, "n"),
    "a fractional max_tokens": ({"max_tokens": 1.5}, "max_tokens"),
    "a boolean for max_tokens": ({"max_tokens": True}, "max_tokens"),
    "a string stream": ({"stream": "yes"}, "stream"),
    "a number as content": ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    "a message without its role": ({"messages": [{"content": "hi"}]}, "messages.0.role"),
    "a number among the stops": ({"stop": ["a", 1]}, "stop.1"),
    "five stop strings": ({"stop": list("abcde")}, "stop"),
    "a seed beyond 64 bits": ({"seed": 2**64}, "seed"),
    "tools as a string": ({"tools": "f"}, "tools"),
    "a string for include_usage": ({"stream": True, "stream_options": {"include_usage": "yes"}},
                                   "stream_options.include_usage"),
    "an image part": ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
                      "messages.0.content.0.type"),
    "a string model": ({"model": 7}, "model"),
}


@pytest.mark.parametrize("case", WRONG_FIELDS)
def test_a_field_of_the_wrong_type_or_range_is_400_naming_it(limited, case):
    fields, param = WRONG_FIELDS[case]
    assert_refused(*post(limited.url, ask(**fields), key=None), 400, param)


def test_unknown_fields_are_refused_as_openai_refuses_them(limited):
    # OpenAI answers an argument it does not know with 400 "Unrecognized request argument supplied: NAME".
    assert_refused(*post(limited.url, ask(top_k=1), key=None), 400, "top_k",
                   "Unrecognized request argument supplied: top_k")
    assert_refused(*post(limited.url, ask(messages=[{"role": "user", "content": "hi", "mood": "sad"}]), key=None), 400,
                   "messages.0.mood", "unknown field")
    # OpenAI's fields that would change the answer are refused unless neutral; labels are accepted and ignored.
    assert_refused(*post(limited.url, ask(frequency_penalty=0.5), key=None), 400, "frequency_penalty", "not supported")
    assert_refused(*post(limited.url, ask(response_format={"type": "json_object"}), key=None), 400, "response_format")
    accepted = ask(frequency_penalty=0, presence_penalty=0.0, response_format={"type": "text"}, user="u1",
                   metadata={"k": "v"}, store=False, messages=[{"role": "user", "content": "hi", "name": "ann"}])
    assert post(limited.url, accepted, key=None)[0] == 200


BROKEN_BODIES = {
    "malformed JSON": (b'{"model": "tiny", "messages": [', "not valid JSON"),
    "invalid UTF-8": (b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe"}]}', "not valid UTF-8"),
    "a lone surrogate": (b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}', "surrogate"),
    "NaN": (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
            "NaN is not a JSON value"),
    "nesting past Python's recursion limit": (b"[" * 2000 + b"]" * 2000, "nests deeper"),
    "nesting inside a tool": (json.dumps(ask(tools=[{"type": "function", "function": {
        "name": "f", "parameters": json.loads("[" * 70 + "]" * 70)}}])).encode(), "nests deeper"),
    "an array": (b"[1, 2]", "must be a JSON object"),
    "an empty body": (b"", "not valid JSON"),
}


@pytest.mark.parametrize("case", BROKEN_BODIES)
def test_a_body_that_is_not_a_json_object_of_text_is_400_saying_why(limited, case):
    body, says = BROKEN_BODIES[case]
    status, answer = exchange(limited.url, raw_post(body))
    assert status == 400 and says in answer["error"]["message"], answer


def test_a_body_without_the_json_content_type_is_400(limited):
    body = json.dumps(ask()).encode()
    for content_type in (None, "text/plain", "application/x-www-form-urlencoded"):
        assert_refused(*exchange(limited.url, raw_post(body, content_type)), 400, says="Content-Type: application/json")
    assert exchange(limited.url, raw_post(body, "application/json; charset=utf-8"))[0] == 200


def test_any_64_bit_seed_is_taken(limited):
    for seed in (-1, 2**32, 2**63 - 1, -(2**63)):
        assert post(limited.url, ask(seed=seed, temperature=1), key=None)[0] == 200


def test_a_vanishing_temperature_answers_greedily(url):  # noqa: F811 (test_serve's fixture)
    greedy_answer = post(url, ask(max_tokens=8, temperature=0))[1]["choices"][0]["message"]["content"]
    status, answer = post(url, ask(max_tokens=8, temperature=1e-300))
    assert status == 200 and answer["choices"][0]["message"]["content"] == greedy_answer


def test_a_streaming_client_that_vanishes_is_stopped_and_the_server_answers_the_next(limited):
    limited.engine.stopped.clear()
    parts = urlsplit(limited.url)
    conn = socket.create_connection((parts.hostname, parts.port), timeout=30)
    conn.sendall(raw_post(json.dumps(ask(max_tokens=100, stream=True)).encode()))  # 100 words: 1 s
    received = b""
    while b'"content":"word' not in received:  # the answer is under way
        received += conn.recv(4096)
    # Gone without a goodbye: a reset instead of a close, as a client that was killed leaves.
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()
    assert limited.engine.stopped.wait(5), "the answer went on after its client vanished"
    status, answer = post(limited.url, ask(), key=None)
    assert status == 200 and answer["choices"][0]["message"]["content"] == "word word"
