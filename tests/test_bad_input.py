"""Every user mistake ends with one message naming the file, line/row and field; exit code 2; nothing written."""

from __future__ import annotations

import pytest
from conftest import write_json, write_jsonl


def prepare(cli, data, out, model, *extra):
    return cli("prepare", "--jsonl_path", data, "--save_path", out, "--model", model, *extra)


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
    ("--format", "sharegpt", "--format sharegpt is unknown"),
])
def test_invalid_option_values(cli, tmp_path, tiny_model, flag, value, needle):
    data = write_json(tmp_path / "data.json", [{"prompt": "p", "completion": "c"}])
    assert_clean_failure(prepare(cli, data, tmp_path / "out", tiny_model, flag, value), tmp_path / "out", needle)
