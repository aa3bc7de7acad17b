"""prepare on every format users bring: real files from ../shared/data, and the options around them.

The reference for each check is the raw file itself: the supervised spans, decoded, must be its assistant texts.
"""

from __future__ import annotations

import json

import pytest
from conftest import write_json, write_jsonl

from glmtune.data.templates import IGNORE_INDEX

STOP_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")


def prepared(save_path):
    from datasets import load_from_disk

    return load_from_disk(str(save_path))["train"]


def trained_texts(tokenizer, row) -> list[str]:
    """The decoded supervised spans of a row, without the template's leading newline and the stop token."""
    spans, current = [], []
    for token, label in zip(row["input_ids"], row["labels"], strict=True):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    texts = []
    for span in spans:
        text = tokenizer.decode(span)
        stop = next(s for s in STOP_TOKENS if text.endswith(s))
        assert text.startswith("\n")
        texts.append(text[1: -len(stop)])
    return texts


def expected_alpaca(row):
    return [a for _, a in row.get("history") or []] + [row["output"]]


def expected_sharegpt(row):
    return [t["value"] for t in row["conversations"] if t["from"] in ("gpt", "function_call")]


def expected_messages(row):
    def text(content):
        return content if isinstance(content, str) else "".join(p.get("text", p.get("value")) for p in content)
    return [text(m["content"]) for m in row["messages"] if m["role"] == "assistant" and m.get("loss_weight", 1) > 0]


def read_any(path):
    text = path.read_text(encoding="utf-8")
    return json.loads(text) if text.lstrip().startswith("[") else [json.loads(line) for line in text.splitlines()]


@pytest.mark.parametrize("relative, fmt, expected", [
    ("alpaca/alpaca_en_demo.json", "alpaca", expected_alpaca),
    ("alpaca/alpaca_zh_demo.json", "alpaca", expected_alpaca),
    ("finance_zh/disc_fin_consulting_part.json", "alpaca", expected_alpaca),
    ("advertisegen/train_sample.jsonl", "content_summary", lambda row: [row["summary"]]),
    ("multiturn/dummy_conversation.json", "sharegpt", expected_sharegpt),
    ("multiturn/glaive_toolcall_zh_demo.json", "sharegpt", expected_sharegpt),
    ("multiturn/v1_sft_demo.jsonl", "messages", expected_messages),
])
def test_real_files_train_exactly_their_assistant_texts(cli, shared, tmp_path, tiny_model, tokenizer, relative, fmt,
                                                        expected):
    path = shared / "data" / relative
    result = cli("prepare", "--jsonl_path", path, "--save_path", tmp_path / "out", "--model", tiny_model,
                 "--max_seq_length", "100000")
    assert result.code == 0, result.err
    raw = read_any(path)
    report = json.loads((tmp_path / "out" / "manifest.json").read_text())["report"]
    assert (report["format"], report["rows_read"], report["kept"]) == (fmt, len(raw), len(raw))
    dataset = prepared(tmp_path / "out")
    for i in range(0, len(raw), max(1, len(raw) // 40)):  # a spread of rows, first and last included
        assert trained_texts(tokenizer, dataset[i]) == expected(raw[i]), i
    assert trained_texts(tokenizer, dataset[len(raw) - 1]) == expected(raw[-1])


def test_message_loss_weight_zero_and_train_false_turn_loss_off(cli, tmp_path, tiny_model, tokenizer):
    row = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1", "loss_weight": 0},
        {"role": "user", "content": "Q2"}, {"role": "assistant", "content": [{"type": "text", "text": "A2"}]},
        {"role": "user", "content": "Q3"}, {"role": "assistant", "content": "A3", "train": False}]}
    data = write_jsonl(tmp_path / "data.jsonl", [row])
    assert cli("prepare", "--jsonl_path", data, "--save_path", tmp_path / "out", "--model", tiny_model).code == 0
    (sample,) = prepared(tmp_path / "out")
    assert trained_texts(tokenizer, sample) == ["A2"]
    assert tokenizer.decode(sample["input_ids"]).startswith("[gMASK]<sop><|system|>\nBe brief.<|user|>\nQ1")


