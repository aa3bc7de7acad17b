"""ChatGLM2-6B's and ChatGLM3-6B's tokenizers, rebuilt without remote code from their SentencePiece model,
against what the official tokenizers produced (../shared/fixtures/chatglm/{v2,v3}/tokenizer_golden.json)."""

from __future__ import annotations

import json

import pytest

from glmtune.data.conversation import Conversation, Message
from glmtune.data.templates import IGNORE_INDEX, encode_for_training, encode_prompt

FAMILIES = {"v2": "chatglm2-6b", "v3": "chatglm3-6b"}
QUERY = "写一首关于春天的短诗\nThen translate it to English."


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, shared_dir):
    from glmtune.models.loading import load_tokenizer, stop_token_ids

    directory = shared_dir / "tokenizers" / FAMILIES[request.param]
    tokenizer = load_tokenizer(str(directory))
    golden = json.loads((shared_dir / f"fixtures/chatglm/{request.param}/tokenizer_golden.json").read_text())
    return request.param, tokenizer, golden, stop_token_ids(str(directory), tokenizer)


def history(shared_dir, system: bool = False) -> list[dict[str, str]]:
    chat = json.loads((shared_dir / "fixtures/chatglm/v3/tokenizer_golden.json").read_text())["chat"]
    turns = chat["with_system"]["history"] if system else chat["history"]
    return [{"role": m["role"], "content": m["content"]} for m in turns] + [{"role": "user", "content": QUERY}]


def test_vocabulary_size_and_special_ids(family):
    _, tokenizer, golden, _ = family
    assert len(tokenizer) == golden["len_tokenizer"]
    ids = golden["special_token_ids"]
    assert tokenizer.convert_tokens_to_ids(["[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>"]) == [
        ids["[MASK]"], ids["[gMASK]"], ids["[sMASK]"], ids["sop"], ids["eop"]]
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (ids["<eos>"], ids["<pad>"])


def test_encode_and_decode_give_the_official_results(family):
    """Every golden string, those holding special-token text ("[gMASK]<sop>hello", "<|user|>", "</s>") included:
    the official tokenizers encode that text as ordinary pieces, and so does a plain encode here."""
    _, tokenizer, golden, _ = family
    assert any("<|user|>" in case["text"] for case in golden["strings"])
    for case in golden["strings"]:
        assert tokenizer.encode(case["text"]) == case["ids"], case["text"]  # [gMASK] sop prepended
        assert tokenizer.encode(case["text"], add_special_tokens=False) == case["ids_no_special"], case["text"]
        assert tokenizer(case["text"])["input_ids"] == case["ids"], case["text"]
        assert tokenizer.decode(case["ids_no_special"]) == case["decode_ids_no_special"], case["text"]


def test_saved_tokenizer_reloads_with_the_same_encodes(family, shared_dir, tmp_path):
    """save_pretrained (as merge and convert write it), then glmtune's load_tokenizer: the official plain encode
    and the chat template's markup as control tokens, as before saving. transformers alone loads the same files as
    its generic tokenizer: the same chat ids, and special-token text in a plain encode parsed as those tokens."""
    from transformers import AutoTokenizer

    from glmtune.models.loading import load_tokenizer

    name, tokenizer, golden, _ = family
    tokenizer.save_pretrained(tmp_path)
    reloaded, generic = load_tokenizer(str(tmp_path)), AutoTokenizer.from_pretrained(tmp_path)
    messages = history(shared_dir)
    for other in (reloaded, generic):
        assert list(other.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)) == golden[
            "chat"]["input_ids"]
    for case in golden["strings"]:
        assert reloaded.encode(case["text"]) == case["ids"], case["text"]
    assert type(reloaded) is type(tokenizer) and type(generic) is not type(tokenizer)
    gmask, sop = tokenizer.convert_tokens_to_ids(["[gMASK]", "<sop>"])
    assert generic.encode("[gMASK]<sop>x", add_special_tokens=False)[:2] == [gmask, sop]


def test_chat_template_gives_the_official_prompt_ids(family, shared_dir):
    name, tokenizer, golden, _ = family
    ids = tokenizer.apply_chat_template(history(shared_dir), add_generation_prompt=True, return_dict=False)
    assert list(ids) == golden["chat"]["input_ids"]
    if name == "v3":
        with_system = tokenizer.apply_chat_template(history(shared_dir, system=True), add_generation_prompt=True,
                                                    return_dict=False)
        assert list(with_system) == golden["chat"]["with_system"]["input_ids"]
        assert family[3] == golden["chat"]["chat_eos_token_id"]  # stops where the official chat() stops
    else:
        first = tokenizer.apply_chat_template([{"role": "user", "content": "你好"}], add_generation_prompt=True,
                                              return_dict=False)
        assert list(first) == golden["chat"]["no_history_input_ids"]


