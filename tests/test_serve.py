"""glmtune serve: the official `openai` client against a real uvicorn server on a free local port, streaming
included; the key; every malformed request's 4xx in OpenAI's error shape; concurrent requests; the bounded queue's
429 and a client leaving mid-stream (with a slow stand-in engine); the command itself."""

from __future__ import annotations

import copy
import http.client
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from urllib.parse import urlsplit

import pytest

from glmtune.serve.background import running, serving

openai = pytest.importorskip("openai")

KEY = "sk-test-key"
MODEL = "tiny"


def client(url: str, key: str = KEY):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def post(url: str, body: bytes | dict, key: str | None = KEY) -> tuple[int, dict]:
    """A raw POST to /v1/chat/completions: status and JSON body (for what the openai client won't send)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    conn.request("POST", "/v1/chat/completions", body if isinstance(body, bytes) else json.dumps(body), headers)
    response = conn.getresponse()
    status, payload = response.status, json.loads(response.read())
    conn.close()
    return status, payload


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def url(tiny_model) -> Iterator[str]:
    """One server over the tiny model for the whole module (loading it once)."""
    from glmtune.inference.engine import Engine
    from glmtune.serve.app import create_app

    with running(create_app(Engine(str(tiny_model)), MODEL, api_key=KEY)) as base:
        yield base


@pytest.fixture(scope="module")
def api(url):
    return client(url)


@pytest.fixture(scope="module")
def question(demo_rows) -> str:
    return demo_rows[0]["instruction"]


def greedy(api, question: str, **kwargs):
    return api.chat.completions.create(model=MODEL, messages=user(question), temperature=0, **kwargs)


def test_models_lists_the_served_model(api):
    assert [m.id for m in api.models.list().data] == [MODEL]
    assert api.models.retrieve(MODEL).id == MODEL


def test_completion_answers_like_infer_and_counts_its_tokens(api, cli, tiny_model, tokenizer, question):
    answer = greedy(api, question, max_tokens=16)
    infer = cli("infer", "--model", tiny_model, "--prompt", question, "--max_new_tokens", "16", "--temperature", "0")
    assert infer.code == 0, infer.err
    assert answer.choices[0].message.content == json.loads(infer.out)["response"]
    assert answer.choices[0].message.role == "assistant" and answer.model == MODEL
    # The reference prompt length: transformers' own chat-template tokenization.
    prompt = tokenizer.apply_chat_template(user(question), add_generation_prompt=True, tokenize=True)["input_ids"]
    usage = answer.usage
    assert usage.prompt_tokens == len(prompt)
    # The random tiny model never reaches a stop token in 16 tokens: the budget ends the answer.
    assert (answer.choices[0].finish_reason, usage.completion_tokens) == ("length", 16)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_stream_joins_to_the_same_answer_and_ends_with_usage_and_done(api, url, question):
    whole = greedy(api, question, max_tokens=16)
    chunks = list(greedy(api, question, max_tokens=16, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])
    # On the wire: server-sent events, the last one `data: [DONE]`.
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps({"model": MODEL, "messages": user(question),
                                                             "max_tokens": 4, "stream": True}),
                 {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    response = conn.getresponse()
    assert response.getheader("content-type").startswith("text/event-stream")
    events = response.read().decode().split("\n\n")
    conn.close()
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(e.startswith("data: {") for e in events[:-2])


def test_n_greedy_choices_are_identical_and_seeded_samples_repeat(api, question):
    answer = greedy(api, question, max_tokens=8, n=2)
    assert [c.index for c in answer.choices] == [0, 1]
    assert answer.choices[0].message.content == answer.choices[1].message.content
    assert answer.usage.completion_tokens == 16
    sampled = [api.chat.completions.create(model=MODEL, messages=user(question), max_tokens=8, n=2, temperature=1,
                                           seed=7) for _ in range(2)]
    texts = [[c.message.content for c in s.choices] for s in sampled]
    assert texts[0] == texts[1]


def test_stop_string_cuts_the_answer_and_ends_generation(api, question):
    answer = greedy(api, question, max_tokens=24).choices[0].message.content
    start = len(answer) // 3
    while "\ufffd" in answer[start:start + 2] or not answer[start:start + 2].strip():  # a whole, visible pair
        start += 1
    stop = answer[start:start + 2]
    expected = answer[:answer.index(stop)]
    cut = greedy(api, question, max_tokens=24, stop=[stop, "never said"])
    assert (cut.choices[0].message.content, cut.choices[0].finish_reason) == (expected, "stop")
    assert cut.usage.completion_tokens < 24  # generation stopped at the stop string, not at the budget
    chunks = list(greedy(api, question, max_tokens=24, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_max_tokens_ends_the_answer_with_length(api, question):
    for limit in ({"max_tokens": 3}, {"max_completion_tokens": 3}):
        answer = greedy(api, question, **limit)
        assert (answer.choices[0].finish_reason, answer.usage.completion_tokens) == ("length", 3)


def test_a_missing_or_wrong_key_is_401(url, question):
    with pytest.raises(openai.AuthenticationError) as error:
        client(url, key="sk-wrong").chat.completions.create(model=MODEL, messages=user(question))
    assert error.value.status_code == 401 and error.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(url, key="sk-wrong").models.list()
    status, body = post(url, {"model": MODEL, "messages": user(question)}, key=None)
    assert status == 401 and set(body["error"]) == {"message", "type", "param", "code"}


BAD_REQUESTS = {
    "empty messages": ({"messages": []}, 400, "messages"),
    "unknown role": ({"messages": [{"role": "bot", "content": "hi"}]}, 400, "messages.0.role"),
    "max_tokens beyond the context": ({"max_tokens": 2048}, 400, "max_tokens"),
    "max_tokens 0": ({"max_tokens": 0}, 400, "max_tokens"),
    "n 0": ({"n": 0}, 400, "n"),
    "a string for a number": ({"temperature": "hot"}, 400, "temperature"),
    "messages not a list": ({"messages": "hi"}, 400, "messages"),
    "a late system message": ({"messages": [*user("hi"), {"role": "system", "content": "s"}]}, 400,
                              "messages.1.role"),
    "an assistant message last": ({"messages": [*user("hi"), {"role": "assistant", "content": "a"}]}, 400,
                                  "messages"),
    "a tool that is not a function": ({"tools": [{"type": "retrieval"}]}, 400, "tools.0"),
    "a tool_choice not served": ({"tools": [{"type": "function", "function": {"name": "f"}}],
                                  "tool_choice": "required"}, 400, "tool_choice"),
    "a call whose arguments are not JSON": ({"messages": [*user("hi"), {"role": "assistant", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "1"}]}, 400, "messages.1.tool_calls"),
    "thinking for a template without the switch": ({"chat_template_kwargs": {"enable_thinking": False}}, 400,
                                                   "chat_template_kwargs.enable_thinking"),
    "an unknown chat_template_kwargs key": ({"chat_template_kwargs": {"foo": 1}}, 400, "chat_template_kwargs"),
    "functions": ({"functions": [{"name": "f"}]}, 400, "functions"),
    "an unknown model": ({"model": "gpt-4"}, 404, "model"),
    "bad JSON": (b'{"model": "tiny", "messages": [', 400, None),
    "not an object": (b"[1, 2]", 400, None),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_a_malformed_request_answers_4xx_in_openai_error_shape(url, case):
    body, status, param = BAD_REQUESTS[case]
    if isinstance(body, dict):
        body = {"model": MODEL, "messages": user("hi"), **body}
    got, answer = post(url, body)
    assert got == status, answer
    assert set(answer) == {"error"} and set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["param"] == param and answer["error"]["message"]


def test_the_openai_client_raises_bad_request_for_a_malformed_request(api):
    with pytest.raises(openai.BadRequestError) as error:
        api.chat.completions.create(model=MODEL, messages=[])
    assert error.value.status_code == 400


def test_concurrent_requests_are_all_answered_as_if_alone(api, demo_rows):
    questions = [row["instruction"] for row in demo_rows[:4]]
    alone = {q: greedy(api, q, max_tokens=6).choices[0].message.content for q in questions}
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda i: greedy(api, questions[i % 4], max_tokens=6), range(32)))
    assert [a.choices[0].message.content for a in answers] == [alone[questions[i % 4]] for i in range(32)]


class SlowEngine:
    """Stands in for the Engine: answers "word word ...", one word every 10 ms once `release` is set; records
    when an answer starts and when one is stopped before its end."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=2048))
        self.started, self.release, self.stopped = threading.Event(), threading.Event(), threading.Event()

    def stream(self, conversation, settings, stop_strings=None):
        return SlowStream(self, settings.max_new_tokens)