def test_last_turn_only_and_train_on_prompt(cli, tmp_path, tiny_model, tokenizer):
    row = {"conversations": [{"from": "human", "value": "Q1"}, {"from": "gpt", "value": "A1"},
                             {"from": "human", "value": "Q2"}, {"from": "gpt", "value": "A2"}]}
    data = write_json(tmp_path / "data.json", [row])
    base = ["prepare", "--jsonl_path", data, "--model", tiny_model]
    assert cli(*base, "--save_path", tmp_path / "last", "--last_turn_only").code == 0
    assert trained_texts(tokenizer, prepared(tmp_path / "last")[0]) == ["A2"]
    assert cli(*base, "--save_path", tmp_path / "all", "--train_on_prompt").code == 0
    everything = prepared(tmp_path / "all")[0]
    assert everything["labels"] == everything["input_ids"]


def long_conversation():
    turns = []
    for i in range(3):
        turns += [{"from": "human", "value": f"question {i} " + "pad " * 20}, {"from": "gpt", "value": f"answer {i}"}]
    return {"conversations": turns}


def test_truncation_left_keeps_the_last_exchange_whole(cli, tmp_path, tiny_model, tokenizer):
    row = long_conversation()
    data = write_json(tmp_path / "data.json", [row])
    last = [{"role": "user", "content": row["conversations"][4]["value"]},
            {"role": "assistant", "content": "answer 2"}]
    reference = list(tokenizer.apply_chat_template(last, return_dict=False)) + [tokenizer.eos_token_id]
    result = cli("prepare", "--jsonl_path", data, "--save_path", tmp_path / "out", "--model", tiny_model,
                 "--max_seq_length", str(len(reference) + 5), "--truncation", "left")
    assert result.code == 0, result.err
    (sample,) = prepared(tmp_path / "out")
    assert sample["input_ids"] == reference  # the template's opening tokens stay; the oldest turns go
    assert trained_texts(tokenizer, sample) == ["answer 2"]
    report = json.loads((tmp_path / "out" / "manifest.json").read_text())["report"]
    assert report["truncated"] == {"left": 1}
    assert report["supervised_tokens_lost"] == sum(len(tokenizer.encode(f"\nanswer {i}")) + 1 for i in (0, 1))


def test_truncation_drop_leaves_long_rows_out_and_counts_them(cli, tmp_path, tiny_model):
    data = write_json(tmp_path / "data.json", [long_conversation(), {"prompt": "short", "completion": "ok"}])
    result = cli("prepare", "--jsonl_path", data, "--save_path", tmp_path / "out", "--model", tiny_model,
                 "--max_seq_length", "30", "--truncation", "drop", "--format", "sharegpt")
    # the second row is not sharegpt: with --format given it is a bad row
    assert result.code == 2 and f"{data} row 1: field 'conversations' is missing" in result.err
    data = write_json(tmp_path / "data.json", [long_conversation(), {"conversations": [
        {"from": "human", "value": "short"}, {"from": "gpt", "value": "ok"}]}])
    result = cli("prepare", "--jsonl_path", data, "--save_path", tmp_path / "out", "--model", tiny_model,
                 "--max_seq_length", "30", "--truncation", "drop")
    assert result.code == 0, result.err
    report = json.loads((tmp_path / "out" / "manifest.json").read_text())["report"]
    assert report["kept"] == 1 and report["dropped"] == {"longer than --max_seq_length (--truncation drop)": 1}


def test_skip_bad_rows_counts_them_and_writes_rejects_beside_the_output(cli, tmp_path, tiny_model):
    rows = [{"prompt": "p1", "completion": "c1"}, {"prompt": "p2", "completion": 5}, {"prompt": "p3"},
            {"prompt": "p4", "completion": "c4"}]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    result = cli("prepare", "--jsonl_path", data, "--save_path", tmp_path / "out", "--model", tiny_model,
                 "--skip_bad_rows")
    assert result.code == 0, result.err
    assert len(prepared(tmp_path / "out")) == 2
    rejects = [json.loads(line) for line in (tmp_path / "out.rejects.jsonl").read_text().splitlines()]
    assert [(r["location"], r["row"]) for r in rejects] == [(f"{data}:2", rows[1]), (f"{data}:3", rows[2])]
    assert "2 bad rows skipped" in result.out


