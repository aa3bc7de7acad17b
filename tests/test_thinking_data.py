"""Reasoning and OpenAI tool calls in the data, trained as GLM-4.5+ generates them: every trained turn's ids are the
official GLM-4.6 template's own rendering of the conversation up to that turn (transformers' renderer), and its
supervised span is exactly reasoning + answer (+ call) + the stop token. Templates that write a turn in history
otherwise than it is generated (GLM-4.7's, GLM-Z1's, reproduced by the small templates in conftest.py) train each
turn as their generation prompt followed by what the model generates."""

from __future__ import annotations

import json

import pytest
from conftest import GLM4_0414_LIKE, GLM47_LIKE, Z1_LIKE, write_jsonl

from glmtune.data.formats import read_messages, read_sharegpt
from glmtune.data.templates import IGNORE_INDEX
from glmtune.data.tokenize import TokenizeOptions, process_row

TOOLS = [{"type": "function", "function": {"name": "weather", "description": "Weather in a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}
CALL_TEXT = "\n<tool_call>weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n</tool_call>"

PLAIN = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
                      {"role": "assistant", "content": "Goodbye."}]}
THINKING = {"messages": [
    {"role": "user", "content": "2+2?"}, {"role": "assistant", "reasoning_content": "Two and two.", "content": "4"},
    {"role": "user", "content": "times 3?"}, {"role": "assistant", "reasoning_content": "4*3.", "content": "12"},
    {"role": "user", "content": "minus 2?"}, {"role": "assistant", "reasoning_content": "12-2.", "content": "10"}]}
TOOL_USE = {"tools": TOOLS, "messages": [
    {"role": "system", "content": "You help."}, {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "reasoning_content": "Ask the tool.", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    {"role": "assistant", "reasoning_content": "It said sunny.", "content": "Sunny."},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "<think>Be polite.</think>You're welcome."}]}
# (row, the supervised text of each assistant turn, whether the row is split into one sample per turn)
CASES = {
    "plain": (PLAIN, ["\n<think></think>\nHello.<|user|>", "\n<think></think>\nGoodbye.<|endoftext|>"], False),
    "thinking": (THINKING, ["\n<think>Two and two.</think>\n4<|user|>", "\n<think>4*3.</think>\n12<|user|>",
                            "\n<think>12-2.</think>\n10<|endoftext|>"], True),
    "tools": (TOOL_USE, [f"\n<think>Ask the tool.</think>{CALL_TEXT}<|observation|>",
                         "\n<think>It said sunny.</think>\nSunny.<|user|>",
                         "\n<think>Be polite.</think>\nYou're welcome.<|endoftext|>"], True),
}


@pytest.fixture(scope="module")
def glm45(glm45_tokenizer_dir):
    from transformers import AutoTokenizer

    from glmtune.models.loading import stop_token_ids

    tokenizer = AutoTokenizer.from_pretrained(glm45_tokenizer_dir)
    return tokenizer, stop_token_ids(str(glm45_tokenizer_dir), tokenizer)


def reference_ids(tokenizer, messages, tools, add_generation_prompt=False) -> list[int]:
    """The official template's own rendering, through transformers."""
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True,
                                         add_generation_prompt=add_generation_prompt)["input_ids"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_trained_turn_is_the_templates_own_rendering_up_to_it(glm45, case):
    tokenizer, stops = glm45
    row, spans, split = CASES[case]
    samples = process_row(read_messages(row, need_answer=True), tokenizer, stops, TokenizeOptions(4096))
    assert len(samples) == (len(spans) if split else 1)
    assert samples[0]["split"] == (len(spans) if split else 0) and not any(s["dropped"] for s in samples)
    turns = [j for j, m in enumerate(row["messages"]) if m["role"] == "assistant"]
    for k, (j, span) in enumerate(zip(turns, spans, strict=True)):
        ids, labels = samples[k if split else 0]["input_ids"], samples[k if split else 0]["labels"]
        through = reference_ids(tokenizer, row["messages"][: j + 1], row.get("tools"))
        prompt = reference_ids(tokenizer, row["messages"][:j], row.get("tools"), add_generation_prompt=True)
        end = len(through) + 1  # the stop token after the turn
        assert ids[: len(through)] == through
        assert labels[len(prompt): end] == ids[len(prompt): end]
        assert tokenizer.decode(ids[len(prompt): end]) == span
        if split:  # the sample ends with its turn, and only that turn is trained
            assert len(ids) == end and set(labels[: len(prompt)]) == {IGNORE_INDEX}
    if not split:
        supervised = sum(label != IGNORE_INDEX for label in samples[0]["labels"])
        assert supervised == sum(len(tokenizer.encode(s, add_special_tokens=False)) for s in spans)


def test_a_three_turn_thinking_conversation_keeps_all_three_reasonings(glm45):
    tokenizer, stops = glm45
    samples = process_row(read_messages(THINKING, need_answer=True), tokenizer, stops, TokenizeOptions(4096))
    trained = [tokenizer.decode([i for i, label in zip(s["input_ids"], s["labels"], strict=True)
                                 if label != IGNORE_INDEX]) for s in samples]
    for text, reasoning in zip(trained, ("Two and two.", "4*3.", "12-2."), strict=True):
        assert f"<think>{reasoning}</think>" in text
    # Rendered whole, the template would have dropped the first two (what training it as one sample would teach).
    whole = tokenizer.apply_chat_template(THINKING["messages"], tokenize=False)
    assert "Two and two." not in whole and "4*3." not in whole


def test_last_turn_only_trains_one_sample_without_splitting(glm45):
    tokenizer, stops = glm45
    samples = process_row(read_messages(THINKING, need_answer=True), tokenizer, stops,
                          TokenizeOptions(4096, last_turn_only=True))
    assert len(samples) == 1 and samples[0]["split"] == 0
    trained = [i for i, label in zip(samples[0]["input_ids"], samples[0]["labels"], strict=True)
               if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "\n<think>12-2.</think>\n10<|endoftext|>"


def test_think_blocks_sharegpt_and_string_arguments_read_as_openai_fields(glm45):
    tokenizer, stops = glm45
    sharegpt = {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "<think>Two and two."
                                                                       "</think>\n\n4"},
                                  {"from": "human", "value": "times 3?"}, {"from": "gpt", "value": "12"}]}
    conversation = read_sharegpt(sharegpt, need_answer=True)
    assert (conversation.messages[1].reasoning, conversation.messages[1].content) == ("Two and two.", "4")
    as_messages = {"messages": [{"role": "user", "content": "2+2?"},
                                {"role": "assistant", "content": "4", "reasoning_content": "Two and two."},
                                {"role": "user", "content": "times 3?"}, {"role": "assistant", "content": "12"}]}
    encode = lambda c: process_row(c, tokenizer, stops, TokenizeOptions(4096))  # noqa: E731
    assert encode(conversation) == encode(read_messages(as_messages, need_answer=True))

    as_string = json.loads(json.dumps(TOOL_USE))
    as_string["messages"][2]["tool_calls"][0]["function"]["arguments"] = json.dumps({"city": "Paris"})
    assert encode(read_messages(as_string, need_answer=True)) == encode(read_messages(TOOL_USE, need_answer=True))


