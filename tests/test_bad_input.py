"""Every user mistake ends with one message naming the file, line/row and field; exit code 2; nothing written."""

from __future__ import annotations

import pytest
from conftest import write_json, write_jsonl


def prepare(cli, data, out, model, *extra):
    return cli("prepare", "--jsonl_path", data, "--save_path", out, "--model", model, *extra)


def prepared_rows(save_path, tokenizer) -> list[tuple[str, str]]:
    """Each prepared row as (its unsupervised text, its supervised text without the stop token)."""
    from datasets import load_from_disk

    from glmtune.data.templates import IGNORE_INDEX

    rows = []
    for row in load_from_disk(str(save_path))["train"]:
        pairs = list(zip(row["input_ids"], row["labels"], strict=True))
        prompt = tokenizer.decode([i for i, label in pairs if label == IGNORE_INDEX], skip_special_tokens=True)
        answer = tokenizer.decode([i for i, label in pairs if label != IGNORE_INDEX], skip_special_tokens=True)
        rows.append((prompt, answer.strip()))
    return rows


def assert_clean_failure(result, out, *needles):
    assert result.code == 2
    assert "Traceback" not in result.err
    assert result.err.startswith("error: ")
    for needle in needles:
        assert needle in result.err, result.err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_malformed_json_line_names_file_and_line(cli, tmp_path, tiny_model):
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": \n', encoding="utf-8")
    assert_clean_failure(prepare(cli, data, tmp_path / "out", tiny_model), tmp_path / "out",
                         f"{data}:2:", "invalid JSON")


def test_truncated_json_array_names_file_and_line(cli, tmp_path, tiny_model):
    data = tmp_path / "data.json"
    data.write_text('[\n{"prompt": "a", "completion": "b"},\n{"prompt": "c"', encoding="utf-8")
    assert_clean_failure(prepare(cli, data, tmp_path / "out", tiny_model), tmp_path / "out",
                         f"{data}:3:", "cut off")


def test_missing_field_names_row_and_field(cli, tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "data.jsonl", [{"instruction": "q", "output": "a"}, {"instruction": "q2"}])
    assert_clean_failure(prepare(cli, data, tmp_path / "out", tiny_model), tmp_path / "out",
                         f"{data}:2: field 'output' is missing")


def test_wrong_field_type_names_expected_and_found(cli, tmp_path, tiny_model):
    data = write_json(tmp_path / "data.json", [{"instruction": "q", "output": "a"}, {"instruction": "q", "output": 42}])
    assert_clean_failure(prepare(cli, data, tmp_path / "out", tiny_model), tmp_path / "out",
                         f"{data} row 1: field 'output': expected a string, found a number (42)")


def test_bad_rows_are_all_listed_up_to_twenty(cli, tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "p", "completion": i} for i in range(30)])
    result = prepare(cli, data, tmp_path / "out", tiny_model)
    assert_clean_failure(result, tmp_path / "out", f"{data}:1:", f"{data}:20:")
    assert f"{data}:21:" not in result.err


def test_empty_file(cli, tmp_path, tiny_model):
    data = tmp_path / "data.json"
    data.write_text("  \n", encoding="utf-8")
    assert_clean_failure(prepare(cli, data, tmp_path / "out", tiny_model), tmp_path / "out", f"{data} is empty")


def test_file_that_is_not_utf8(cli, tmp_path, tiny_model):
    data = tmp_path / "data.jsonl"
    data.write_bytes(b'{"prompt": "a", "completion": "b"}\n' + '{"prompt": "股票"}'.encode("gbk"))
    assert_clean_failure(prepare(cli, data, tmp_path / "out", tiny_model), tmp_path / "out",
                         f"{data}:2: the file is not UTF-8")


def test_missing_path(cli, tmp_path, tiny_model):
    assert_clean_failure(prepare(cli, tmp_path / "nope.json", tmp_path / "out", tiny_model), tmp_path / "out",
                         f"data file {tmp_path / 'nope.json'} does not exist")


