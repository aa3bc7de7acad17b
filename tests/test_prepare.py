"""glmtune prepare: formats, label masks, the report's counts, the output contract."""

from __future__ import annotations

import json

import pytest
from conftest import write_json, write_jsonl

from glmtune.data.templates import IGNORE_INDEX

EOS = "<|endoftext|>"


def load(save_path):
    from datasets import load_from_disk

    return load_from_disk(str(save_path))["train"]


def supervised_text(tokenizer, row) -> str:
    return tokenizer.decode([i for i, label in zip(row["input_ids"], row["labels"], strict=True)
                             if label != IGNORE_INDEX])


@pytest.mark.parametrize("row, prompt_text, answer", [
    ({"instruction": "Define APR.", "input": "", "output": "Annual rate."}, "Define APR.", "Annual rate."),
    ({"instruction": "Compute interest.", "input": "1000 at 5%", "output": "50"}, "Compute interest.\n1000 at 5%",
     "50"),
    ({"prompt": "What is a stock?", "completion": "A share."}, "What is a stock?", "A share."),
    ({"context": "什么是债券？", "target": "债务凭证。"}, "什么是债券？", "债务凭证。"),
])
def test_labels_cover_only_the_answer_and_its_stop_token(cli, tmp_path, tiny_model, tokenizer, row, prompt_text,
                                                         answer):
    data = write_json(tmp_path / "data.json", [row])
    result = cli("prepare", "--jsonl_path", data, "--save_path", tmp_path / "out", "--model", tiny_model)
    assert result.code == 0, result.err
    (sample,) = load(tmp_path / "out")
    expected_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt_text}, {"role": "assistant", "content": answer}],
        tokenize=True, return_dict=False)
    assert sample["input_ids"] == list(expected_ids) + [tokenizer.convert_tokens_to_ids(EOS)]
    assert supervised_text(tokenizer, sample) == f"\n{answer}{EOS}"


def test_alpaca_history_and_system_train_every_answer(cli, tmp_path, tiny_model, tokenizer):
    row = {"system": "Be brief.", "history": [["Q1?", "A1."]], "instruction": "Q2?", "output": "A2."}
    data = write_json(tmp_path / "data.json", [row])
    assert cli("prepare", "--jsonl_path", data, "--save_path", tmp_path / "out", "--model", tiny_model).code == 0
    (sample,) = load(tmp_path / "out")
    assert tokenizer.decode(sample["input_ids"]).startswith("[gMASK]<sop><|system|>\nBe brief.<|user|>\nQ1?")
    assert supervised_text(tokenizer, sample) == f"\nA1.<|user|>\nA2.{EOS}"


def test_text_rows_are_trained_on_every_token(cli, tmp_path, tiny_model, tokenizer):
    data = write_jsonl(tmp_path / "data.jsonl", [{"text": "Bonds pay coupons."}])
    assert cli("prepare", "--jsonl_path", data, "--save_path", tmp_path / "out", "--model", tiny_model).code == 0
    (sample,) = load(tmp_path / "out")
    assert sample["labels"] == sample["input_ids"]
    assert tokenizer.decode(sample["input_ids"]) == f"Bonds pay coupons.{EOS}"


def test_format_flag_overrides_detection(cli, tmp_path, tiny_model, tokenizer):
    # Rows with both text and prompt/completion fields: detection picks prompt_completion, --format text wins.
    data = write_json(tmp_path / "data.json", [{"prompt": "P", "completion": "C", "text": "Plain."}])
    assert cli("prepare", "--jsonl_path", data, "--save_path", tmp_path / "a", "--model", tiny_model).code == 0
    assert cli("prepare", "--jsonl_path", data, "--save_path", tmp_path / "b", "--model", tiny_model,
               "--format", "text").code == 0
    assert supervised_text(tokenizer, load(tmp_path / "a")[0]) == f"\nC{EOS}"
    assert tokenizer.decode(load(tmp_path / "b")[0]["input_ids"]) == f"Plain.{EOS}"


