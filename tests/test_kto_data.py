"""Labelled rows for glmtune kto: read in prepare's formats, rendered by the same templates, trained on by KTO, and
refused where they are wrong or where a command cannot use them."""

from __future__ import annotations

import json

import pytest
from conftest import write_json, write_jsonl
from test_dpo import load_with_adapter, pairs  # noqa: F401  (pairs: the fixture, reused)
from test_preference_methods import tune


def labelled_rows(rows: list[dict]) -> list[dict]:
    """Each shared preference pair as two labelled rows in TRL's unpaired form: the chosen answer true, the rejected
    one false."""
    out = []
    for row in rows:
        prompt = row["conversations"][0]["value"]
        out += [{"prompt": prompt, "completion": row["chosen"]["value"], "label": True},
                {"prompt": prompt, "completion": row["rejected"]["value"], "label": False}]
    return out


@pytest.fixture(scope="module")
def labelled(pairs, tmp_path_factory):  # noqa: F811
    """The pairs fixture's rows as labelled rows, prepared with the same tiny GLM and length."""
    from glmtune.cli import main

    model_dir, _, rows = pairs
    tmp = tmp_path_factory.mktemp("kto_data")
    source = write_jsonl(tmp / "labelled.jsonl", labelled_rows(rows))
    assert main(["prepare", "--jsonl_path", str(source), "--save_path", str(tmp / "data"), "--model", str(model_dir),
                 "--max_seq_length", "96"]) == 0
    return model_dir, tmp / "data", source


def test_labelled_rows_prepare_to_the_template_rendering_of_prompt_answer_and_stop(labelled):
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    model_dir, data, source = labelled
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    eos = tokenizer.eos_token_id
    rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines()]
    prepared = load_from_disk(str(data))["train"]
    assert prepared.column_names == ["prompt_ids", "completion_ids", "label"]
    expected = []
    for row in rows:
        # The tiny GLM's template: "<|assistant|>" ends the prompt; the answer is "\n" + text, then the end token.
        prompt = tokenizer.encode(f"[gMASK]<sop><|user|>\n{row['prompt']}<|assistant|>", add_special_tokens=False)
        answer = tokenizer.encode("\n" + row["completion"], add_special_tokens=False) + [eos]
        if len(prompt) < 96:  # the others leave no room for an answer token, and are dropped
            expected.append({"prompt_ids": prompt, "completion_ids": answer[:96 - len(prompt)], "label": row["label"]})
    assert 0 < len(expected) < len(rows) and prepared.to_list() == expected  # --truncation right cuts the answers
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["kind"] == "labelled" and manifest["preference"] is True
    desirable = sum(row["label"] for row in expected)
    assert (manifest["report"]["desirable"], manifest["report"]["undesirable"]) == (desirable,
                                                                                  len(expected) - desirable)


def test_messages_sharegpt_alpaca_and_csv_rows_read_as_the_same_labelled_rows(tmp_path):
    from glmtune.data.prepare import load_data

    expected = [("q?", "a.", True), ("q?", "b.", False)]
    forms = {
        "messages.json": [{"messages": [{"role": "user", "content": "q?"}, {"role": "assistant", "content": a}],
                           "label": label} for _, a, label in expected],
        "sharegpt.json": [{"conversations": [{"from": "human", "value": "q?"}, {"from": "gpt", "value": a}],
                           "label": label} for _, a, label in expected],
        "alpaca.json": [{"instruction": "q?", "output": a, "label": label} for _, a, label in expected],
        "trl_conversational.json": [{"prompt": [{"role": "user", "content": "q?"}],
                                     "completion": [{"role": "assistant", "content": a}], "label": label}
                                    for _, a, label in expected],
    }
    paths = [write_json(tmp_path / name, rows) for name, rows in forms.items()]
    csv = tmp_path / "rows.csv"
    csv.write_text("prompt,completion,label\nq?,a.,true\nq?,b.,FALSE\n", encoding="utf-8")
    for path in [*paths, csv]:
        data = load_data([str(path)], None)
        assert data.format == "labelled", path
        got = [(c.messages[0].content, c.messages[-1].content, c.label) for c in data.conversations]
        assert got == expected, path
        assert all(c.messages[-1].train and not c.messages[0].train for c in data.conversations)