def test_unknown_format_of_rows(cli, tmp_path, tiny_model):
    data = write_json(tmp_path / "data.json", [{"question": "q", "answer": "a"}])
    assert_clean_failure(prepare(cli, data, tmp_path / "out", tiny_model), tmp_path / "out",
                         "cannot tell the data format", "['answer', 'question']")


def test_unknown_flag_exits_2(cli, tmp_path, tiny_model):
    data = write_json(tmp_path / "data.json", [{"prompt": "p", "completion": "c"}])
    result = prepare(cli, data, tmp_path / "out", tiny_model, "--max_seq_len", "12")
    assert result.code == 2
    assert "unrecognized arguments: --max_seq_len" in result.err
    assert not (tmp_path / "out").exists()


def test_unknown_command_exits_2(cli):
    result = cli("prepar")
    assert result.code == 2 and "did you mean 'prepare'" in result.err


def test_unknown_yaml_key_is_an_error(cli, tmp_path, tiny_model):
    data = write_json(tmp_path / "data.json", [{"prompt": "p", "completion": "c"}])
    config = tmp_path / "config.yaml"
    config.write_text("max_seq_lenght: 12\n", encoding="utf-8")
    result = prepare(cli, data, tmp_path / "out", tiny_model, "--config", config)
    assert_clean_failure(result, tmp_path / "out", "unknown key 'max_seq_lenght'", "did you mean 'max_seq_length'")


def test_existing_output_is_kept_without_overwrite_flag(cli, tmp_path, tiny_model):
    data = write_json(tmp_path / "data.json", [{"prompt": "p", "completion": "c"}])
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    result = prepare(cli, data, out, tiny_model)
    assert result.code == 2 and "already exists and is not empty" in result.err
    assert "--overwrite_output_dir" in result.err
    assert (out / "precious.txt").read_text() == "keep me"
    assert prepare(cli, data, out, tiny_model, "--overwrite_output_dir").code == 0
    assert (out / "manifest.json").exists() and not (out / "precious.txt").exists()


def test_model_not_available_offline_says_how_to_pass_model(cli, tmp_path):
    data = write_json(tmp_path / "data.json", [{"prompt": "p", "completion": "c"}])
    result = cli("prepare", "--jsonl_path", data, "--save_path", tmp_path / "out", "--model", "THUDM/chatglm-6b")
    assert_clean_failure(result, tmp_path / "out", "model 'THUDM/chatglm-6b' is not in the local cache",
                         "--model PATH")
    assert len(result.err.strip().splitlines()) == 2  # the error line and the hint line


@pytest.mark.parametrize("flag, value, needle", [
    ("--max_seq_length", "1", "--max_seq_length must be at least 2"),
    ("--format", "yaml", "--format yaml is unknown"),
])
def test_invalid_option_values(cli, tmp_path, tiny_model, flag, value, needle):
    data = write_json(tmp_path / "data.json", [{"prompt": "p", "completion": "c"}])
    assert_clean_failure(prepare(cli, data, tmp_path / "out", tiny_model, flag, value), tmp_path / "out", needle)


def test_empty_json_array(cli, tmp_path, tiny_model):
    data = write_json(tmp_path / "data.json", [])
    assert_clean_failure(prepare(cli, data, tmp_path / "out", tiny_model), tmp_path / "out", f"{data} holds no rows")


def test_yaml_value_of_the_wrong_type(cli, tmp_path, tiny_model):
    data = write_json(tmp_path / "data.json", [{"prompt": "p", "completion": "c"}])
    config = tmp_path / "config.yaml"
    config.write_text("max_seq_length: [12]\n", encoding="utf-8")
    assert_clean_failure(prepare(cli, data, tmp_path / "out", tiny_model, "--config", config), tmp_path / "out",
                         f"{config}: key 'max_seq_length': expected a single value, found [12]")


def test_output_that_is_the_input_is_refused(cli, tmp_path, tiny_model):
    data = write_json(tmp_path / "data.json", [{"prompt": "p", "completion": "c"}])
    result = prepare(cli, data, data, tiny_model, "--overwrite_output_dir")
    assert result.code == 2 and "is also an input of this command" in result.err
    assert data.is_file()


