"""glmtune serve's wider OpenAI surface, through the official `openai` client where it applies: text completions
(whole and streamed) against the model's own greedy continuation, logprobs against a direct forward pass,
stream_options.include_usage, /health, and /metrics after a known workload."""

from __future__ import annotations

import http.client
import json
import re
from urllib.parse import urlsplit

import pytest
import test_serve
from test_serve import KEY, MODEL, post, user

# test_serve's fixtures, shared: the server over the tiny model (its own instance for this module), its client.
url, api, question = test_serve.url, test_serve.api, test_serve.question

openai = pytest.importorskip("openai")
torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def engine(tiny_model):
    """The model as the server loads it (float32), for reference answers and forward passes."""
    from glmtune.inference.engine import Engine

    loaded = Engine(str(tiny_model))
    assert loaded.model.dtype == torch.float32
    return loaded


def greedy_ids(engine, prompt: list[int], new_tokens: int) -> list[int]:
    with torch.no_grad():
        output = engine.model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                       dtype=torch.long), do_sample=False, max_new_tokens=new_tokens,
                                       eos_token_id=engine.stop_ids, pad_token_id=engine.tokenizer.pad_token_id)
    return output[0, len(prompt):].tolist()


def forward_logprobs(engine, prompt: list[int], answer: list[int]):
    """log_softmax of one forward pass over prompt + answer, at the positions that predict each answer token."""
    with torch.no_grad():
        logits = engine.model(input_ids=torch.tensor([prompt + answer])).logits[0]
    return torch.log_softmax(logits.float(), -1)[len(prompt) - 1: len(prompt) - 1 + len(answer)]


def get(url: str, path: str, key: str | None = None) -> tuple[int, str, str]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    conn.request("GET", path, headers={"Authorization": f"Bearer {key}"} if key else {})
    response = conn.getresponse()
    result = response.status, response.getheader("content-type"), response.read().decode()
    conn.close()
    return result


def test_a_text_completion_is_the_models_greedy_continuation_whole_and_streamed(api, engine, question):
    prompt = engine.tokenizer(question)["input_ids"]
    expected = engine.tokenizer.decode(greedy_ids(engine, prompt, 12), skip_special_tokens=True)
    whole = api.completions.create(model=MODEL, prompt=question, max_tokens=12, temperature=0)
    assert whole.object == "text_completion" and whole.choices[0].text == expected
    assert (whole.choices[0].finish_reason, whole.usage.prompt_tokens, whole.usage.completion_tokens) == \
        ("length", len(prompt), 12)
    chunks = list(api.completions.create(model=MODEL, prompt=question, max_tokens=12, temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    # include_usage: one last chunk without choices, counting the prompt and the answer.
    assert chunks[-1].choices == [] and (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == \
        (len(prompt), 12)
    assert all(c.usage is None for c in chunks[:-1])


def test_token_id_prompts_and_several_prompts_are_answered_in_order(api, engine, demo_rows):
    texts = [demo_rows[1]["instruction"], demo_rows[2]["instruction"]]
    ids = [engine.tokenizer(t)["input_ids"] for t in texts]
    expected = [engine.tokenizer.decode(greedy_ids(engine, p, 6), skip_special_tokens=True) for p in ids]
    by_ids = api.completions.create(model=MODEL, prompt=ids[0], max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == expected[0]
    both = api.completions.create(model=MODEL, prompt=texts, max_tokens=6, temperature=0, n=2)
    assert [c.text for c in both.choices] == [expected[0], expected[0], expected[1], expected[1]]
    assert both.usage.prompt_tokens == len(ids[0]) + len(ids[1]) and both.usage.completion_tokens == 24


def test_a_completion_defaults_to_sixteen_tokens_as_openai_does(api, question):
    assert api.completions.create(model=MODEL, prompt=question, temperature=0).usage.completion_tokens == 16


@pytest.mark.parametrize(("field", "value"), [("echo", True), ("suffix", "end"), ("best_of", 3),
                                              ("presence_penalty", 0.5)])
def test_what_completions_does_not_serve_is_refused_by_name(api, field, value):
    with pytest.raises(openai.BadRequestError) as error:
        api.completions.create(model=MODEL, prompt="hi", max_tokens=2, **{field: value})
    assert error.value.body["param"] == field and "not supported" in error.value.body["message"]


def test_an_out_of_vocabulary_token_id_is_a_400(url):
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"model": MODEL, "prompt": [1, 10**9], "max_tokens": 2}),
                 {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    response = conn.getresponse()
    body = json.loads(response.read())
    conn.close()
    assert response.status == 400 and body["error"]["param"] == "prompt" and "vocabulary" in body["error"]["message"]


def test_chat_logprobs_are_the_log_softmax_of_a_forward_pass(api, engine, question):
    from glmtune.data.conversation import Conversation, Message
    from glmtune.data.templates import encode_prompt
    from glmtune.inference.logprobs import token_bytes, token_text

    answer = api.chat.completions.create(model=MODEL, messages=user(question), max_tokens=6, temperature=0,
                                         logprobs=True, top_logprobs=3)
    content = answer.choices[0].logprobs.content
    prompt = encode_prompt(engine.tokenizer, Conversation(messages=[Message("user", question)]))
    ids = greedy_ids(engine, prompt, 6)
    reference = forward_logprobs(engine, prompt, ids)
    assert len(content) == answer.usage.completion_tokens == 6
    for item, token_id, row in zip(content, ids, reference, strict=True):
        assert item.token == token_text(engine.tokenizer, token_id)
        assert bytes(item.bytes) == token_bytes(engine.tokenizer, token_id)
        assert item.logprob == pytest.approx(row[token_id].item(), abs=1e-4)
        values, best = torch.topk(row, 3)
        assert [t.token for t in item.top_logprobs] == [token_text(engine.tokenizer, i) for i in best.tolist()]
        assert [t.logprob for t in item.top_logprobs] == pytest.approx(values.tolist(), abs=1e-4)
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob)  # greedy: the chosen token is the best
    # Streamed, the chunks' logprobs join to the same list.
    chunks = list(api.chat.completions.create(model=MODEL, messages=user(question), max_tokens=6, temperature=0,
                                              logprobs=True, top_logprobs=3, stream=True))
    streamed = [item for c in chunks if c.choices and c.choices[0].logprobs for item in c.choices[0].logprobs.content]
    assert [(i.token, i.logprob) for i in streamed] == [(i.token, i.logprob) for i in content]
    # Without logprobs, none are given.
    assert api.chat.completions.create(model=MODEL, messages=user(question), max_tokens=2).choices[0].logprobs is None


def test_sampled_logprobs_are_the_models_not_the_temperatures(api, engine, question):
    """Raw logits' log-softmax: a sampled answer's tokens carry what a forward pass gives them, not the numbers
    after temperature and top-p."""
    from glmtune.data.conversation import Conversation, Message
    from glmtune.data.templates import encode_prompt
    from glmtune.inference.logprobs import token_bytes

    answer = api.chat.completions.create(model=MODEL, messages=user(question), max_tokens=6, temperature=1.8,
                                         top_p=0.9, seed=3, logprobs=True)
    by_bytes = {token_bytes(engine.tokenizer, i): i for i in range(len(engine.tokenizer))}
    ids = [by_bytes[bytes(item.bytes)] for item in answer.choices[0].logprobs.content]
    prompt = encode_prompt(engine.tokenizer, Conversation(messages=[Message("user", question)]))
    reference = forward_logprobs(engine, prompt, ids)
    assert [item.logprob for item in answer.choices[0].logprobs.content] == \
        pytest.approx([row[i].item() for row, i in zip(reference, ids, strict=True)], abs=1e-4)
    assert all(item.top_logprobs == [] for item in answer.choices[0].logprobs.content)  # top_logprobs not asked


def test_legacy_completion_logprobs_cover_each_token_with_its_offset(api, engine, question):
    answer = api.completions.create(model=MODEL, prompt=question, max_tokens=6, temperature=0, logprobs=2)
    logprobs = answer.choices[0].logprobs
    prompt = engine.tokenizer(question)["input_ids"]
    ids = greedy_ids(engine, prompt, 6)
    reference = forward_logprobs(engine, prompt, ids)
    assert logprobs.token_logprobs == pytest.approx([row[i].item() for row, i in zip(reference, ids, strict=True)],
                                                    abs=1e-4)
    assert all(len(top) <= 2 for top in logprobs.top_logprobs)
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:k]) for k in range(6)]
    streamed = list(api.completions.create(model=MODEL, prompt=question, max_tokens=6, temperature=0, logprobs=2,
                                           stream=True))
    assert [o for c in streamed if c.choices and c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset] \
        == logprobs.text_offset