def test_dry_run_writes_nothing_and_shows_the_trained_spans(cli, tmp_path, tiny_model):
    data = write_json(tmp_path / "data.json", [{"instruction": "What is APR?", "output": "A yearly rate."}])
    result = cli("prepare", "--jsonl_path", data, "--save_path", tmp_path / "out", "--model", tiny_model,
                 "--dry_run")
    assert result.code == 0, result.err
    assert not (tmp_path / "out").exists()
    assert "[gMASK]<sop><|user|>\nWhat is APR?<|assistant|>⟦\nA yearly rate.<|endoftext|>⟧" in result.out
    assert "lengths (tokens):  p50" in result.out


def test_csv_parquet_several_files_and_renamed_columns(cli, tmp_path, tiny_model, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.csv").write_text("question,answer\nWhat is a bond?,A loan.\n\"Q, with comma\",A2\n",
                                    encoding="utf-8")
    pq.write_table(pa.Table.from_pylist([{"question": "Q3", "answer": "A3"}]), tmp_path / "b.parquet")
    result = cli("prepare", "--jsonl_path", tmp_path / "a.csv", tmp_path / "b.parquet", "--save_path",
                 tmp_path / "out", "--model", tiny_model, "--columns", "question=prompt,answer=completion")
    assert result.code == 0, result.err
    dataset = prepared(tmp_path / "out")
    assert [trained_texts(tokenizer, r) for r in dataset] == [["A loan."], ["A2"], ["A3"]]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert sorted(manifest["inputs"]) == sorted([str(tmp_path / "a.csv"), str(tmp_path / "b.parquet")])


def test_second_identical_run_reuses_the_cache_and_equals_the_first(cli, tmp_path, tiny_model):
    data = write_json(tmp_path / "data.json", [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(5)])
    base = ["prepare", "--jsonl_path", data, "--model", tiny_model]
    first = cli(*base, "--save_path", tmp_path / "a")
    second = cli(*base, "--save_path", tmp_path / "b")
    other_options = cli(*base, "--save_path", tmp_path / "c", "--train_on_prompt")
    assert "reused from the cache" not in first.out
    assert "reused from the cache" in second.out
    assert "reused from the cache" not in other_options.out
    assert prepared(tmp_path / "a").to_dict() == prepared(tmp_path / "b").to_dict()
    uncached = cli(*base, "--save_path", tmp_path / "d", "--use_cache", "false")
    assert "reused from the cache" not in uncached.out


def test_parallel_tokenizing_equals_serial(cli, tmp_path, tiny_model, shared):
    path = shared / "data" / "alpaca" / "alpaca_zh_demo.json"
    base = ["prepare", "--jsonl_path", path, "--model", tiny_model, "--use_cache", "false"]
    assert cli(*base, "--save_path", tmp_path / "serial").code == 0
    assert cli(*base, "--save_path", tmp_path / "parallel", "--num_proc", "2").code == 0
    serial, parallel = prepared(tmp_path / "serial"), prepared(tmp_path / "parallel")
    assert serial.to_dict() == parallel.to_dict()
    assert serial.features == parallel.features  # in this process without datasets.map, typed as map types them


@pytest.mark.parametrize("val_size, expected", [("0.25", 2), ("3", 3)])
def test_val_size_writes_a_validation_split(cli, tmp_path, tiny_model, val_size, expected):
    from datasets import load_from_disk

    data = write_json(tmp_path / "data.json", [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(8)])
    result = cli("prepare", "--jsonl_path", data, "--save_path", tmp_path / "out", "--model", tiny_model,
                 "--val_size", val_size)
    assert result.code == 0, result.err
    splits = load_from_disk(str(tmp_path / "out"))
    assert (len(splits["train"]), len(splits["validation"])) == (8 - expected, expected)
    rows = {tuple(r["input_ids"]) for r in splits["train"]} | {tuple(r["input_ids"]) for r in splits["validation"]}
    assert len(rows) == 8  # a partition: nothing lost, nothing doubled