def test_output_under_a_file_is_refused(cli, tmp_path, tiny_model):
    data = write_json(tmp_path / "data.json", [{"prompt": "p", "completion": "c"}])
    result = prepare(cli, data, data / "sub", tiny_model)
    assert result.code == 2 and f"{data} is a file, not a directory" in result.err


def test_demo_refuses_to_replace_the_current_directory(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    result = cli("demo", "--output_dir", ".", "--overwrite_output_dir")
    assert result.code == 2 and "refusing to replace it" in result.err
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_damaged_dataset_manifest_is_a_clear_error(cli, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.json").write_text("{not json")
    result = cli("train", "--dataset_path", tmp_path / "data", "--output_dir", tmp_path / "run")
    assert result.code == 2 and "cannot read the manifest" in result.err and "Traceback" not in result.err


def test_relative_model_path_is_recorded_absolute(cli, tmp_path, tiny_model, monkeypatch):
    import json

    data = write_json(tmp_path / "data.json", [{"prompt": "p", "completion": "c"}])
    monkeypatch.chdir(tiny_model.parent)
    assert prepare(cli, data, tmp_path / "out", tiny_model.name).code == 0
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["model"] == str(tiny_model.resolve())


def test_manifest_command_line_hides_secrets():
    from glmtune.artifacts import redact_secrets

    assert redact_secrets(["glmtune", "train", "--hub_token", "abc", "--api_key=xyz", "--max_steps", "3"]) == [
        "glmtune", "train", "--hub_token", "***", "--api_key=***", "--max_steps", "3"]


def test_hub_dataset_name_offline_is_a_clear_error(cli, tmp_path, tiny_model):
    result = prepare(cli, "tatsu-lab/alpaca", tmp_path / "out", tiny_model)
    assert_clean_failure(result, tmp_path / "out", "'tatsu-lab/alpaca' is not a local file, and as a hub dataset "
                                                   "it can't be loaded: HF_HUB_OFFLINE is set")


def test_preference_data_is_named_as_such(cli, tmp_path, tiny_model, shared):
    result = prepare(cli, shared / "data" / "preference" / "dpo_en_demo.json", tmp_path / "out", tiny_model)
    assert result.code == 0, result.err
    assert "format:            preference" in result.out  # pairs for `glmtune dpo` (tests/test_dpo.py)


def test_every_row_bad_with_skip_bad_rows_is_a_clear_error(cli, tmp_path, tiny_model):
    data = write_json(tmp_path / "data.json", [{"instruction": "q", "output": 3}, {"instruction": "q", "output": 4}])
    result = prepare(cli, data, tmp_path / "out", tiny_model, "--skip_bad_rows")
    assert_clean_failure(result, tmp_path / "out", "every row of", "2 skipped")


def test_json_lines_may_hold_unicode_line_separators(cli, tmp_path, tiny_model, tokenizer):
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "a\\u2028b", "completion": "c\u2029d"}\n{"prompt": "x", "completion": "y"}\n',
                    encoding="utf-8")
    result = prepare(cli, data, tmp_path / "out", tiny_model)
    assert result.code == 0, result.err
    # Two rows, not four: U+2028/U+2029 inside a string are characters of it, not line ends.
    assert [answer for _, answer in prepared_rows(tmp_path / "out", tokenizer)] == ["c\u2029d", "y"]


def test_columns_as_a_yaml_mapping(cli, tmp_path, tiny_model, tokenizer):
    data = write_json(tmp_path / "data.json", [{"question": "q", "answer": "a"}])
    config = tmp_path / "config.yaml"
    config.write_text("columns: {question: prompt, answer: completion}\n", encoding="utf-8")
    result = prepare(cli, data, tmp_path / "out", tiny_model, "--config", config)
    assert result.code == 0, result.err
    [(prompt, answer)] = prepared_rows(tmp_path / "out", tokenizer)
    assert answer == "a" and "q" in prompt  # the question became the prompt, the answer the trained completion