def test_report_counts_rows_truncated_dropped_and_supervised_tokens(cli, tmp_path, tiny_model, tokenizer):
    rows = [
        {"instruction": "Short?", "output": "Yes."},
        {"instruction": "Long answer?", "output": "word " * 200},  # answer cut at the end: truncated, kept
        {"instruction": "question " * 200, "output": "lost"},  # prompt alone too long: nothing left to learn
    ]
    data = write_json(tmp_path / "data.json", rows)
    result = cli("prepare", "--jsonl_path", data, "--save_path", tmp_path / "out", "--model", tiny_model,
                 "--max_seq_length", "64")
    assert result.code == 0, result.err
    dataset = load(tmp_path / "out")
    assert len(dataset) == 2
    assert max(len(r["input_ids"]) for r in dataset) == 64
    # Independent counts: from the saved rows themselves, and from tokenizing each answer on its own.
    tokens = sum(len(r["input_ids"]) for r in dataset)
    supervised = sum(label != IGNORE_INDEX for r in dataset for label in r["labels"])
    answer_tokens = [len(tokenizer.encode("\n" + row["output"])) + 1 for row in rows]  # + the end token
    report = json.loads((tmp_path / "out" / "manifest.json").read_text())["report"]
    assert {k: report[k] for k in ("rows_read", "kept", "dropped", "truncated", "rows_over_max", "tokens",
                                   "supervised_tokens", "supervised_tokens_lost")} == {
        "rows_read": 3, "kept": 2, "dropped": {"no supervised token left after truncation": 1},
        "truncated": {"right": 1}, "rows_over_max": 2, "tokens": tokens, "supervised_tokens": supervised,
        "supervised_tokens_lost": sum(answer_tokens) - supervised}
    assert report["length_percentiles"]["max"] == len(tokenizer.apply_chat_template(
        [{"role": "user", "content": rows[2]["instruction"]}, {"role": "assistant", "content": "lost"}],
        return_dict=False)) + 1
    assert "rows read:         3" in result.out
    assert f"supervised tokens: {supervised} ({supervised / tokens:.1%} of all tokens)" in result.out


def test_manifest_records_model_tokenizer_and_input_hash(cli, tmp_path, tiny_model):
    import hashlib

    data = write_json(tmp_path / "data.json", [{"prompt": "P", "completion": "C"}])
    assert cli("prepare", "--jsonl_path", data, "--save_path", tmp_path / "out", "--model", tiny_model).code == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["command"] == "prepare"
    assert manifest["model"] == str(tiny_model)
    assert manifest["inputs"] == {str(data): hashlib.sha256(data.read_bytes()).hexdigest()}
    assert manifest["config"]["max_seq_length"] == 512
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left


def test_real_alpaca_data_prepares(cli, tmp_path, tiny_model, shared):
    result = cli("prepare", "--jsonl_path", shared / "data/finance_zh/disc_fin_consulting_part.json",
                 "--save_path", tmp_path / "out", "--model", tiny_model, "--max_seq_length", "1024")
    assert result.code == 0, result.err
    report = json.loads((tmp_path / "out" / "manifest.json").read_text())["report"]
    assert report["rows_read"] == 100 and report["format"] == "alpaca"
    assert report["kept"] + sum(report["dropped"].values()) == 100


def test_data_and_the_seeds_jsonl_path_prepare_the_same_dataset(cli, tmp_path, tiny_model):
    data = write_json(tmp_path / "data.json", [{"instruction": "Define APR.", "output": "Annual rate."}])
    config = tmp_path / "config.yaml"
    config.write_text(f"jsonl_path: {data}\nsave_path: {tmp_path / 'from_yaml'}\n", encoding="utf-8")
    fresh = ("--model", tiny_model, "--use_cache", "false")  # each run tokenizes: the rows compared are its own
    assert cli("prepare", "--data", data, "--save_path", tmp_path / "new", *fresh).code == 0
    assert cli("prepare", "--jsonl_path", data, "--save_path", tmp_path / "old", *fresh).code == 0
    assert cli("prepare", "--config", config, *fresh).code == 0
    rows = [load(tmp_path / name).to_list() for name in ("new", "old", "from_yaml")]
    assert rows[0] == rows[1] == rows[2] and len(rows[0]) == 1
