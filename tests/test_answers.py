"""Generated answers split into reasoning, text and tool calls: each model family's call form, malformed calls kept
as text, streaming cut at every character boundary giving what the whole answer gives, and decoding that keeps
the markers when they are special tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import GLM47_LIKE, Z1_LIKE

from glmtune.inference.answers import AnswerParser
from glmtune.inference.tool_calls import tool_call_form

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "templates" / "glm-4.6.jinja"
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"}, "days": {"type": "integer"},
                                                "units": {"type": "object"}}}}}
MARKERS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>",
           "</arg_value>"]

GLM45_CALL = ("\n<think>The user wants the weather.\nCall the tool.</think>\nLet me check.\n<tool_call>get_weather\n"
              "<arg_key>city</arg_key>\n<arg_value>42</arg_value>\n<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n"
              "<arg_key>units</arg_key>\n<arg_value>{\"t\": \"C\"}</arg_value>\n</tool_call>")
# (parser, raw answer, expected content, reasoning, calls as (name, arguments))
CASES = {
    "GLM-4.5 reasoning, text and an XML call": (
        AnswerParser("tagged", [WEATHER]), GLM45_CALL, "Let me check.", "The user wants the weather.\nCall the tool.",
        [("get_weather", {"city": "42", "days": 3, "units": {"t": "C"}})]),
    "GLM-4.5 two calls, values JSON else text": (
        AnswerParser("tagged"), "<tool_call>a\n<arg_key>x</arg_key>\n<arg_value>[1, 2]</arg_value>\n</tool_call>\n"
        "<tool_call>b\n<arg_key>y</arg_key>\n<arg_value>two words</arg_value>\n</tool_call>", "", None,
        [("a", {"x": [1, 2]}), ("b", {"y": "two words"})]),
    "GLM-4.5 a call without arguments": (AnswerParser("tagged"), "<tool_call>now\n</tool_call>", "", None,
                                         [("now", {})]),
    "GLM-4.5 thinking off": (AnswerParser("tagged"), "\nParis is sunny.", "Paris is sunny.", None, []),
    "an empty think block is no reasoning": (AnswerParser("tagged"), "<think></think>\nHi", "Hi", None, []),
    "a think block cut by the budget": (AnswerParser("tagged"), "<think>still thinking", "", "still thinking", []),
    "a prompt that opened the think block": (AnswerParser(in_reasoning=True), "hmm\n</think>\n\nYes", "Yes", "hmm", []),
    "Hermes JSON in the tags": (AnswerParser("tagged"),
                                '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>', "", None,
                                [("f", {"a": 1})]),
    "GLM-4 NAME and JSON": (AnswerParser("name_line", [WEATHER]), 'get_weather\n{"city": "Paris", "days": 2}', "",
                            None, [("get_weather", {"city": "Paris", "days": 2})]),
    "ChatGLM3 NAME and tool_call(...)": (
        AnswerParser("name_line", [WEATHER]), "get_weather\n ```python\ntool_call(city='Paris', days=2)\n```", "", None,
        [("get_weather", {"city": "Paris", "days": 2})]),
    "GLM-4 plain answer": (AnswerParser("name_line", [WEATHER]), "\nIt is sunny.", "It is sunny.", None, []),
    "GLM-4 answer that starts like a tool's name": (AnswerParser("name_line", [WEATHER]), "get_weather is a tool\nyes",
                                                    "get_weather is a tool\nyes", None, []),
    "GLM-4 a call to a tool not offered is text": (AnswerParser("name_line", [WEATHER]), 'delete_all\n{"x": 1}',
                                                    'delete_all\n{"x": 1}', None, []),
    "no tool form: tags are text": (AnswerParser("none"), "<tool_call>f\n</tool_call>", "<tool_call>f\n</tool_call>",
                                    None, []),
    "GLM-4.7 a call without newlines, after the think block its prompt opened": (
        AnswerParser("tagged", [WEATHER], in_reasoning=True),
        "The user wants Paris.</think>Let me check.<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris"
        "</arg_value><arg_key>days</arg_key><arg_value>2</arg_value></tool_call>", "Let me check.",
        "The user wants Paris.", [("get_weather", {"city": "Paris", "days": 2})]),
    "GLM-Z1 reasoning, then NAME and JSON": (
        AnswerParser("name_line", [WEATHER], in_reasoning=True),
        'Paris, so ask.</think>\nget_weather\n{"city": "Paris"}', "", "Paris, so ask.",
        [("get_weather", {"city": "Paris"})]),
    "GLM-4 two calls, one per <|assistant|> segment": (
        AnswerParser("name_line", [WEATHER]),
        'get_weather\n{"city": "Paris"}<|assistant|>get_weather\n{"city": "Rome"}', "", None,
        [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]),
    "GLM-4 a malformed segment is text, the next call still a call": (
        AnswerParser("name_line", [WEATHER]), 'get_weather\n{oops}<|assistant|>get_weather\n{"city": "Rome"}',
        "get_weather\n{oops}", None, [("get_weather", {"city": "Rome"})]),
    "ChatGLM3 text, then a call in a second segment": (
        AnswerParser("name_line", [WEATHER]),
        "\nLet me check.<|assistant|>get_weather\n ```python\ntool_call(city='Paris')\n```", "Let me check.", None,
        [("get_weather", {"city": "Paris"})]),
    "ChatGLM3 every text segment is kept": (AnswerParser("name_line", [WEATHER]), "\nFirst.<|assistant|>\nSecond.",
                                            "First.\nSecond.", None, []),
}
MALFORMED = {
    "XML with text between the pairs": "<tool_call>f\n<arg_key>a</arg_key>junk<arg_value>1</arg_value></tool_call>",
    "XML with no name": "<tool_call>\n<arg_key>a</arg_key><arg_value>1</arg_value></tool_call>",
    "XML never closed": "<tool_call>f\n<arg_key>a</arg_key>",
    "Hermes that is not JSON": '<tool_call>{"name": "f", </tool_call>',
    "GLM-4 arguments that are not JSON": "get_weather\n{city: Paris}",
    "ChatGLM3 code that is not a call": "get_weather\n```python\nimport os\n```",
    "ChatGLM3 code that is not literal": "get_weather\n```python\ntool_call(city=open('x'))\n```",
}


def calls(parts) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in parts.tool_calls]


@pytest.mark.parametrize("case", CASES)
def test_each_form_splits_into_reasoning_text_and_calls(case):
    parser, raw, content, reasoning, expected = CASES[case]
    parts = parser.parse(raw)
    assert (parts.content, parts.reasoning, calls(parts)) == (content, reasoning, expected)
    assert all(c.id.startswith("call_") and len(c.id) > 10 for c in parts.tool_calls)
    assert len({c.id for c in parts.tool_calls}) == len(parts.tool_calls)


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_call_is_returned_as_text(case):
    raw = MALFORMED[case]
    form = "tagged" if raw.startswith("<") else "name_line"
    parts = AnswerParser(form, [WEATHER]).parse(raw)
    assert parts.tool_calls == [] and parts.content == raw.strip()


@pytest.mark.parametrize("case", [*CASES, *MALFORMED])
def test_streaming_split_at_any_point_gives_the_whole_answers_parts(case):
    parser, raw = (CASES[case][:2]) if case in CASES else (AnswerParser("tagged" if MALFORMED[case].startswith("<")
                                                                          else "name_line", [WEATHER]), MALFORMED[case])
    whole = parser.parse(raw)
    for cuts in [(i,) for i in range(len(raw) + 1)] + [tuple(range(len(raw)))]:  # one cut anywhere; every character
        splitter = parser.splitter()
        pieces = [raw[a:b] for a, b in zip((0, *cuts), (*cuts, len(raw)), strict=True)]
        deltas = [d for piece in pieces for d in splitter.feed(piece)] + splitter.finish()
        assert "".join(d.content for d in deltas) == whole.content, cuts
        assert ("".join(d.reasoning for d in deltas) or None) == whole.reasoning, cuts
        assert [(c.name, c.arguments) for c in (d.tool_call for d in deltas) if c] == \
               [(c.name, c.arguments) for c in whole.tool_calls], cuts
        for d in deltas:
            assert sum(map(bool, (d.reasoning, d.content, d.tool_call))) == 1
            if whole.tool_calls or whole.reasoning:  # a marker the answer resolved never leaks, not even in part
                assert not any(m in d.content for m in ("<think>", "</think>", "<tool_call>"))


def test_a_partial_marker_is_held_until_resolved():
    splitter = AnswerParser("tagged").splitter()
    assert [d.content for d in splitter.feed("Sure. <tool")] == ["Sure."]
    assert splitter.feed("_call>f\n<arg_key>a</arg_key><arg_value>1") == []
    (call,) = splitter.feed("</arg_value></tool_call>")
    assert (call.tool_call.name, call.tool_call.arguments) == ("f", '{"a": 1}')
    splitter = AnswerParser("tagged").splitter()
    assert splitter.feed("<thi") == []
    assert [d.reasoning for d in splitter.feed("nk>why</thi")] == ["why"]
    assert [d.content for d in splitter.feed("nk>so")] == ["so"]


def test_the_call_form_comes_from_the_chat_template(shared_dir):
    from glmtune.models.chatglm.sp_tokenizer import CHATGLM3_TEMPLATE

    glm4 = json.loads((shared_dir / "tokenizers" / "glm-4-9b-chat" / "tokenizer_config.json").read_text())
    assert tool_call_form((shared_dir / "templates" / "glm-4.6.jinja").read_text()) == "tagged"
    assert tool_call_form(glm4["chat_template"]) == "name_line"
    assert tool_call_form(CHATGLM3_TEMPLATE) == "name_line"
    assert tool_call_form("{% for m in messages %}{{ m['content'] }}{% endfor %}") == "none"


@pytest.fixture(scope="module")
def glm45_tokenizer(tiny_model):
    """The tiny tokenizer made GLM-4.5-like: the official GLM-4.6 template, its markers as special tokens."""
    if not REFERENCE.is_file():
        pytest.skip(f"{REFERENCE} is absent (../shared)")
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.add_tokens([AddedToken(m, special=True, normalized=False) for m in MARKERS])
    tokenizer.chat_template = REFERENCE.read_text(encoding="utf-8")
    return tokenizer


class ScriptedModel:
    """Stands in for a model: `generate` answers every prompt with the same ids (streamed when asked), then stop."""

    def __init__(self, answer_ids: list[int], stop_id: int):
        import torch

        self.answer, self.stop, self.device = answer_ids, stop_id, torch.device("cpu")
        self.prompts: list[list[int]] = []

    def generate(self, input_ids, attention_mask, generation_config, streamer=None, **kwargs):
        import torch

        self.prompts += [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask, strict=True)]
        new = torch.tensor([[*self.answer, self.stop]] * input_ids.shape[0])
        if streamer is not None:
            streamer.put(input_ids)
            for token in new[0]:
                streamer.put(token.reshape(1))
            streamer.end()
        return torch.cat([input_ids, new], dim=1)


def test_special_token_markers_survive_decoding_batched_and_streamed(glm45_tokenizer):
    from glmtune.data.conversation import Conversation, Message
    from glmtune.data.templates import encode_prompt
    from glmtune.inference.engine import GenerationSettings, answer_parser, generate_batched
    from glmtune.inference.streaming import TextStream

    tokenizer = glm45_tokenizer
    ids = tokenizer.encode(GLM45_CALL, add_special_tokens=False)
    assert tokenizer.convert_tokens_to_ids("<tool_call>") in ids
    assert "<tool_call>" not in tokenizer.decode(ids, skip_special_tokens=True)  # what plain decoding would lose
    stop = tokenizer.convert_tokens_to_ids("<|observation|>")
    conversation = Conversation(messages=[Message("user", "Weather in Paris?")], tools=[WEATHER])
    prompt = encode_prompt(tokenizer, conversation)
    parser = answer_parser(tokenizer, prompt, conversation.tools)
    (batched,) = generate_batched(ScriptedModel(ids, stop), tokenizer, [stop], [prompt], [512],
                                  GenerationSettings(max_new_tokens=512), progress=False, parsers=[parser])
    assert (batched.text, batched.reasoning) == ("Let me check.", "The user wants the weather.\nCall the tool.")
    assert [(c.name, json.loads(c.arguments)) for c in batched.tool_calls] == CASES[next(iter(CASES))][4]
    assert batched.finish_reason == "tool_calls" and batched.completion_tokens == len(ids) + 1

    import torch
    from transformers import GenerationConfig

    stream = TextStream(ScriptedModel(ids, stop), tokenizer, torch.tensor([prompt]), torch.ones(1, len(prompt)),
                        GenerationConfig(max_new_tokens=512), [stop], parser)
    deltas = list(stream.deltas())
    assert "".join(d.content for d in deltas) == "Let me check."
    assert "".join(d.reasoning for d in deltas) == batched.reasoning
    assert [d.tool_call.arguments for d in deltas if d.tool_call] == [batched.tool_calls[0].arguments]
    assert stream.completion.finish_reason == "tool_calls" and stream.completion.text == "Let me check."


def test_an_answer_without_markers_decodes_as_before(tokenizer):
    from glmtune.inference.decoding import AnswerDecoder

    ids = tokenizer.encode("[gMASK]<sop>hello world<|user|>", add_special_tokens=False)
    assert AnswerDecoder(tokenizer).decode(ids) == tokenizer.decode(ids, skip_special_tokens=True)


PARIS_CALL = [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call_1"}]


def _with_template(tokenizer, template: str):
    import copy

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = template
    return tokenizer


def _called_then_asked(tools: list[dict]):
    from glmtune.data.conversation import Conversation, Message

    return Conversation(messages=[Message("user", "Weather in Paris?"), Message("assistant", "", tool_call=PARIS_CALL),
                                  Message("observation", "sunny", tool_call_id="call_1"), Message("user", "And now?")],
                        tools=tools)


def test_glm_z1s_calls_are_rendered_and_read_in_its_metadata_form(glm45_tokenizer):
    from glmtune.data.templates import encode_prompt, render
    from glmtune.inference.engine import answer_parser

    tokenizer = _with_template(glm45_tokenizer, Z1_LIKE)
    assert tool_call_form(Z1_LIKE) == "name_line"
    conversation = _called_then_asked([WEATHER])
    text = render(tokenizer, conversation, add_generation_prompt=True)
    assert '<|assistant|>get_weather\n{"city": "Paris"}<|observation|>\nsunny<|user|>' in text
    parser = answer_parser(tokenizer, encode_prompt(tokenizer, conversation), conversation.tools)
    assert (parser.form, parser.in_reasoning) == ("name_line", True)
    # What the template writes for a call in history is what the model generates: it reads back as the call.
    history_call = text.split("<|assistant|>")[1].split("<|observation|>")[0]
    (call,) = parser.parse("Ask the tool.</think>" + history_call).tool_calls
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Paris"})


def test_glm47s_calls_without_newlines_and_the_think_block_its_prompt_opens(glm45_tokenizer):
    from glmtune.data.templates import encode_prompt, render
    from glmtune.inference.engine import answer_parser

    tokenizer = _with_template(glm45_tokenizer, GLM47_LIKE)
    conversation = _called_then_asked([WEATHER])
    text = render(tokenizer, conversation, add_generation_prompt=True)
    call_text = "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value></tool_call>"
    assert f"<|assistant|></think>{call_text}<|observation|>" in text and text.endswith("<|assistant|><think>")
    parser = answer_parser(tokenizer, encode_prompt(tokenizer, conversation), conversation.tools)
    assert (parser.form, parser.in_reasoning) == ("tagged", True)
    parts = parser.parse("Paris again.</think>" + call_text)
    assert parts.reasoning == "Paris again." and parts.content == ""
    assert [(c.name, json.loads(c.arguments)) for c in parts.tool_calls] == [("get_weather", {"city": "Paris"})]
    off = answer_parser(tokenizer, encode_prompt(tokenizer, conversation, enable_thinking=False), conversation.tools)
    assert not off.in_reasoning and off.parse("Still sunny.").content == "Still sunny."


def test_assistant_segments_survive_decoding_and_split_into_calls(tokenizer):
    from glmtune.inference.decoding import AnswerDecoder

    raw = 'get_weather\n{"city": "Paris"}<|assistant|>get_weather\n{"city": "Rome"}'
    ids = tokenizer.encode(raw + "<|observation|>", add_special_tokens=False)
    assert tokenizer.convert_tokens_to_ids("<|assistant|>") in ids
    text = AnswerDecoder(tokenizer).decode(ids)
    assert "<|assistant|>" in text and "<|observation|>" not in text
    parts = AnswerParser("name_line", [WEATHER]).parse(text)
    assert [json.loads(c.arguments)["city"] for c in parts.tool_calls] == ["Paris", "Rome"] and parts.content == ""


def test_a_streamed_answers_completion_holds_the_calls_it_streamed(glm45_tokenizer):
    import torch
    from transformers import GenerationConfig

    from glmtune.inference.streaming import TextStream

    tokenizer = glm45_tokenizer
    ids = tokenizer.encode(GLM45_CALL, add_special_tokens=False)
    stop = tokenizer.convert_tokens_to_ids("<|observation|>")
    prompt = tokenizer.encode("[gMASK]<sop><|user|>\nWeather?<|assistant|>", add_special_tokens=False)
    stream = TextStream(ScriptedModel(ids, stop), tokenizer, torch.tensor([prompt]), torch.ones(1, len(prompt)),
                        GenerationConfig(max_new_tokens=512), [stop], AnswerParser("tagged", [WEATHER]))
    streamed = [d.tool_call for d in stream.deltas() if d.tool_call]
    assert [c.id for c in stream.completion.tool_calls] == [c.id for c in streamed] and len(streamed) == 1
    assert stream.completion.completion_tokens == len(ids) + 1