def test_top_logprobs_without_logprobs_is_a_400(url, question):
    status, body = post(url, {"model": MODEL, "messages": user(question), "top_logprobs": 2})
    assert status == 400 and body["error"]["param"] == "top_logprobs"


def test_health_answers_200_without_the_key(url):
    status, _, text = get(url, "/health")
    assert status == 200 and json.loads(text) == {"status": "ok"}
    assert get(url, "/v1/models")[0] == 401  # the API itself still needs the key


def metric_values(text: str) -> dict[str, float]:
    """`name{labels} value` lines -> {"name{labels}": value}."""
    values = {}
    for line in text.splitlines():
        match = re.fullmatch(r"([a-z_]+(?:\{[^}]*\})?) (\S+)", line)
        if match:
            values[match[1]] = float(match[2])
    return values


def test_metrics_count_a_known_workload(api, url, question):
    status, content_type, before_text = get(url, "/metrics")
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    before = metric_values(before_text)
    answers = [api.chat.completions.create(model=MODEL, messages=user(question), max_tokens=5, temperature=0),
               api.completions.create(model=MODEL, prompt=question, max_tokens=4, temperature=0)]
    chunks = list(api.chat.completions.create(model=MODEL, messages=user(question), max_tokens=3, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    usages = [a.usage for a in answers] + [chunks[-1].usage]
    assert post(url, {"model": MODEL, "messages": user(question), "temperature": "hot"})[0] == 400
    after = metric_values(get(url, "/metrics")[2])

    def grew(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    chat, text = "/v1/chat/completions", "/v1/completions"
    assert grew(f'glmtune_requests_total{{endpoint="{chat}",status="200"}}') == 2
    assert grew(f'glmtune_requests_total{{endpoint="{text}",status="200"}}') == 1
    assert grew(f'glmtune_requests_total{{endpoint="{chat}",status="400"}}') == 1
    assert grew("glmtune_prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    assert grew("glmtune_generation_tokens_total") == sum(u.completion_tokens for u in usages) == 12
    assert grew("glmtune_time_to_first_token_seconds_count") == 3
    assert grew('glmtune_time_to_first_token_seconds_bucket{le="+Inf"}') == 3
    assert grew("glmtune_time_per_output_token_seconds_count") == 3
    assert grew("glmtune_time_to_first_token_seconds_sum") > 0
    assert (after["glmtune_queue_length"], after["glmtune_batch_size"]) == (0, 0)
