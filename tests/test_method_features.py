"""Issue 18's item 5 for kto, orpo, simpo, grpo and the full / freeze tuning types: YAML configs and resume, quantized
bases, packing and the chunked loss where the loss allows them, and clear refusals where it does not (see
docs/commands/preference-methods.md#what-each-method-takes for the table; the launchers are
tests/test_method_launchers.py's)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml
from conftest import adapter_difference, cut_short_copy, write_json
from test_dpo import pairs  # noqa: F401  (the fixture, reused)
from test_grpo import EVEN_IDS, SUMS

PREFERENCE = ["kto", "orpo", "simpo"]
GRPO_FLAGS = ["--num_generations", "4", "--max_completion_length", "6", "--per_device_train_batch_size", "8",
              "--reward_funcs", "length"]


def write_config(path, options: dict) -> str:
    path.write_text(yaml.safe_dump(options), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("command", PREFERENCE)
def test_a_preference_run_from_a_yaml_config_resumes_to_the_uninterrupted_adapter(cli, pairs, tmp_path,  # noqa: F811
                                                                                  command):
    """The YAML file sets the run, a flag overrides one of its values, the resolved config is saved; a run whose last
    checkpoint was cut short by a kill resumes from the one before (mid-epoch) to the uninterrupted run's adapter."""
    _, data, _ = pairs
    config = write_config(tmp_path / f"{command}.yaml", {
        "dataset_path": str(data), "max_steps": 4, "save_strategy": "steps", "save_steps": 2,
        "per_device_train_batch_size": 2, "learning_rate": 1e-3, "beta": 0.2, "logging_steps": 1,
        "precision": "fp32", "disable_tqdm": True})

    def run(output_dir, *extra):
        result = cli(command, "--config", config, "--output_dir", output_dir, "--learning_rate", "2e-3", *extra)
        assert result.code == 0, result.err
        return result

    run(tmp_path / "full")
    resolved = yaml.safe_load((tmp_path / "full" / f"{command}_config.yaml").read_text())
    assert resolved["beta"] == 0.2 and resolved["learning_rate"] == 2e-3  # from the file; the flag over the file
    cut = tmp_path / "cut"
    cut_short_copy(tmp_path / "full", (2, 4), cut, "trainer state cut short")
    result = run(cut, "--resume_from_checkpoint", "true")
    assert "resuming from checkpoint-2" in result.err
    assert json.loads((cut / "manifest.json").read_text())["global_step"] == 4
    assert adapter_difference(tmp_path / "full", cut) <= 1e-6


def test_a_grpo_run_from_a_yaml_config_resumes_to_the_uninterrupted_adapter(cli, tiny_model, tmp_path):
    """Generation samples from the random state the checkpoint restores: the resumed run draws the same completions,
    so it ends on the uninterrupted run's adapter."""
    prompts = write_json(tmp_path / "sums.json", SUMS)
    (tmp_path / "mine.py").write_text(EVEN_IDS)  # a reward spread within each group: the adapter moves
    config = write_config(tmp_path / "grpo.yaml", {
        "model": str(tiny_model), "dataset_path": str(prompts), "num_generations": 4, "max_completion_length": 6,
        "per_device_train_batch_size": 8, "reward_funcs": f"{tmp_path / 'mine.py'}:even_ids", "max_steps": 3,
        "save_strategy": "steps", "save_steps": 1, "learning_rate": 2e-2, "logging_steps": 1, "precision": "fp32",
        "disable_tqdm": True})

    def run(output_dir, *extra):
        result = cli("grpo", "--config", config, "--output_dir", output_dir, "--temperature", "1.5", *extra)
        assert result.code == 0, result.err
        return result

    run(tmp_path / "full")
    manifest = json.loads((tmp_path / "full" / "manifest.json").read_text())
    assert manifest["config"]["temperature"] == 1.5 and manifest["config"]["num_generations"] == 4
    cut = tmp_path / "cut"
    cut_short_copy(tmp_path / "full", (1, 2), cut, "trainer state missing")  # 2 prompts a step: mid-epoch
    result = run(cut, "--resume_from_checkpoint", "true")
    assert "resuming from checkpoint-1" in result.err
    assert json.loads((cut / "manifest.json").read_text())["global_step"] == 3
    assert adapter_difference(tmp_path / "full", cut) <= 1e-6


