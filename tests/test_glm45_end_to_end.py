"""GLM-4.5 from data to the API: a tiny glm4_moe with GLM-4.5's tokenizer and the official GLM-4.6 template, tuned
(expert LoRA) on thinking and tool-call rows, answers them again; serve hands the reasoning back as
`reasoning_content` and the call as `tool_calls`, to the official openai client, streamed and not."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from conftest import write_json

from glmtune.serve.background import running

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
QUESTION, REASONING, ANSWER = "What is 2+2?", "Two plus two makes four.", "It is 4."
ROWS = [
    {"messages": [{"role": "user", "content": QUESTION},
                  {"role": "assistant", "reasoning_content": REASONING, "content": ANSWER}]},
    {"tools": [WEATHER],
     "messages": [{"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "content": "", "tool_calls": [
                      {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}]},
]
MODEL = "glm45-tiny"


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, glm45_tokenizer_dir):
    from glmtune.cli import main
    from glmtune.models.tiny_moe import build_tiny_glm4_moe

    tmp = tmp_path_factory.mktemp("glm45")
    model = build_tiny_glm4_moe(tmp / "model", glm45_tokenizer_dir, hidden_size=64, num_layers=2, experts=4)
    data = write_json(tmp / "rows.json", ROWS * 4)
    assert main(["prepare", "--data", str(data), "--save_path", str(tmp / "data"), "--model", str(model),
                 "--quiet"]) == 0
    assert main(["train", "--dataset_path", str(tmp / "data"), "--output_dir", str(tmp / "run"), "--max_steps", "60",
                 "--per_device_train_batch_size", "8", "--learning_rate", "1e-2", "--lora_rank", "16",
                 "--lr_scheduler_type", "constant", "--precision", "fp32", "--save_strategy", "no",
                 "--quiet"]) == 0
    return tmp / "run"


@pytest.fixture(scope="module")
def api(tuned) -> Iterator:
    from openai import OpenAI

    from glmtune.inference.engine import Engine
    from glmtune.serve.app import create_app

    with running(create_app(Engine(None, str(tuned)), MODEL)) as base:
        yield OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)


def test_the_tuned_model_answers_with_its_reasoning_apart(api):
    reply = api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}],
                                        temperature=0, max_tokens=40)
    message = reply.choices[0].message
    assert (message.reasoning_content, message.content) == (REASONING, ANSWER)
    assert reply.choices[0].finish_reason == "stop"

    stream = api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}],
                                         temperature=0, max_tokens=40, stream=True)
    deltas = [chunk.choices[0].delta for chunk in stream if chunk.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == REASONING
    assert "".join(d.content or "" for d in deltas) == ANSWER


def test_the_tuned_model_calls_its_tool_as_tool_calls(api):
    for stream in (False, True):
        reply = api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}],
                                            tools=[WEATHER], temperature=0, max_tokens=40, stream=stream)
        if stream:
            chunks = [chunk.choices[0] for chunk in reply if chunk.choices]
            calls = [call for c in chunks for call in (c.delta.tool_calls or [])]
            finish = [c.finish_reason for c in chunks if c.finish_reason][-1]
        else:
            calls, finish = reply.choices[0].message.tool_calls, reply.choices[0].finish_reason
        assert finish == "tool_calls", stream
        assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == \
            [("get_weather", {"city": "Paris"})], stream
        assert all(c.id and c.type == "function" for c in calls)