def test_opening_assistant_turn_is_context_not_a_trained_answer(cli, tmp_path, tiny_model, tokenizer):
    row = {"conversations": [{"from": "gpt", "value": "Welcome!"}, {"from": "human", "value": "hi"},
                             {"from": "gpt", "value": "hello"}]}
    data = write_json(tmp_path / "data.json", [row])
    result = cli("prepare", "--jsonl_path", data, "--save_path", tmp_path / "out", "--model", tiny_model)
    assert result.code == 0, result.err
    assert trained_texts(tokenizer, prepared(tmp_path / "out")[0]) == ["hello"]


def test_a_row_the_template_refuses_is_dropped_and_counted(cli, tmp_path, tiny_model):
    from transformers import AutoTokenizer

    strict = tmp_path / "strict"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                               "{{ raise_exception('no system messages') }}{% endif %}"
                               "<|{{ m['role'] }}|>\n{{ m['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tokenizer.save_pretrained(strict)
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        (strict / name).write_bytes((tiny_model / name).read_bytes())
    data = write_json(tmp_path / "data.json", [{"instruction": "q", "output": "a"},
                                               {"instruction": "q", "output": "a", "system": "s"}])
    result = cli("prepare", "--jsonl_path", data, "--save_path", tmp_path / "out", "--model", strict)
    assert result.code == 0, result.err
    report = json.loads((tmp_path / "out" / "manifest.json").read_text())["report"]
    assert report["kept"] == 1 and report["dropped"] == {"refused by the chat template (no system messages)": 1}


def test_truncation_left_drops_a_row_whose_answer_alone_does_not_fit_and_counts_it(cli, tmp_path, tiny_model,
                                                                                   tokenizer):
    rows = [{"conversations": [{"from": "human", "value": "question"}, {"from": "gpt", "value": "word " * 200}]},
            {"conversations": [{"from": "human", "value": "question"}, {"from": "gpt", "value": "word"}]}]
    data = write_json(tmp_path / "data.json", rows)
    result = cli("prepare", "--jsonl_path", data, "--save_path", tmp_path / "out", "--model", tiny_model,
                 "--max_seq_length", "40", "--truncation", "left")
    assert result.code == 0, result.err
    (sample,) = prepared(tmp_path / "out")  # never the long answer cut at its end: it would not learn to stop
    assert tokenizer.decode(sample["input_ids"]) == "[gMASK]<sop><|user|>\nquestion<|assistant|>\nword<|endoftext|>"
    report = json.loads((tmp_path / "out" / "manifest.json").read_text())["report"]
    assert report["dropped"] == {"answer alone longer than --max_seq_length (--truncation left)": 1}


def test_truncation_left_drops_trailing_untrained_turns_before_answers(cli, tmp_path, tiny_model, tokenizer):
    row = {"conversations": [{"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"},
                             {"from": "human", "value": "pad " * 100}]}
    data = write_json(tmp_path / "data.json", [row])
    result = cli("prepare", "--jsonl_path", data, "--save_path", tmp_path / "out", "--model", tiny_model,
                 "--max_seq_length", "30", "--truncation", "left")
    assert result.code == 0, result.err
    assert trained_texts(tokenizer, prepared(tmp_path / "out")[0]) == ["a1"]


def test_skip_bad_rows_skips_malformed_json_lines_too(cli, tmp_path, tiny_model):
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "p1", "completion": "c1"}\n{"prompt": "p2", "compl\n'
                    '{"prompt": "p3", "completion": "c3"}\n', encoding="utf-8")
    result = cli("prepare", "--jsonl_path", data, "--save_path", tmp_path / "out", "--model", tiny_model,
                 "--skip_bad_rows")
    assert result.code == 0, result.err
    assert len(prepared(tmp_path / "out")) == 2
    (reject,) = [json.loads(line) for line in (tmp_path / "out.rejects.jsonl").read_text().splitlines()]
    assert reject["location"] == f"{data}:2" and reject["row"] == '{"prompt": "p2", "compl'
    assert "invalid JSON" in reject["problem"]