class SlowStream:
    def __init__(self, engine: SlowEngine, budget: int):
        from glmtune.inference.answers import AnswerParser

        self.engine, self.budget, self.completion, self.parser = engine, budget, None, AnswerParser()

    def pieces(self):
        from glmtune.inference.streaming import Completion

        self.engine.started.set()
        try:
            assert self.engine.release.wait(30)
            for i in range(self.budget):
                time.sleep(0.01)
                yield " word" if i else "word"
        except GeneratorExit:
            self.engine.stopped.set()
            raise
        self.completion = Completion(" ".join(["word"] * self.budget), 3, self.budget, "length")


@pytest.fixture(scope="module")
def slow(tokenizer):
    """A server over SlowEngine in which one request may wait while one runs."""
    from glmtune.serve.app import create_app

    engine = SlowEngine(tokenizer)
    app = create_app(engine, MODEL, max_queue=1)
    with running(app) as base:
        yield SimpleNamespace(engine=engine, url=base, worker=app.state.worker)
    engine.release.set()


def test_a_full_queue_answers_429(slow):
    slow.engine.release.clear()
    slow.engine.started.clear()
    api = client(slow.url)
    ask = lambda: api.chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=3)  # noqa: E731
    with ThreadPoolExecutor(2) as pool:
        running_one = pool.submit(ask)
        assert slow.engine.started.wait(10)
        waiting_one = pool.submit(ask)
        deadline = time.monotonic() + 10
        while slow.worker.waiting < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as error:
            ask()
        assert error.value.status_code == 429 and error.value.code == "queue_full"
        slow.engine.release.set()
        assert running_one.result().choices[0].message.content == "word word word"
        assert waiting_one.result().choices[0].finish_reason == "length"