def test_only_the_last_answer_of_a_labelled_conversation_is_judged(tmp_path):
    from glmtune.data.prepare import load_data

    row = {"messages": [{"role": "user", "content": "1"}, {"role": "assistant", "content": "one"},
                        {"role": "user", "content": "2"}, {"role": "assistant", "content": "three"}], "label": False}
    (conversation,) = load_data([str(write_json(tmp_path / "rows.json", [row]))], None).conversations
    assert [m.train for m in conversation.messages] == [False, False, False, True]


def test_bad_labelled_rows_are_named_with_file_and_line(cli, pairs, tmp_path):  # noqa: F811
    model_dir, _, _ = pairs
    rows = [{"prompt": "q", "completion": "a", "label": True},
            {"prompt": "q", "completion": "b"},
            {"prompt": "q", "completion": "c", "label": 1},
            {"prompt": "q", "completion": "d", "label": "yes"},
            {"completion": "e", "label": False},
            {"prompt": "q", "label": False},
            {"messages": [{"role": "user", "content": "q"}], "label": True}]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    result = cli("prepare", "--jsonl_path", path, "--save_path", tmp_path / "out", "--model", model_dir)
    assert result.code == 2 and "6 bad row(s)" in result.err, result.err
    for line, problem in ((2, "field 'label' is missing"),
                          (3, "field 'label': expected true (a desirable answer) or false (an undesirable one), "
                              "found a number (1)"),
                          (4, "field 'label': expected true"),
                          (5, "field 'prompt' is missing"),
                          (6, "field 'completion' is missing"),
                          (7, "field 'messages': expected the assistant's answer last")):
        assert f"{path}:{line}: {problem}" in result.err, (line, result.err)
    assert not (tmp_path / "out").exists()


def test_a_labelled_dataset_of_one_kind_is_refused_and_an_unbalanced_one_gets_weights(cli, pairs, tmp_path):  # noqa: F811
    model_dir, _, _ = pairs
    only_good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "q", "completion": a, "label": True} for a in "ab"])
    result = cli("prepare", "--jsonl_path", only_good, "--save_path", tmp_path / "out", "--model", model_dir)
    assert result.code == 2 and "2 desirable and 0 undesirable" in result.err and "KTO needs both" in result.err
    assert not (tmp_path / "out").exists()
    # 6 desirable, 2 undesirable: equal weights give 3:1; desirable_weight in [1/3, 4/9] (or undesirable in [2.25, 3])
    skewed = write_jsonl(tmp_path / "skewed.jsonl", [{"prompt": "q", "completion": a, "label": a < "g"}
                                                     for a in "abcdefgh"])
    result = cli("prepare", "--jsonl_path", skewed, "--save_path", tmp_path / "out", "--model", model_dir)
    assert result.code == 0, result.err
    assert "labels:            6 desirable, 2 undesirable" in result.out
    assert "--desirable_weight in [0.333, 0.444] or --undesirable_weight in [2.25, 3]" in result.out


def test_weight_advice_follows_kto_s_recommended_ratio():
    from glmtune.data.labelled import weight_advice

    assert weight_advice(10, 10) is None and weight_advice(12, 10) is None  # 1.2:1 is inside [1, 4/3]
    assert weight_advice(10, 30, desirable_weight=3.0) is None
    advice = weight_advice(10, 30)  # 1:3 with equal weights: desirable_weight 3 to 4 brings it in
    assert advice is not None and "--desirable_weight in [3, 4]" in advice and "[0.25, 0.333]" in advice


