"""glmtune grpo: the built-in rewards, the user's reward files and their errors, the prompts read from data files and
prepared datasets, and a short run on the tiny model (bench/grpo_reward.py shows the mean reward rising)."""

from __future__ import annotations

import json

import pytest
from conftest import write_json, write_jsonl

from glmtune.errors import UserError
from glmtune.train.rewards import (
    accuracy,
    answer_part,
    format_reward,
    guarded,
    length_reward,
    load_user_reward,
    normalise,
    reward_functions,
)

SUMS = [{"instruction": f"What is {a} plus {b}?", "input": "", "output": str(a + b)}
        for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]]

EVEN_IDS = '''
def even_ids(completion_ids, **kwargs):
    """The share of the completion's tokens whose id is even: a signal a tiny random model can learn."""
    return [sum(1 for i in ids if i % 2 == 0) / max(len(ids), 1) for ids in completion_ids]
'''


def test_the_answer_is_the_text_after_the_last_think_block():
    assert answer_part("<think>it is 3</think>\n 4 ") == "4"
    assert answer_part("no reasoning here ") == "no reasoning here"


@pytest.mark.parametrize(("answer", "reference"), [
    ("1,000.50", "1000.5"), ("+3", "3.0"), ("The  answer\nis 42.", "the answer is 42"), ("0.50", ".5")])
def test_numbers_case_whitespace_and_a_final_full_stop_are_normalised_away(answer, reference):
    assert normalise(answer) == normalise(reference)


def test_normalising_keeps_different_numbers_and_words_apart():
    assert normalise("3.01") != normalise("3.1")
    assert normalise("10") != normalise("100")
    assert normalise("cat") != normalise("cats")


def test_accuracy_compares_the_answer_after_thinking_with_the_reference():
    completions = ["<think>7 + 8</think>15", "<think>maybe 16</think> 16", "15.0", "fifteen"]
    assert accuracy(completions=completions, reference=["15"] * 4) == [1.0, 0.0, 1.0, 0.0]
    assert accuracy(completions=["15"], reference=[None]) == [None]


def test_format_wants_reasoning_in_a_think_block_then_an_answer():
    prompts = ["<|assistant|>"] * 5
    completions = ["<think>add them</think>15", "\n<think>x</think>\n\n15", "15", "<think>add them</think>  ",
                   "<think></think>15"]
    assert format_reward(prompts=prompts, completions=completions) == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_format_counts_a_think_block_the_generation_prompt_opened():
    assert format_reward(prompts=["<|assistant|>\n<think>"], completions=["add them</think>15"]) == [1.0]


def test_length_rewards_closeness_to_the_target_in_tokens():
    length = length_reward(4)
    assert length(completion_ids=[[1] * 4, [1] * 2, [1] * 6, [1] * 8, []]) == [1.0, 0.5, 0.5, 0.0, 0.0]


def test_built_in_rewards_are_logged_under_their_names(tmp_path):
    (tmp_path / "mine.py").write_text(EVEN_IDS)
    functions = reward_functions(f"accuracy, format,length,{tmp_path / 'mine.py'}:even_ids", length_target=8)
    assert [f.__name__ for f in functions] == ["accuracy", "format", "length", "even_ids"]
    assert functions[3](prompts=["p"], completions=["c"], completion_ids=[[2, 4, 5, 7]]) == [0.5]


