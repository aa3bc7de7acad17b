"""glmtune infer: prompts from flags or files, output file handling, generation limits."""

from __future__ import annotations

import json

from conftest import with_thinking_template, write_jsonl


def test_repeated_prompts_answer_in_order_on_stdout(cli, tiny_model):
    result = cli("infer", "--model", tiny_model, "--prompt", "什么是股票？", "--prompt", "What is a bond?",
                 "--max_new_tokens", "5", "--batch_size", "2")
    assert result.code == 0, result.err
    rows = [json.loads(line) for line in result.out.splitlines()]
    assert [r["prompt"] for r in rows] == ["什么是股票？", "What is a bond?"]
    assert all(isinstance(r["response"], str) for r in rows)


def test_batched_greedy_answers_equal_one_by_one_answers(cli, tiny_model):
    prompts = ["短", "a much longer prompt about compound interest and bonds", "medium prompt here"]
    args = [arg for p in prompts for arg in ("--prompt", p)]
    batched = cli("infer", "--model", tiny_model, *args, "--max_new_tokens", "8", "--batch_size", "3")
    single = cli("infer", "--model", tiny_model, *args, "--max_new_tokens", "8", "--batch_size", "1")
    assert batched.code == single.code == 0
    assert batched.out == single.out  # left padding with the attention mask changes nothing


def test_input_file_rows_are_written_back_with_response(cli, tiny_model, tmp_path):
    rows = [{"instruction": "Define APR.", "id": 7}, {"instruction": "Compute.", "input": "1+1", "id": 8}]
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    result = cli("infer", "--model", tiny_model, "--input", data, "--output", tmp_path / "out.jsonl",
                 "--max_new_tokens", "4")
    assert result.code == 0, result.err
    written = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in w.items() if k != "response"} for w in written] == rows


def test_existing_output_file_is_not_replaced(cli, tiny_model, tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text("keep\n")
    result = cli("infer", "--model", tiny_model, "--prompt", "x", "--output", out, "--max_new_tokens", "2")
    assert result.code == 2 and "--overwrite_output_dir" in result.err
    assert out.read_text() == "keep\n"


def test_max_length_counts_the_prompt(cli, tiny_model):
    result = cli("infer", "--model", tiny_model, "--prompt", "a prompt of several tokens", "--max_length", "3")
    assert result.code == 2 and "leaves no room for an answer" in result.err


def test_nothing_to_answer_is_a_clear_error(cli, tiny_model):
    result = cli("infer", "--model", tiny_model)
    assert result.code == 2 and "--prompt" in result.err


def test_peft_path_that_is_not_an_adapter(cli, tmp_path):
    result = cli("infer", "--peft_path", tmp_path, "--prompt", "x")
    assert result.code == 2 and "has no adapter_config.json" in result.err


def test_max_length_budget_is_per_prompt_whatever_the_batch(cli, tiny_model):
    prompts = ["短", "a much longer prompt about compound interest and bonds and stocks"]
    args = [arg for p in prompts for arg in ("--prompt", p)]
    batched = cli("infer", "--model", tiny_model, *args, "--max_length", "40", "--batch_size", "2")
    single = cli("infer", "--model", tiny_model, *args, "--max_length", "40", "--batch_size", "1")
    assert batched.code == single.code == 0, batched.err
    assert batched.out == single.out


def test_unknown_input_format_and_directory_output_are_refused(cli, tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "in.jsonl", [{"instruction": "q"}])
    assert "--format foo is unknown" in cli("infer", "--model", tiny_model, "--input", data, "--format", "foo").err
    (tmp_path / "dir").mkdir()
    result = cli("infer", "--model", tiny_model, "--input", data, "--output", tmp_path / "dir")
    assert result.code == 2 and "is a directory, expected a file path" in result.err


def test_empty_prompt_row_is_refused_with_its_location(cli, tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": "fine"}, {"text": ""}])
    result = cli("infer", "--model", tiny_model, "--input", data)
    assert result.code == 2 and f"{data}:2: the prompt is empty" in result.err


def test_enable_thinking_reaches_the_prompt_and_a_template_without_the_switch_refuses_it(cli, tiny_model, tmp_path,
                                                                                         monkeypatch):
    from glmtune.inference import engine

    refused = cli("infer", "--model", tiny_model, "--prompt", "2+2?", "--enable_thinking", "false")
    assert refused.code == 2 and "has no thinking switch" in refused.err
    model = with_thinking_template(tiny_model, tmp_path / "thinking")
    prompts = []

    def encode_prompt(tokenizer, conversation, enable_thinking=None):
        ids = original(tokenizer, conversation, enable_thinking)
        prompts.append(tokenizer.decode(ids))
        return ids

    original = engine.encode_prompt
    monkeypatch.setattr(engine, "encode_prompt", encode_prompt)
    for flag, ending in (("false", "2+2?/nothink<|assistant|>\n<think></think>"), ("true", "2+2?<|assistant|>")):
        result = cli("infer", "--model", model, "--prompt", "2+2?", "--enable_thinking", flag, "--max_new_tokens", "2")
        assert result.code == 0, result.err
        assert prompts[-1].endswith(ending)