def test_kto_on_labelled_rows_lifts_desirable_rewards_above_undesirable_ones(cli, labelled, tmp_path):
    model_dir, data, _ = labelled
    result = tune(cli, "kto", data, tmp_path / "run", "--max_steps", "6", "--per_device_train_batch_size", "16")
    assert result.code == 0, result.err
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    first, last = manifest["first_logged_rewards"], manifest["last_logged_rewards"]
    assert abs(first["rewards/margins"]) < 1e-4, first  # the policy starts as the reference
    assert last["rewards/chosen"] > last["rewards/rejected"] and last["rewards/margins"] > 0.05, last
    assert load_with_adapter(model_dir, tmp_path / "run") is not None


def test_kto_takes_a_labelled_data_file_and_dpo_and_train_refuse_labelled_rows(cli, labelled, tmp_path):
    model_dir, data, source = labelled
    result = tune(cli, "kto", source, tmp_path / "run", "--model", model_dir, "--max_steps", "1",
                  "--max_seq_length", "96")
    assert result.code == 0, result.err
    for command in ("dpo", "orpo"):
        refused = tune(cli, command, data, tmp_path / command, "--max_steps", "1")
        assert refused.code == 2 and "holds rows labelled desirable or not" in refused.err, refused.err
        assert "glmtune kto" in refused.err and not (tmp_path / command).exists()
    refused = cli("train", "--dataset_path", data, "--output_dir", tmp_path / "sft", "--max_steps", "1")
    assert refused.code == 2 and "`glmtune train` trains on one answer per row" in refused.err, refused.err
    assert not (tmp_path / "sft").exists()


def test_truncation_left_keeps_a_labelled_answer_whole(cli, pairs, tmp_path):  # noqa: F811
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    model_dir, _, rows = pairs
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    long_prompt = " ".join(r["conversations"][0]["value"] for r in rows)
    answers = [rows[0]["chosen"]["value"][:40], rows[0]["rejected"]["value"][:40]]
    path = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": long_prompt, "completion": a, "label": i == 0}
                                                 for i, a in enumerate(answers)])
    result = cli("prepare", "--jsonl_path", path, "--save_path", tmp_path / "out", "--model", model_dir,
                 "--max_seq_length", "48", "--truncation", "left")
    assert result.code == 0, result.err
    prepared = load_from_disk(str(tmp_path / "out"))["train"]
    for row, answer in zip(prepared, answers, strict=True):
        assert len(row["prompt_ids"]) + len(row["completion_ids"]) <= 48
        assert row["completion_ids"] == tokenizer.encode("\n" + answer, add_special_tokens=False) + [
            tokenizer.eos_token_id]
        assert tokenizer.decode(row["prompt_ids"]).startswith("[gMASK]<sop><|user|>")  # the template's start stays


def test_kto_refuses_a_training_split_of_one_label_and_warns_on_unbalanced_weights(caplog):
    from types import SimpleNamespace

    from glmtune.errors import UserError
    from glmtune.train.kto import check_balance

    args = SimpleNamespace(desirable_weight=1.0, undesirable_weight=1.0)  # the KTOConfig fields it reads
    with pytest.raises(UserError, match="0 desirable and 3 undesirable"):
        check_balance([False, False, False], args)
    with caplog.at_level("WARNING", logger="glmtune.train.kto"):
        check_balance([True, True, True, False], args)
    assert "3 desirable and 1 undesirable training rows" in caplog.text and "--undesirable_weight in [2.25, 3]" in \
        caplog.text
    caplog.clear()
    check_balance([True, True, True, False], SimpleNamespace(desirable_weight=1.0, undesirable_weight=2.5))
    assert caplog.text == ""


def test_labelled_rows_and_pairs_in_one_dataset_are_refused(cli, pairs, tmp_path):  # noqa: F811
    model_dir, _, rows = pairs
    pairs_file = write_json(tmp_path / "pairs.json", rows[:2])
    labelled_file = write_jsonl(tmp_path / "labelled.jsonl", labelled_rows(rows[:1]))
    result = cli("prepare", "--jsonl_path", pairs_file, labelled_file, "--save_path", tmp_path / "out", "--model",
                 model_dir)
    assert result.code == 2 and "mixes 2 preference pairs (chosen/rejected) and 2 labelled rows" in result.err
