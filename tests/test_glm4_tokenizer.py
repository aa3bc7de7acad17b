"""GLM-4-9B-chat's tokenizer, rebuilt without remote code, against what the official tokenizer produced
(../shared/fixtures/chatglm/glm4/tokenizer_golden.json, real vocabulary)."""

from __future__ import annotations

import json

import pytest

SPECIALS = ("<|", "[MASK]", "[sMASK]", "[gMASK]", "<sop>", "<eop>")


@pytest.fixture(scope="module")
def glm4(shared_dir):
    from glmtune.models.loading import load_tokenizer

    return load_tokenizer(str(shared_dir / "tokenizers" / "glm-4-9b-chat"))


@pytest.fixture(scope="module")
def golden(shared_dir):
    return json.loads((shared_dir / "fixtures/chatglm/glm4/tokenizer_golden.json").read_text(encoding="utf-8"))


def test_vocabulary_and_special_token_ids(glm4, golden):
    assert len(glm4) == golden["len_tokenizer"]
    for token, token_id in golden["special_token_ids"].items():
        if not token.startswith("tokenizer."):
            assert glm4.convert_tokens_to_ids(token) == token_id, token
    assert (glm4.eos_token_id, glm4.pad_token_id) == (151329, 151329)


def test_encode_gives_the_official_ids_for_every_string(glm4, golden):
    for case in golden["strings"]:
        assert glm4.encode(case["text"]) == case["ids"], case["text"]  # [gMASK]<sop> prepended
        assert glm4.encode(case["text"], add_special_tokens=False) == case["ids_no_special"], case["text"]


def test_decode_matches_the_official_text(glm4, golden):
    for case in golden["strings"]:
        assert glm4.decode(case["ids"], skip_special_tokens=True) == case["decode_ids_skip_special"], case["text"]
        if not any(s in case["text"] for s in SPECIALS):
            assert glm4.decode(case["ids_no_special"]) == case["decode_ids_no_special"], case["text"]


def test_chat_template_reproduces_the_official_prompts(glm4, golden):
    chat = golden["chat"]
    assert glm4.apply_chat_template(chat["messages"], add_generation_prompt=True, tokenize=False) == \
        chat["prompt_text"]
    ids = glm4.apply_chat_template(chat["messages"], add_generation_prompt=True, return_dict=False)
    assert list(ids) == chat["input_ids"]
    assert glm4.apply_chat_template(chat["messages"], tokenize=False) == chat["without_generation_prompt_text"]
    system = chat["with_system"]
    assert glm4.apply_chat_template(system["messages"], add_generation_prompt=True, tokenize=False) == \
        system["prompt_text"]


def test_training_labels_with_the_real_tokenizer_end_with_a_stop_token(glm4, shared_dir):
    from glmtune.data.conversation import Conversation, Message
    from glmtune.data.templates import IGNORE_INDEX, encode_for_training, encode_prompt
    from glmtune.models.loading import stop_token_ids

    stops = stop_token_ids(str(shared_dir / "tokenizers" / "glm-4-9b-chat"), glm4)
    assert stops == [151329, 151336, 151338]
    conversation = Conversation(messages=[Message("user", "什么是债券？"), Message("assistant", "债务凭证。", True),
                                          Message("user", "What is a stock?"), Message("assistant", "A share.", True)])
    ids, labels = encode_for_training(glm4, conversation, stops)
    trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    assert glm4.decode([ids[i] for i in trained]) == "\n债务凭证。<|user|>\nA share.<|endoftext|>"
    second_answer = trained[len(glm4.encode("\n债务凭证。<|user|>", add_special_tokens=False))]
    assert ids[:second_answer] == encode_prompt(glm4, conversation.prompt_part())


def test_prepare_with_the_real_tokenizer_drops_empty_answers_and_counts_them(cli, tmp_path, shared_dir):
    from conftest import write_json

    data = write_json(tmp_path / "data.json", [{"instruction": "Define APR.", "output": "Annual rate."},
                                               {"instruction": "Say nothing.", "output": ""}])
    result = cli("prepare", "--jsonl_path", data, "--save_path", tmp_path / "out", "--model",
                 shared_dir / "tokenizers" / "glm-4-9b-chat")
    assert result.code == 0, result.err
    report = json.loads((tmp_path / "out" / "manifest.json").read_text())["report"]
    # GLM-4's template writes nothing for an empty message, so the answer has no place in the rendered text.
    assert report["kept"] == 1 and list(report["dropped"].values()) == [1]
    assert "⟦\nAnnual rate.<|endoftext|>⟧" in result.out


def test_tools_and_tool_calls_render_the_glm4_way(cli, tmp_path, shared_dir):
    from datasets import load_from_disk

    source = shared_dir / "data" / "multiturn" / "glaive_toolcall_zh_demo.json"
    row = json.loads(source.read_text(encoding="utf-8"))[0]
    from conftest import write_json

    data = write_json(tmp_path / "data.json", [row])
    result = cli("prepare", "--jsonl_path", data, "--save_path", tmp_path / "out", "--model",
                 shared_dir / "tokenizers" / "glm-4-9b-chat", "--max_seq_length", "4096")
    assert result.code == 0, result.err
    (sample,) = load_from_disk(str(tmp_path / "out"))["train"]
    tokenizer = glm4_tokenizer(shared_dir)
    text = tokenizer.decode(sample["input_ids"])
    for tool in json.loads(row["tools"]):  # every tool is shown to the model, in the system turn
        assert f"## {tool['name']}" in text.split("<|user|>")[0]
    call = json.loads(row["conversations"][1]["value"])
    first_span = []
    for token, label in zip(sample["input_ids"], sample["labels"], strict=True):
        if label != -100:
            first_span.append(token)
        elif first_span:
            break
    # GLM-4 writes a call as "<|assistant|>NAME\n{arguments}" and the tool's answer follows "<|observation|>".
    expected = f"{call['name']}\n{json.dumps(call['arguments'], ensure_ascii=False)}<|observation|>"
    assert tokenizer.decode(first_span) == expected


def glm4_tokenizer(shared_dir):
    from glmtune.models.loading import load_tokenizer

    return load_tokenizer(str(shared_dir / "tokenizers" / "glm-4-9b-chat"))