@pytest.mark.parametrize("command", [*PREFERENCE, "grpo"])
@pytest.mark.parametrize(("given", "message"), [
    (["--packing", "true"], "does not pack"),
    (["--chunked_loss", "false"], "the chunked loss is glmtune train's cross-entropy"),
    ("yaml", "does not pack"),
])
def test_train_s_packing_and_chunked_loss_are_refused_with_the_reason(cli, tiny_model, tmp_path, command, given,
                                                                      message):
    if given == "yaml":
        given = ["--config", write_config(tmp_path / "run.yaml", {"packing": True})]
    data = write_json(tmp_path / "sums.json", SUMS)
    result = cli(command, "--model", tiny_model, "--dataset_path", data, "--output_dir", tmp_path / "run", *given)
    assert result.code == 2 and f"error: --{'packing' if 'pack' in message else 'chunked_loss'}: " in result.err
    assert message in result.err and "hint:" in result.err and "unrecognized" not in result.err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", [*PREFERENCE, "grpo"])
def test_liger_losses_without_liger_kernel_are_refused_before_loading(cli, tiny_model, tmp_path, command):
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is not None:
        pytest.skip("liger-kernel is installed here")
    data = write_json(tmp_path / "sums.json", SUMS)
    extra = GRPO_FLAGS if command == "grpo" else ["--per_device_train_batch_size", "2"]
    result = cli(command, "--model", tiny_model, "--dataset_path", data, "--output_dir", tmp_path / "run", *extra,
                 "--use_liger_kernel", "true")
    assert result.code == 2 and "--use_liger_kernel" in result.err and "liger-kernel package" in result.err
    assert not (tmp_path / "run").exists()


def test_grpo_refuses_both_ways_of_sizing_a_generation_batch(cli, tiny_model, tmp_path):
    data = write_json(tmp_path / "sums.json", SUMS)
    config = write_config(tmp_path / "run.yaml", {"steps_per_generation": 2})
    for both in (["--generation_batch_size", "16", "--steps_per_generation", "2"],
                 ["--config", config, "--generation_batch_size", "16"]):
        result = cli("grpo", "--model", tiny_model, "--dataset_path", data, "--output_dir", tmp_path / "run",
                     *GRPO_FLAGS, *both)
        assert result.code == 2, result.err
        assert "--generation_batch_size and --steps_per_generation both given" in result.err
    assert not (tmp_path / "run").exists()


def test_grpo_config_copies_keep_their_batch():
    """The precision step copies the resolved config (dataclasses.replace), which holds both values, one derived by
    TRL (which refuses both given): the copy keeps them."""
    from glmtune.train.grpo import GlmtuneGRPOConfig

    config = GlmtuneGRPOConfig(output_dir="out", per_device_train_batch_size=4, num_generations=4,
                               steps_per_generation=2, report_to="none", bf16=False)
    assert config.generation_batch_size == 8
    copy = dataclasses.replace(config, seed=7)
    assert (copy.generation_batch_size, copy.steps_per_generation) == (8, 2)


@pytest.mark.parametrize("finetuning_type", ["full", "freeze"])
def test_full_and_freeze_train_the_same_weights_packed_with_the_chunked_loss_as_padded_with_whole_logits(
        cli, tiny_model, demo_rows, tmp_path, finetuning_type):
    """train's defaults (--packing true, --chunked_loss true; a trained output layer under full tuning) against the
    plain path (padded batches, the whole logits), on 8 rows, each step's batch: the same losses, and the same weights
    after 3 steps to fp32 rounding (plain SGD: Adam's first steps would turn rounding-level gradient differences of
    near-zero gradients into whole learning-rate steps)."""
    from safetensors.torch import load_file

    rows = write_json(tmp_path / "rows.json", demo_rows[:8])
    assert cli("prepare", "--jsonl_path", rows, "--save_path", tmp_path / "data", "--model", tiny_model).code == 0
    flags = ["--max_steps", "3", "--per_device_train_batch_size", "8", "--optim", "sgd", "--learning_rate", "0.1",
             "--save_strategy",
             "no", "--logging_steps", "1", "--precision", "fp32", "--finetuning_type", finetuning_type,
             "--freeze_trainable_layers", "1"]
    for name, switch in (("packed", "true"), ("padded", "false")):
        result = cli("train", "--dataset_path", tmp_path / "data", "--output_dir", tmp_path / name, *flags,
                     "--packing", switch, "--chunked_loss", switch)
        assert result.code == 0, result.err
    manifest = json.loads((tmp_path / "packed" / "manifest.json").read_text())
    assert manifest["config"]["packing"] is True and manifest["config"]["chunked_loss"] is True
    assert manifest["config"]["attention"] == "glmtune_packed_sdpa"
    padded_loss = json.loads((tmp_path / "padded" / "manifest.json").read_text())["train_loss"]
    assert manifest["train_loss"] == pytest.approx(padded_loss, abs=1e-5)
    packed, padded = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("packed", "padded"))
    base = load_file(str(tiny_model / "model.safetensors"))
    moved = {k for k in base if not (packed[k] == base[k]).all()}
    assert moved == (set(base) if finetuning_type == "full" else {k for k in base if k.startswith("model.layers.3.")})
    assert max((packed[k] - padded[k]).abs().max().item() for k in packed) < 1e-5