def test_prepare_reports_split_rows_and_shows_the_reasoning(cli, tmp_path, glm45_tokenizer_dir):
    data = write_jsonl(tmp_path / "data.jsonl", [THINKING, PLAIN])
    result = cli("prepare", "--model", glm45_tokenizer_dir, "--data", data, "--dry_run", "true")
    assert result.code == 0, result.err
    assert "split by turn:     1 rows into 3 samples" in result.out
    assert "rows kept:         4" in result.out
    assert "⟦\n<think>Two and two.</think>\n4<|user|>⟧" in result.out


def test_enable_thinking_false_renders_nothink_and_enters_the_cache_key(cli, tmp_path, glm45_tokenizer_dir):
    data = write_jsonl(tmp_path / "data.jsonl", [PLAIN])
    base = ("prepare", "--model", glm45_tokenizer_dir, "--data", data, "--dry_run", "true")
    thinking = cli(*base)
    off = cli(*base, "--enable_thinking", "false")
    assert thinking.code == off.code == 0, off.err
    assert "reused from the cache" not in off.out  # another key than the run before
    # The generation prompt with thinking off already holds the empty think block: the answer follows it.
    assert "Hi/nothink<|assistant|>\n<think></think>⟦\nHello.<|user|>⟧" in off.out
    assert "/nothink" not in thinking.out


def test_reasoning_with_thinking_off_is_refused_with_its_rows(cli, tmp_path, glm45_tokenizer_dir):
    data = write_jsonl(tmp_path / "data.jsonl", [PLAIN, THINKING])
    result = cli("prepare", "--model", glm45_tokenizer_dir, "--data", data, "--dry_run", "true",
                 "--enable_thinking", "false")
    assert result.code == 2
    assert "--enable_thinking false" in result.err and "data.jsonl:2: an assistant turn carries reasoning" in result.err


def test_reasoning_in_a_template_without_a_place_for_it_is_refused(cli, tmp_path, shared_dir):
    data = write_jsonl(tmp_path / "data.jsonl", [PLAIN, THINKING])
    result = cli("prepare", "--model", shared_dir / "tokenizers" / "chatglm3-6b", "--data", data, "--dry_run", "true")
    assert result.code == 2
    assert "has no place for reasoning" in result.err
    assert "data.jsonl:2: an assistant turn carries reasoning" in result.err and "data.jsonl:1" not in result.err


