"""glmtune orpo / simpo / kto: the preference methods beside DPO, on the same prepared pairs (tests/test_dpo.py's),
their learning signal, their outputs, their refusals."""

from __future__ import annotations

import json

import pytest
from test_dpo import ROWS, load_with_adapter, pairs  # noqa: F401  (pairs: the fixture, reused)


def tune(cli, command, data, out, *extra):
    return cli(command, "--dataset_path", data, "--output_dir", out, "--per_device_train_batch_size", ROWS,
               "--logging_steps", "1", "--precision", "fp32", "--save_strategy", "no", "--learning_rate", "2e-3",
               *extra)


def run_files(command: str) -> list[str]:
    return sorted(["README.md", "adapter_config.json", "adapter_model.safetensors", "chat_template.jinja",
                   f"{command}_config.yaml", "loss.png", "manifest.json", "tokenizer.json", "tokenizer_config.json",
                   "training_args.bin"])


def adapter_changes_the_logits(model_dir, run, data) -> bool:
    """Reloaded with peft onto the base: the adapter's logits differ from the base's on a prompt of the data."""
    import torch
    from datasets import load_from_disk

    model = load_with_adapter(model_dir, run)
    probe = torch.tensor([load_from_disk(str(data))["train"][0]["prompt_ids"]])
    with torch.no_grad():
        tuned = model(input_ids=probe).logits
        with model.disable_adapter():
            base = model(input_ids=probe).logits
    return (tuned - base).abs().max().item() > 1e-3


@pytest.mark.parametrize(("command", "own_metric"), [("orpo", "log_odds_ratio"), ("simpo", "nll_loss")])
def test_reference_free_methods_grow_the_margin_and_save_a_peft_adapter(cli, pairs, tmp_path, command,  # noqa: F811
                                                                        own_metric):
    model_dir, data, _ = pairs
    result = tune(cli, command, data, tmp_path / "run", "--max_steps", "6")
    assert result.code == 0, result.err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == run_files(command)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["command"] == command and manifest["global_step"] == 6
    assert manifest["reference"].startswith("none")
    first, last = manifest["first_logged_rewards"], manifest["last_logged_rewards"]
    assert {"rewards/margins", "rewards/accuracies", own_metric} <= set(last)
    # every pair in one batch: the first logged margin is the untrained model's, the last the tuned one's
    assert last["rewards/margins"] > max(first["rewards/margins"], 0), (first, last)
    assert last["rewards/accuracies"] >= 0.75, last
    assert f"'{own_metric}'" in result.out + result.err and "reward margin" in result.out
    assert adapter_changes_the_logits(model_dir, tmp_path / "run", data)


def test_simpo_defaults_are_simpo_s_loss_without_the_sft_term(cli, pairs, tmp_path):  # noqa: F811
    _, data, _ = pairs
    result = tune(cli, "simpo", data, tmp_path / "run", "--max_steps", "1")
    assert result.code == 0, result.err
    config = json.loads((tmp_path / "run" / "manifest.json").read_text())["config"]
    assert (config["loss_type"], config["cpo_alpha"], config["beta"], config["simpo_gamma"]) == ("simpo", 0.0, 2.0,
                                                                                                   1.0)


@pytest.mark.parametrize("command", ["orpo", "simpo"])
def test_reference_options_are_refused_by_methods_without_a_reference(cli, pairs, tmp_path, command):  # noqa: F811
    _, data, _ = pairs
    for option in (["--reference", "base"], ["--precompute_ref_log_probs", "true"]):
        result = tune(cli, command, data, tmp_path / "run", *option)
        assert result.code == 2 and option[0] in result.err, result.err
        assert not (tmp_path / "run").exists()


def test_kto_lifts_desirable_rewards_above_undesirable_ones_against_the_base(cli, pairs, tmp_path):  # noqa: F811
    model_dir, data, _ = pairs
    # the 5 pairs give 10 rows; batches of 10: every logged step sees every answer
    result = tune(cli, "kto", data, tmp_path / "run", "--max_steps", "6", "--per_device_train_batch_size", "10")
    assert result.code == 0, result.err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == run_files("kto")
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["command"] == "kto" and manifest["reference"] == "the base model without any adapter"
    first, last = manifest["first_logged_rewards"], manifest["last_logged_rewards"]
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "kl"} <= set(last)
    # at the first step the policy is the reference: every reward is 0; then the desirable ones rise above
    assert abs(first["rewards/margins"]) < 1e-4, first
    assert last["rewards/chosen"] > last["rewards/rejected"] and last["rewards/margins"] > 0.05, last
    assert "'kl'" in result.out + result.err and "reward margin" in result.out
    assert adapter_changes_the_logits(model_dir, tmp_path / "run", data)


def test_kto_rows_are_each_pair_s_answers_labelled_and_mismatched_for_the_kl_term():
    from glmtune.train.kto import mismatched_completions, unpaired_rows

    rows = unpaired_rows({"prompt_ids": [[1], [2]], "chosen_ids": [[10], [20]], "rejected_ids": [[11], [21]]})
    assert rows == {"prompt_ids": [[1], [1], [2], [2]], "completion_ids": [[10], [11], [20], [21]],
                    "label": [True, False, True, False]}
    # the nearest earlier answer to another prompt, never the same prompt's other answer
    assert mismatched_completions(rows)["KL_completion_ids"] == [[21], [21], [11], [11]]


def test_kto_refuses_a_batch_of_one_before_loading(cli, pairs, tmp_path):  # noqa: F811
    _, data, _ = pairs
    result = tune(cli, "kto", data, tmp_path / "run", "--per_device_train_batch_size", "1")
    assert result.code == 2 and "--per_device_train_batch_size 1" in result.err and "KL" in result.err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("command", "config"), [("kto", "trl:KTOConfig"), ("orpo", "trl.experimental.orpo:ORPOConfig"),
                                                 ("simpo", "trl.experimental.cpo:CPOConfig")])
def test_help_shows_each_method_s_trl_options_with_their_defaults(cli, command, config):
    import dataclasses
    import importlib

    module = importlib.import_module(f"glmtune.commands.{command}")
    result = cli(command, "--help")
    assert result.code == 0 and "--peft_path" in result.out and "--dataset_path" in result.out
    assert ("--reference" in result.out) == (command == "kto")
    module_name, class_name = config.split(":")
    fields = {f.name: f for f in dataclasses.fields(getattr(importlib.import_module(module_name), class_name))}
    options = next(v for k, v in vars(module).items() if k.startswith("COMMON_"))
    for name, default, _ in options:
        field = fields[name]
        assert default == (field.default_factory() if field.default is dataclasses.MISSING else field.default), name
        assert f"--{name}" in result.out