def test_a_client_leaving_mid_stream_frees_the_worker(slow):
    slow.engine.release.set()
    slow.engine.stopped.clear()
    parts = urlsplit(slow.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    # 2000 words at 10 ms each: 20 s, unless the server stops the answer when the client leaves.
    conn.request("POST", "/v1/chat/completions", json.dumps({"model": MODEL, "messages": user("hi"),
                                                             "max_tokens": 2000, "stream": True}),
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    while "word" not in response.fp.readline().decode():  # the answer is under way
        pass
    response.close()
    conn.close()
    assert slow.engine.stopped.wait(5), "the answer went on after its client left"
    start = time.monotonic()
    answer = client(slow.url).chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=2)
    assert answer.choices[0].message.content == "word word" and time.monotonic() - start < 5


def test_a_busy_port_is_a_user_error(cli, tiny_model):
    from glmtune.commands.serve import listen

    with listen("127.0.0.1", 0) as busy:
        result = cli("serve", "--model", tiny_model, "--port", busy.getsockname()[1])
    assert result.code == 2 and "cannot listen on 127.0.0.1" in result.err and "--port" in result.err


def test_serve_command_prints_its_url_and_takes_the_key_from_the_environment(tiny_model, monkeypatch, capsys):
    from glmtune.arguments import ModelArguments, ServeArguments
    from glmtune.commands.serve import build_server

    monkeypatch.setenv("GLMTUNE_API_KEY", KEY)
    server, listener = build_server(ModelArguments(model=str(tiny_model)), ServeArguments(port=0))
    port = listener.getsockname()[1]
    assert capsys.readouterr().out == f"Serving '{tiny_model.name}' at http://127.0.0.1:{port}/v1 " \
                                      f"(OpenAI-compatible; Ctrl-C stops)\n"
    with serving(server, listener) as base:
        assert [m.id for m in client(base).models.list().data] == [tiny_model.name]
        with pytest.raises(openai.AuthenticationError):
            client(base, key="sk-wrong").models.list()


def test_a_client_leaving_while_in_line_gives_up_its_place(slow):
    slow.engine.release.clear()
    slow.engine.started.clear()
    api = client(slow.url)
    with ThreadPoolExecutor(1) as pool:
        running_one = pool.submit(lambda: api.chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=2))
        assert slow.engine.started.wait(10)
        parts = urlsplit(slow.url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        conn.request("POST", "/v1/chat/completions", json.dumps({"model": MODEL, "messages": user("hi")}),
                     {"Content-Type": "application/json"})
        deadline = time.monotonic() + 10
        while slow.worker.waiting < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        conn.close()  # leaves without reading the answer
        while slow.worker.waiting:
            assert time.monotonic() < deadline, "the request that left still holds its place in line"
            time.sleep(0.01)
        slow.engine.release.set()
        assert running_one.result().choices[0].message.content == "word word"


class ScriptedEngine:
    """Stands in for the Engine of a GLM-4.5-like model (the tiny tokenizer with the official GLM-4.6 template and
    its markers as special tokens): answers every request with `answer`, the raw text the model would write, in
    pieces of three characters; records what it was asked and the prompt it was given."""

    def __init__(self, tokenizer, answer: str = ""):
        self.tokenizer, self.answer, self.asked = tokenizer, answer, []
        self.model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=4096))

    def stream(self, conversation, settings, stop_strings=None):
        from glmtune.data.templates import encode_prompt
        from glmtune.inference.engine import answer_parser

        prompt = encode_prompt(self.tokenizer, conversation, settings.enable_thinking)
        self.asked.append(SimpleNamespace(conversation=conversation, settings=settings,
                                          prompt=self.tokenizer.decode(prompt)))
        return ScriptedStream(self.answer, answer_parser(self.tokenizer, prompt, conversation.tools))