def test_a_user_reward_file_that_is_missing_or_lacks_the_function_is_refused(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_user_reward(f"{tmp_path / 'absent.py'}:score")
    (tmp_path / "mine.py").write_text(EVEN_IDS)
    with pytest.raises(UserError, match="has no function 'score'") as error:
        load_user_reward(f"{tmp_path / 'mine.py'}:score")
    assert "even_ids" in error.value.hint
    (tmp_path / "broken.py").write_text("import no_such_module_here\n")
    with pytest.raises(UserError, match="importing .*broken.py failed: ModuleNotFoundError"):
        load_user_reward(f"{tmp_path / 'broken.py'}:score")
    with pytest.raises(UserError, match="neither a built-in reward"):
        reward_functions("acuracy", length_target=8)
    with pytest.raises(UserError, match="--reward_funcs is required"):
        reward_functions("", length_target=8)


def test_a_reward_function_that_raises_is_named_with_the_first_row_it_fails_on():
    def picky(completions, reference, **_):
        return [1.0 / (int(ref) - 11) for ref in reference]  # raises on the row whose reference is 11

    batch = {"prompts": ["a", "b", "c"], "completions": ["x", "y", "z"], "completion_ids": [[1], [2], [3]],
             "reference": ["3", "11", "7"], "location": ["data.json row 1", "data.json row 2", "data.json row 3"]}
    with pytest.raises(UserError) as error:
        guarded(picky, "picky", "rewards.py:picky")(**batch)
    text = error.value.render()
    assert "reward function rewards.py:picky raised ZeroDivisionError" in text
    assert "data.json row 2" in text and "'y'" in text and "Traceback" not in text


@pytest.mark.parametrize(("result", "message"), [
    ([1.0, 2.0], "returned 2 values for 3 completions"), (0.5, "returned float, not a list"),
    ([1.0, "good", 0.0], "returned 'good'")])
def test_a_reward_function_returning_the_wrong_values_is_refused(result, message):
    with pytest.raises(UserError, match=message):
        guarded(lambda **_: result, "bad", "bad.py:bad")(prompts=["a"] * 3, completions=["x"] * 3)


def test_none_and_numpy_numbers_are_accepted_as_rewards():
    import numpy as np

    assert guarded(lambda **_: [np.float32(0.5), None, True], "ok", "ok")(completions=["x"] * 3) == [0.5, None, 1.0]


def test_prompts_are_rendered_with_the_generation_prompt_and_keep_their_reference(tiny_model, tokenizer, tmp_path):
    from glmtune.data.conversation import Conversation, Message
    from glmtune.data.templates import encode_prompt
    from glmtune.train.grpo_data import rows_from_file

    data = write_jsonl(tmp_path / "rows.jsonl", [
        {"messages": [{"role": "user", "content": "Say <|user|> once"}, {"role": "assistant", "content": "ok"},
                      {"role": "user", "content": "And 1 plus 1?"}, {"role": "assistant", "content": " 2 "}]},
        {"messages": [{"role": "user", "content": "No answer here"}]}])
    rows = rows_from_file(tokenizer, str(data), None, None)
    expected = encode_prompt(tokenizer, Conversation([Message("user", "Say <|user|> once"),
                                                      Message("assistant", "ok"), Message("user", "And 1 plus 1?")]))
    assert rows[0]["prompt_ids"] == expected  # control-token text stays text: encode_prompt's ids, not re-tokenized
    assert rows[0]["prompt"].endswith("<|assistant|>") and rows[0]["reference"] == "2"
    assert rows[1]["reference"] is None and rows[1]["location"] == f"{data}:2"


def test_a_prepared_dataset_gives_the_prompts_and_references_of_its_data_file(cli, tiny_model, tokenizer, tmp_path):
    from glmtune.models.loading import stop_token_ids
    from glmtune.train.grpo_data import rows_from_file, rows_from_prepared

    data = write_json(tmp_path / "sums.json", SUMS)
    assert cli("prepare", "--data", data, "--model", tiny_model, "--save_path", tmp_path / "prepared").code == 0
    prepared = rows_from_prepared(tokenizer, stop_token_ids(str(tiny_model), tokenizer), tmp_path / "prepared")
    direct = rows_from_file(tokenizer, str(data), None, None)
    assert [(r["prompt_ids"], r["reference"]) for r in prepared] == [(r["prompt_ids"], r["reference"])
                                                                     for r in direct]
    result = cli("grpo", "--dataset_path", tmp_path / "prepared", "--output_dir", tmp_path / "run", "--reward_funcs",
                 "accuracy", "--enable_thinking", "false")
    assert result.code == 2 and "--enable_thinking" in result.err and "prepared dataset" in result.err


def grpo(cli, model, data, out, *extra):
    return cli("grpo", "--model", model, "--dataset_path", data, "--output_dir", out, "--num_generations", "4",
               "--max_completion_length", "6", "--per_device_train_batch_size", "8", "--logging_steps", "1",
               "--precision", "fp32", "--save_strategy", "no", "--learning_rate", "2e-2", *extra)


def test_accuracy_is_refused_on_prompts_without_a_reference_before_loading(cli, tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Hi"}, {"prompt": "Hello", "response": "Hi"}])
    result = grpo(cli, tiny_model, data, tmp_path / "run", "--reward_funcs", "accuracy", "--max_steps", "1")
    assert result.code == 2 and "1 row(s) have no reference answer" in result.err and "prompts.jsonl:1" in result.err
    assert not (tmp_path / "run").exists()


def test_a_short_run_logs_every_reward_and_saves_a_trained_peft_adapter(cli, tiny_model, tmp_path):
    from safetensors.torch import load_file

    (tmp_path / "mine.py").write_text(EVEN_IDS)
    data = write_json(tmp_path / "sums.json", SUMS)
    result = grpo(cli, tiny_model, data, tmp_path / "run", "--max_steps", "2",
                  "--reward_funcs", f"accuracy,format,length,{tmp_path / 'mine.py'}:even_ids",
                  "--reward_weights", "0,0,0.5,1")
    assert result.code == 0, result.err
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["command"] == "grpo" and manifest["global_step"] == 2 and manifest["prompts"] == 4
    assert manifest["reward_funcs"] == ["accuracy", "format", "length", "even_ids"]
    assert manifest["config"]["reward_weights"] == [0.0, 0.0, 0.5, 1.0] and manifest["config"]["length_target"] == 3
    first, last = manifest["first_logged_rewards"], manifest["last_logged_rewards"]
    for logged in (first, last):
        assert {"reward", "rewards/accuracy/mean", "rewards/format/mean", "rewards/length/mean",
                "rewards/even_ids/mean"} <= set(logged)
        assert 0 < logged["rewards/even_ids/mean"] < 1  # spread within the groups: the advantages are not all 0
    assert "mean reward" in result.out
    weights = load_file(str(tmp_path / "run" / "adapter_model.safetensors"))
    assert any(t.abs().max() > 0 for k, t in weights.items() if "lora_B" in k)  # lora_B starts at zero


def test_a_reward_function_raising_during_training_stops_the_run_with_its_name_and_row(cli, tiny_model, tmp_path):
    (tmp_path / "mine.py").write_text("def picky(completions, reference, **kwargs):\n"
                                      "    return [1.0 / (int(ref) - 11) for ref in reference]\n")
    data = write_json(tmp_path / "sums.json", SUMS)  # 5 + 6 = 11
    result = grpo(cli, tiny_model, data, tmp_path / "run", "--max_steps", "2",  # an epoch: every row
                  "--reward_funcs", f"{tmp_path / 'mine.py'}:picky")
    assert result.code == 2, result.err
    assert "reward function" in result.err and "picky raised ZeroDivisionError" in result.err
    assert "sums.json row 2" in result.err and "Traceback" not in result.err


def test_help_shows_the_grpo_options_with_glmtune_s_defaults_over_trl_s(cli):
    import dataclasses

    from trl import GRPOConfig

    from glmtune.commands.grpo import COMMON_GRPO_OPTIONS, GRPO_DEFAULTS

    result = cli("grpo", "--help")
    assert result.code == 0 and "--reward_funcs" in result.out and "--peft_path" in result.out
    fields = {f.name: f for f in dataclasses.fields(GRPOConfig)}
    for name, default, _ in COMMON_GRPO_OPTIONS:
        field = fields[name]
        assert default == (field.default_factory() if field.default is dataclasses.MISSING else field.default), name
        shown = " ".join(result.out.split())  # the help's lines joined as one
        assert f"--{name}" in shown, name
        assert default is None or f"default: {GRPO_DEFAULTS.get(name, default)})" in shown, name


def test_reward_weights_are_read_from_one_comma_separated_value_or_a_list():
    from glmtune.train.grpo import parse_weights

    assert parse_weights("1,0.5") == parse_weights(["1", "0.5"]) == parse_weights([1, 0.5]) == [1.0, 0.5]
    with pytest.raises(UserError, match="--reward_weights"):
        parse_weights(["1,heavy"])


def test_options_grpo_does_not_take_are_refused_before_loading(cli, tiny_model, tmp_path):
    data = write_json(tmp_path / "sums.json", SUMS)
    result = grpo(cli, tiny_model, data, tmp_path / "run", "--reward_funcs", "format", "--eval_strategy", "steps")
    assert result.code == 2 and "--eval_strategy steps" in result.err
    result = grpo(cli, tiny_model, data, tmp_path / "run", "--reward_funcs", "format,length", "--reward_weights", "1")
    assert result.code == 2 and "1 weights for 2 reward functions (format, length)" in result.err
    result = grpo(cli, tiny_model, tmp_path / "absent.json", tmp_path / "run", "--reward_funcs", "format")
    assert result.code == 2 and "no such file" in result.err
    result = grpo(cli, tiny_model, data, tmp_path / "run", "--reward_funcs", f"{tmp_path / 'absent.py'}:f")
    assert result.code == 2 and "absent.py does not exist" in result.err
    assert not (tmp_path / "run").exists()