@pytest.mark.parametrize("arguments", ["[1, 2]", "city=Paris", 3])
def test_tool_call_arguments_that_are_not_an_object_are_refused(cli, tmp_path, tiny_model, arguments):
    row = json.loads(json.dumps(TOOL_USE))
    row["messages"][2]["tool_calls"][0]["function"]["arguments"] = arguments
    data = write_jsonl(tmp_path / "data.jsonl", [PLAIN, row])
    result = cli("prepare", "--model", tiny_model, "--data", data, "--dry_run", "true")
    assert result.code == 2
    assert "data.jsonl:2: field 'messages[2].tool_calls[0].function.arguments': expected a JSON object" in result.err


def test_reasoning_on_a_user_message_is_refused(cli, tmp_path, tiny_model):
    row = {"messages": [{"role": "user", "content": "Hi", "reasoning_content": "hmm"},
                        {"role": "assistant", "content": "Hello."}]}
    data = write_jsonl(tmp_path / "data.jsonl", [PLAIN, row])
    result = cli("prepare", "--model", tiny_model, "--data", data, "--dry_run", "true")
    assert result.code == 2
    assert "data.jsonl:2: field 'messages[0].reasoning_content': expected reasoning only on assistant messages" \
        in result.err


def test_glm45_stops_on_its_three_tokens_and_its_template_says_it_thinks(glm45, glm45_tokenizer_dir):
    from glmtune.data.templates import has_thinking_switch, reasoning_form
    from glmtune.models.families import GLM4, GLM4_MOE, family_of_source

    tokenizer, stops = glm45
    assert family_of_source(str(glm45_tokenizer_dir)) is GLM4_MOE
    assert tokenizer.convert_ids_to_tokens(stops) == ["<|endoftext|>", "<|user|>", "<|observation|>"]
    for family in (GLM4, GLM4_MOE):  # named by the entry too, for a generation config that lists fewer
        assert set(family.end_of_turn) == {"<|endoftext|>", "<|user|>", "<|observation|>"}
    # Thinking is the template's to say, not the entry's (GLM-4-0414 shares glm4 with the thinking GLM-Z1).
    assert has_thinking_switch(tokenizer) and reasoning_form(tokenizer.chat_template) == "field"
    assert reasoning_form("{{ messages[0]['content'] }}") is None


NO_REASONING = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                             {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}]}
# What each template's model generates after its prompt, for a reasoning (None: the row has none) and an answer.
GENERATES = {
    "GLM-4.7": (GLM47_LIKE, None, lambda reasoning, answer: f"{reasoning or ''}</think>{answer}"),
    "GLM-4.7 thinking off": (GLM47_LIKE, False, lambda reasoning, answer: answer),
    "GLM-Z1": (Z1_LIKE, None, lambda reasoning, answer: f"\n{reasoning or ''}\n</think>\n\n{answer}"),
}
# (template, row, whether the row is split into one sample per turn)
GENERATED_CASES = {
    "GLM-4.7 without reasoning": ("GLM-4.7", NO_REASONING, True),  # history writes `</think>` where `<think>` opened
    "GLM-4.7 with reasoning": ("GLM-4.7", THINKING, False),  # history writes each turn as generated
    "GLM-4.7 thinking off": ("GLM-4.7 thinking off", NO_REASONING, False),
    "GLM-Z1 without reasoning": ("GLM-Z1", NO_REASONING, True),
    "GLM-Z1 with reasoning": ("GLM-Z1", THINKING, True),
}


def with_template(tokenizer, template: str):
    import copy

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = template
    return tokenizer


@pytest.mark.parametrize("case", sorted(GENERATED_CASES))
def test_each_turn_trains_as_the_generation_prompt_then_what_the_model_generates(glm45, case):
    name, row, split = GENERATED_CASES[case]
    template, enable_thinking, generates = GENERATES[name]
    tokenizer, stops = glm45
    tokenizer = with_template(tokenizer, template)
    samples = process_row(read_messages(row, need_answer=True), tokenizer, stops,
                          TokenizeOptions(4096, enable_thinking=enable_thinking))
    turns = [j for j, m in enumerate(row["messages"]) if m["role"] == "assistant"]
    assert len(samples) == (len(turns) if split else 1) and not any(s["dropped"] for s in samples)
    for k, j in enumerate(turns):
        ids, labels = samples[k if split else 0]["input_ids"], samples[k if split else 0]["labels"]
        switch = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
        prompt = tokenizer.apply_chat_template(row["messages"][:j], add_generation_prompt=True, tokenize=True,
                                               return_dict=True, **switch)["input_ids"]
        message = row["messages"][j]
        stop = "<|endoftext|>" if j + 1 == len(row["messages"]) else "<|user|>"
        generated = tokenizer.encode(generates(message.get("reasoning_content"), message["content"]) + stop,
                                     add_special_tokens=False)
        end = len(prompt) + len(generated)
        assert ids[:end] == prompt + generated
        assert labels[len(prompt): end] == generated
        if split:  # the sample is its turn's prompt and generation, that turn alone trained
            assert len(ids) == end and set(labels[: len(prompt)]) == {IGNORE_INDEX}
    if not split:
        assert sum(label != IGNORE_INDEX for label in samples[0]["labels"]) == sum(
            len(tokenizer.encode(generates(m.get("reasoning_content"), m["content"]), add_special_tokens=False)) + 1
            for m in row["messages"] if m["role"] == "assistant")