class ScriptedStream:
    def __init__(self, answer: str, parser):
        self.answer, self.parser, self.completion = answer, parser, None

    def pieces(self):
        from glmtune.inference.streaming import count_completion

        for i in range(0, len(self.answer), 3):
            yield self.answer[i:i + 3]
        self.completion = count_completion(self.parser.parse(self.answer), 10, [5, 6, 0], [0])


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}
THOUGHT_AND_CALL = ("\n<think>The user wants Paris.</think>\nLet me look.\n<tool_call>get_weather\n<arg_key>city"
                    "</arg_key>\n<arg_value>Paris</arg_value>\n<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n"
                    "</tool_call>")


@pytest.fixture(scope="module")
def scripted(tokenizer):
    from pathlib import Path

    from tokenizers import AddedToken

    from glmtune.serve.app import create_app

    template = Path(__file__).resolve().parents[2] / "shared" / "templates" / "glm-4.6.jinja"
    if not template.is_file():
        pytest.skip(f"{template} is absent (../shared)")
    glm45 = copy.deepcopy(tokenizer)
    glm45.add_tokens([AddedToken(m, special=True, normalized=False) for m in
                      ["<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>",
                       "</arg_value>"]])
    glm45.chat_template = template.read_text(encoding="utf-8")
    engine = ScriptedEngine(glm45)
    with running(create_app(engine, MODEL)) as base:
        yield SimpleNamespace(engine=engine, api=client(base))


def test_reasoning_comes_apart_from_the_answer_whole_and_streamed(scripted):
    scripted.engine.answer = "\n<think>Two and two.\nFour.</think>\n4"
    answer = scripted.api.chat.completions.create(model=MODEL, messages=user("2+2?"))
    message = answer.choices[0].message
    assert (message.content, message.reasoning_content) == ("4", "Two and two.\nFour.")
    assert answer.choices[0].finish_reason == "stop" and message.tool_calls is None
    chunks = list(scripted.api.chat.completions.create(model=MODEL, messages=user("2+2?"), stream=True))
    deltas = [c.choices[0].delta for c in chunks]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "Two and two.\nFour."
    assert "".join(d.content or "" for d in deltas) == "4"
    assert not any("<" in (d.content or "") + (getattr(d, "reasoning_content", None) or "") for d in deltas)


def test_a_tool_call_is_answered_as_tool_calls_whole_and_streamed(scripted):
    scripted.engine.answer = THOUGHT_AND_CALL
    answer = scripted.api.chat.completions.create(model=MODEL, messages=user("Weather in Paris?"), tools=[WEATHER])
    choice = answer.choices[0]
    (call,) = choice.message.tool_calls
    assert choice.finish_reason == "tool_calls" and call.type == "function" and call.id.startswith("call_")
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris", "days": 2})
    assert (choice.message.content, choice.message.reasoning_content) == ("Let me look.", "The user wants Paris.")
    assert scripted.engine.asked[-1].conversation.tools == [WEATHER]
    assert "get_weather" in scripted.engine.asked[-1].prompt  # the tools reached the template

    chunks = list(scripted.api.chat.completions.create(model=MODEL, messages=user("Weather in Paris?"),
                                                       tools=[WEATHER], stream=True))
    streamed = [t for c in chunks for t in (c.choices[0].delta.tool_calls or [])]
    assert [(t.index, t.function.name, json.loads(t.function.arguments)) for t in streamed] == \
           [(0, "get_weather", {"city": "Paris", "days": 2})]
    assert streamed[0].id.startswith("call_") and chunks[-1].choices[0].finish_reason == "tool_calls"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Let me look."


def test_a_malformed_call_is_answered_as_text(scripted):
    scripted.engine.answer = "<tool_call>get_weather\n<arg_key>city</arg_key> oops</tool_call>"
    answer = scripted.api.chat.completions.create(model=MODEL, messages=user("Weather?"), tools=[WEATHER])
    assert answer.choices[0].message.content == scripted.engine.answer
    assert answer.choices[0].finish_reason == "stop" and answer.choices[0].message.tool_calls is None