def test_training_labels_cover_the_answers_and_their_stop(family):
    name, tokenizer, _, stops = family
    conversation = Conversation(messages=[Message("user", "你好"), Message("assistant", "你好！", True),
                                          Message("user", "What is 2+2?"), Message("assistant", "4.", True)])
    ids, labels = encode_for_training(tokenizer, conversation, stops)
    spans, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            spans, current = [*spans, current], []
    spans.append(current)

    def piece(text: str) -> list[int]:  # the official encode() of a text, without the [gMASK] sop prefix
        return tokenizer.encode(text, add_special_tokens=False)

    user, eos = tokenizer.convert_tokens_to_ids("<|user|>"), tokenizer.eos_token_id
    if name == "v3":
        # The official message layout: <|assistant|> + encode(metadata + "\n") + encode(content); generation
        # starts after the role token, so the answer is the "\n" part and the content, then where it stops.
        assert spans == [piece("\n") + piece("你好！") + [user], piece("\n") + piece("4.") + [eos]]
    else:
        # ChatGLM2 writes no stop token between rounds: the middle answer is trained as text, the last stops.
        assert [tokenizer.decode(span) for span in spans] == ["你好！", "4.</s>"]
    first_answer = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    assert ids[:first_answer] == encode_prompt(tokenizer, conversation.upto(1))


def test_chatglm3_tools_and_calls_follow_the_official_layout(shared_dir):
    """Against a hand-built reference of the official layout (build_chat_input for the tools, the fine-tuning
    data preparation for the call), from this tokenizer's encode of each piece, which the golden ids prove."""
    import ast

    from glmtune.data.formats import read_sharegpt
    from glmtune.models.loading import load_tokenizer, stop_token_ids

    directory = shared_dir / "tokenizers" / FAMILIES["v3"]
    tokenizer = load_tokenizer(str(directory))
    tool = {"name": "track", "description": "追踪指定股票的实时价格",
            "parameters": {"type": "object", "properties": {"symbol": {"description": "股票代码"}}}}
    arguments = {"symbol": "AAPL", "days": 3, "note": "it's \"fine\"\n", "tags": ["a", 1], "live": True}
    row = {"tools": [tool], "conversations": [
        {"from": "human", "value": "帮我查一下苹果的股价"},
        {"from": "function_call", "value": json.dumps({"name": "track", "arguments": arguments})},
        {"from": "observation", "value": '{"price": 12412}'},
        {"from": "gpt", "value": "苹果的股价是 12412。"}]}
    ids, labels = encode_for_training(tokenizer, read_sharegpt(row, True), stop_token_ids(str(directory), tokenizer))

    def message(role: str, metadata: str, content: str) -> list[int]:  # the official build_single_message
        pieces = [tokenizer.encode(text, add_special_tokens=False) for text in (metadata + "\n", content)]
        return [tokenizer.convert_tokens_to_ids(f"<|{role}|>")] + pieces[0] + pieces[1]

    call = ast.unparse(ast.Call(func=ast.Name(id="tool_call"), args=[],
                                keywords=[ast.keyword(arg=k, value=ast.Constant(v)) for k, v in arguments.items()]))
    system = ("Answer the following questions as best as you can. You have access to the following tools:\n"
              + json.dumps([tool], indent=4, ensure_ascii=False))
    expected = (tokenizer.convert_tokens_to_ids(["[gMASK]", "<sop>"]) + message("system", "", system)
                + message("user", "", "帮我查一下苹果的股价") + message("assistant", "track", f"```python\n{call}\n```")
                + message("observation", "", '{"price": 12412}') + message("assistant", "", "苹果的股价是 12412。")
                + [tokenizer.eos_token_id])
    assert ids == expected
    trained = [tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX])]
    assert "tool_call(symbol='AAPL'" in trained[0] and "12412。" in trained[0] and "追踪" not in trained[0]


def test_chatglm2_refuses_tools(shared_dir):
    from jinja2 import TemplateError

    from glmtune.models.loading import load_tokenizer

    tokenizer = load_tokenizer(str(shared_dir / "tokenizers" / FAMILIES["v2"]))
    with pytest.raises(TemplateError, match="no tools"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tools=[{"name": "f"}], tokenize=False)