@pytest.mark.parametrize("name", ["GLM-4.7", "GLM-Z1"])
def test_a_three_turn_conversation_keeps_every_reasoning_with_templates_that_open_the_think_block(glm45, name):
    template, _, generates = GENERATES[name]
    tokenizer, stops = glm45
    tokenizer = with_template(tokenizer, template)
    samples = process_row(read_messages(THINKING, need_answer=True), tokenizer, stops, TokenizeOptions(4096))
    trained = "".join(tokenizer.decode([i for i, label in zip(s["input_ids"], s["labels"], strict=True)
                                        if label != IGNORE_INDEX]) for s in samples)
    stops_after = ["<|user|>", "<|user|>", "<|endoftext|>"]
    answers = [m for m in THINKING["messages"] if m["role"] == "assistant"]
    assert trained == "".join(generates(m["reasoning_content"], m["content"]) + stop
                              for m, stop in zip(answers, stops_after, strict=True))


def test_a_z1_call_turn_trains_as_generated_and_reads_back_as_reasoning_and_call(glm45):
    from glmtune.data.templates import encode_prompt
    from glmtune.inference.engine import answer_parser

    tokenizer, stops = glm45
    tokenizer = with_template(tokenizer, Z1_LIKE)
    conversation = read_messages(TOOL_USE, need_answer=True)
    samples = process_row(conversation, tokenizer, stops, TokenizeOptions(4096))
    assert len(samples) == 3
    ids, labels = samples[0]["input_ids"], samples[0]["labels"]
    prompt = encode_prompt(tokenizer, conversation.upto(1))  # the question before the call
    trained = tokenizer.decode(ids[len(prompt):])
    assert ids[: len(prompt)] == prompt and labels[len(prompt):] == ids[len(prompt):]
    assert trained == '\nAsk the tool.\n</think>\n\nweather\n{"city": "Paris"}<|observation|>'
    # What training teaches, inference reads back: the reasoning and the call.
    parts = answer_parser(tokenizer, prompt, conversation.tools).parse(trained.removesuffix("<|observation|>"))
    assert parts.reasoning == "Ask the tool." and parts.content == ""
    assert [(c.name, json.loads(c.arguments)) for c in parts.tool_calls] == [("weather", {"city": "Paris"})]


def tokenizer_with(source, destination, template: str):
    import shutil

    shutil.copytree(source, destination)
    (destination / "chat_template.jinja").write_text(template, encoding="utf-8")
    return destination


def test_prepare_trains_glm_z1s_reasoning_as_generated(cli, tmp_path, glm45_tokenizer_dir):
    model = tokenizer_with(glm45_tokenizer_dir, tmp_path / "z1", Z1_LIKE)
    data = write_jsonl(tmp_path / "data.jsonl", [THINKING, NO_REASONING])
    result = cli("prepare", "--model", model, "--data", data, "--dry_run", "true")
    assert result.code == 0, result.err
    assert "split by turn:     2 rows into 5 samples" in result.out
    assert "<|assistant|>\n<think>⟦\nTwo and two.\n</think>\n\n4<|user|>⟧" in result.out


def test_reasoning_for_glm_4_0414s_template_is_refused_with_its_rows(cli, tmp_path, glm45_tokenizer_dir):
    model = tokenizer_with(glm45_tokenizer_dir, tmp_path / "glm-4-0414", GLM4_0414_LIKE)
    data = write_jsonl(tmp_path / "data.jsonl", [NO_REASONING, THINKING])
    result = cli("prepare", "--model", model, "--data", data, "--dry_run", "true")
    assert result.code == 2
    assert "has no place for reasoning" in result.err
    assert "data.jsonl:2: an assistant turn carries reasoning" in result.err and "data.jsonl:1" not in result.err
    # Its rows without reasoning train as before, as one sample.
    assert cli("prepare", "--model", model, "--data", write_jsonl(tmp_path / "plain.jsonl", [NO_REASONING]),
               "--dry_run", "true").code == 0