def test_a_tool_exchange_in_the_history_reaches_the_conversation_and_the_template(scripted):
    scripted.engine.answer = "It is sunny."
    history = [*user("Weather in Paris and Rome?"),
               {"role": "assistant", "content": "Let me check.", "reasoning_content": "Ask the tool.", "tool_calls": [
                   {"id": f"call_{city}", "type": "function",
                    "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}
                   for city in ("Paris", "Rome")]},
               {"role": "tool", "tool_call_id": "call_Paris", "content": "sunny, 21 C"},
               {"role": "tool", "tool_call_id": "call_Rome", "content": "rain, 14 C"}]
    answer = scripted.api.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER])
    assert answer.choices[0].message.content == "It is sunny."
    asked = scripted.engine.asked[-1]
    assistant, paris, rome = asked.conversation.messages[1:]
    assert (assistant.content, assistant.reasoning) == ("Let me check.", "Ask the tool.")
    assert assistant.tool_call == [{"name": "get_weather", "arguments": {"city": city}, "id": f"call_{city}"}
                                   for city in ("Paris", "Rome")]  # one turn, both calls
    assert (paris.role, paris.tool_call_id, paris.content) == ("observation", "call_Paris", "sunny, 21 C")
    assert (rome.tool_call_id, rome.content) == ("call_Rome", "rain, 14 C")
    # As the official template writes them: the text beside the calls, both calls in one turn, both results.
    calls = "".join(f"<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>{city}</arg_value>\n</tool_call>"
                    for city in ("Paris", "Rome"))
    assert "Let me check." in asked.prompt and calls in asked.prompt.replace("\n<tool_call>", "<tool_call>")
    assert asked.prompt.count("<|assistant|>") == 2  # the history's turn and the generation prompt
    assert "sunny, 21 C" in asked.prompt and "rain, 14 C" in asked.prompt


def test_an_assistant_turn_with_several_calls_is_prompted_as_the_official_template_renders_it(scripted):
    scripted.engine.answer = "Sunny in Paris, rain in Rome."
    calls = [{"id": f"call_{city}", "type": "function",
              "function": {"name": "get_weather", "arguments": json.dumps({"city": city, "days": 2})}}
             for city in ("Paris", "Rome")]
    history = [*user("Weather in Paris and Rome?"),
               {"role": "assistant", "content": "Let me check both.", "reasoning_content": "Two cities.",
                "tool_calls": calls},
               {"role": "tool", "tool_call_id": "call_Paris", "content": "sunny"},
               {"role": "tool", "tool_call_id": "call_Rome", "content": "rain"}]
    scripted.api.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER])
    # The same OpenAI messages through the official template itself (arguments as the mappings it iterates, as
    # vLLM hands them to it).
    official = copy.deepcopy(history)
    for call in official[1]["tool_calls"]:
        call["function"]["arguments"] = json.loads(call["function"]["arguments"])
    tokenizer = scripted.engine.tokenizer
    text = tokenizer.apply_chat_template(official, tools=[WEATHER], add_generation_prompt=True, tokenize=False)
    assert text.count("<tool_call>get_weather") == 2 and text.count("<|assistant|>") == 2
    assert scripted.engine.asked[-1].prompt == tokenizer.decode(tokenizer.encode(text, add_special_tokens=False))


def test_chat_template_kwargs_switch_thinking_per_request_over_the_servers_flag(scripted):
    from glmtune.serve.app import prepare
    from glmtune.serve.schemas import ChatCompletionRequest

    scripted.engine.answer = "4"
    scripted.api.chat.completions.create(model=MODEL, messages=user("2+2?"),
                                         extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    asked = scripted.engine.asked[-1]
    assert asked.settings.enable_thinking is False
    assert asked.prompt.endswith("2+2?/nothink<|assistant|>\n<think></think>")
    scripted.api.chat.completions.create(model=MODEL, messages=user("2+2?"))
    assert not scripted.engine.asked[-1].prompt.endswith("</think>")

    def thinking(kwargs, server_flag):
        body = ChatCompletionRequest(model=MODEL, messages=user("2+2?"), chat_template_kwargs=kwargs)
        return prepare(scripted.engine, body, 4096, server_flag)[2].enable_thinking

    assert thinking(None, False) is False and thinking({"enable_thinking": True}, False) is True
    assert thinking({"enable_thinking": False}, True) is False and thinking(None, None) is None


def test_serve_refuses_enable_thinking_for_a_template_without_the_switch(cli, tiny_model):
    result = cli("serve", "--model", tiny_model, "--port", "0", "--enable_thinking", "false")
    assert result.code == 2 and "has no thinking switch" in result.err