def test_grpo_evaluates_on_a_prepared_validation_split_and_refuses_evaluation_without_one(cli, tiny_model, tmp_path):
    """TRL's GRPOTrainer scores completions to the validation prompts as it does the training ones (eval_reward);
    a data file, or a prepared dataset without a validation split, has no validation prompts."""
    prompts = write_json(tmp_path / "sums.json", SUMS)
    for name, split in (("split", ["--val_size", "2"]), ("whole", [])):
        assert cli("prepare", "--jsonl_path", prompts, "--save_path", tmp_path / name, "--model", tiny_model,
                   *split).code == 0
    evaluate = [*GRPO_FLAGS, "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4",
                "--eval_strategy", "steps", "--eval_steps", "1", "--max_steps", "2", "--logging_steps", "1",
                "--precision", "fp32", "--save_strategy", "no"]
    result = cli("grpo", "--dataset_path", tmp_path / "split", "--output_dir", tmp_path / "run", *evaluate)
    assert result.code == 0, result.err
    assert "2 prompts from" in result.err and "2 to evaluate on" in result.err
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert {"eval_reward", "eval_rewards/length/mean"} <= set(manifest["eval_metrics"])
    for data, message in ((tmp_path / "whole", "has no `validation` split"), (prompts, "is a data file")):
        result = cli("grpo", "--model", tiny_model, "--dataset_path", data, "--output_dir", tmp_path / "refused",
                     *evaluate)
        assert result.code == 2 and "--eval_strategy" in result.err and message in result.err, result.err
    assert not (tmp_path / "refused").exists()


@pytest.mark.parametrize(("command", "bits"), [*((c, 4) for c in [*PREFERENCE, "grpo"]),
                                               *((c, 8) for c in ["dpo", *PREFERENCE, "grpo"])])
def test_each_method_trains_a_lora_adapter_on_a_quantized_base(cli, pairs, tiny_model, tmp_path,  # noqa: F811
                                                                command, bits):
    """bitsandbytes' CPU backend trains LoRA on 8-bit and 4-bit bases (dpo's 4-bit run is tests/test_dpo.py's)."""
    from safetensors.torch import load_file

    pytest.importorskip("bitsandbytes")
    if command == "grpo":
        data = write_json(tmp_path / "sums.json", SUMS)
        extra = ["--model", tiny_model, *GRPO_FLAGS]
    else:
        data, extra = pairs[1], ["--per_device_train_batch_size", "2"]
    result = cli(command, "--dataset_path", data, "--output_dir", tmp_path / "run", *extra, "--max_steps", "2",
                 "--logging_steps", "1", "--save_strategy", "no", "--quantization_bit", str(bits))
    assert result.code == 0, result.err
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["config"]["quantization"]["bits"] == bits and manifest["global_step"] == 2
    adapter = load_file(str(tmp_path / "run" / "adapter_model.safetensors"))
    # Gradients reached it (B starts at 0); not grpo's: its completions all run to the 6-token limit here, so the
    # length reward gives a group no spread, no advantage, no gradient.
    assert command == "grpo" or any(t.abs().max() > 0 for k, t in adapter.items() if "lora_B" in k)


@pytest.mark.parametrize("finetuning_type", ["full", "freeze"])
def test_full_and_freeze_runs_resume_to_the_uninterrupted_weights(cli, tiny_model, tmp_path, finetuning_type):
    """The checkpoint holds the model's trained weights and their optimizer state: a run resumed from its step-2
    checkpoint (mid-epoch) ends with the weights of the run never interrupted."""
    from safetensors.torch import load_file

    rows = write_json(tmp_path / "sums.json", SUMS)
    assert cli("prepare", "--jsonl_path", rows, "--save_path", tmp_path / "data", "--model", tiny_model).code == 0
    flags = ["--dataset_path", tmp_path / "data", "--finetuning_type", finetuning_type, "--freeze_trainable_layers",
             "1", "--max_steps", "3", "--save_strategy", "steps", "--save_steps", "1", "--per_device_train_batch_size",
             "2", "--logging_steps", "1", "--precision", "fp32", "--learning_rate", "1e-3", "--disable_tqdm", "true"]
    assert cli("train", *flags, "--output_dir", tmp_path / "full").code == 0
    cut_short_copy(tmp_path / "full", (1, 2), tmp_path / "cut", "trainer state cut short")
    result = cli("train", *flags, "--output_dir", tmp_path / "cut", "--resume_from_checkpoint", "true")
    assert result.code == 0, result.err
    assert "resuming from checkpoint-1" in result.err
    full, resumed = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("full", "cut"))
    base = load_file(str(tiny_model / "model.safetensors"))
    assert any(not (full[k] == base[k]).all() for k in base)
    assert max((full[k] - resumed[k]).abs().max().item() for k in full) <= 1e-6
