"""glmtune infer: prompts from flags or files, output file handling, generation limits."""

from __future__ import annotations

import json

from conftest import write_jsonl


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
