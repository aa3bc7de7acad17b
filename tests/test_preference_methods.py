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
