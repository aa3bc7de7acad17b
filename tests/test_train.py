"""glmtune train: checkpoints, resume, YAML config, refusals."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import write_json


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A very small GLM (hidden 64, 1 layer) and a prepared dataset of 8 rows: fast to train a few steps."""
    from glmtune.cli import main
    from glmtune.models.tiny import build_tiny_glm

    tmp = tmp_path_factory.mktemp("small")
    rows = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(8)]
    model = build_tiny_glm(tmp / "model", [r["prompt"] + " " + r["completion"] for r in rows] * 5, hidden_size=64,
                           num_layers=1, vocab_size=400)
    data = write_json(tmp / "rows.json", rows)
    assert main(["prepare", "--jsonl_path", str(data), "--save_path", str(tmp / "data"), "--model", str(model)]) == 0
    return model, tmp / "data"


def train(cli, data, out, *extra):
    return cli("train", "--dataset_path", data, "--output_dir", out, "--per_device_train_batch_size", "4",
               "--logging_steps", "1", *extra)


def test_keeps_at_most_save_total_limit_checkpoints(cli, small, tmp_path):
    _, data = small
    result = train(cli, data, tmp_path / "run", "--max_steps", "6", "--save_steps", "2", "--save_total_limit", "2")
    assert result.code == 0, result.err
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]


def test_resume_true_continues_from_the_last_checkpoint(cli, small, tmp_path):
    _, data = small
    run = tmp_path / "run"
    assert train(cli, data, run, "--max_steps", "4", "--save_steps", "2").code == 0
    result = train(cli, data, run, "--max_steps", "6", "--save_steps", "2", "--resume_from_checkpoint", "true")
    assert result.code == 0, result.err
    # Only steps 5 and 6 ran in the resumed process (logging every step), and the run ends at step 6.
    logged = [line for line in (result.out + result.err).splitlines() if "'loss':" in line]
    assert len(logged) == 2, logged
    assert json.loads((run / "manifest.json").read_text())["global_step"] == 6
    state = json.loads((run / "checkpoint-6" / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("damage", ["trainer state missing", "trainer state cut short"])
def test_resume_passes_over_a_checkpoint_cut_short_and_ends_where_an_uninterrupted_run_ends(cli, small, tmp_path,
                                                                                            damage):
    """A run killed while writing checkpoint-4 (the Trainer writes the trainer state last): resume takes checkpoint-2,
    says so, and trains to the adapter of the run never interrupted."""
    import shutil

    from safetensors.torch import load_file

    _, data = small
    flags = ("--max_steps", "6", "--save_steps", "2", "--precision", "fp32")
    assert train(cli, data, tmp_path / "full", *flags).code == 0
    run = tmp_path / "killed"
    for step in (2, 4):
        shutil.copytree(tmp_path / "full" / f"checkpoint-{step}", run / f"checkpoint-{step}")
    state = run / "checkpoint-4" / "trainer_state.json"
    if damage == "trainer state missing":
        state.unlink()
    else:
        state.write_text(state.read_text(encoding="utf-8")[:40], encoding="utf-8")
    result = train(cli, data, run, *flags, "--resume_from_checkpoint", "true")
    assert result.code == 0, result.err
    assert "checkpoint-4: incomplete" in result.err and "resuming from checkpoint-2" in result.err
    full, resumed = (load_file(str(d / "adapter_model.safetensors")) for d in (tmp_path / "full", run))
    assert full.keys() == resumed.keys()
    assert max((full[k] - resumed[k]).abs().max().item() for k in full) <= 1e-6
    assert any(t.abs().max() > 0 for k, t in full.items() if "lora_B" in k)  # trained: B starts at zero
    # Named explicitly, a checkpoint cut short is refused, saying why.
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "cut" / "checkpoint-2")
    (tmp_path / "cut" / "checkpoint-2" / "trainer_state.json").write_text("{", encoding="utf-8")
    cut = tmp_path / "cut" / "checkpoint-2"
    refused = train(cli, data, tmp_path / "again", *flags, "--resume_from_checkpoint", cut)
    assert refused.code == 2 and "trainer_state.json is cut short" in refused.err


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_a_signal_saves_a_checkpoint_and_resume_ends_where_an_uninterrupted_run_ends(cli, small, tmp_path,
                                                                                     signal_name):
    import os
    import signal
    import subprocess
    import sys

    from safetensors.torch import load_file

    _, data = small
    flags = ["--per_device_train_batch_size", "4", "--logging_steps", "1", "--max_steps", "12", "--save_strategy",
             "no", "--precision", "fp32", "--disable_tqdm", "true"]
    assert train(cli, data, tmp_path / "full", *flags).code == 0
    run = tmp_path / "stopped"
    process = subprocess.Popen([sys.executable, "-m", "glmtune", "train", "--dataset_path", str(data),
                                "--output_dir", str(run), *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in process.stdout:  # the Trainer prints each step's logged loss
        if "'loss'" in line:
            process.send_signal(getattr(signal, signal_name))
            break
    out, err = process.communicate(timeout=300)
    assert process.returncode == 130, err[-2000:]
    step = int(err.split(f"stopped by {signal_name} at step ")[1].split(":")[0])
    assert 1 <= step < 12 and (run / f"checkpoint-{step}" / "trainer_state.json").is_file()
    assert not (run / "manifest.json").exists() and not (run / "adapter_model.safetensors").exists()
    resumed = train(cli, data, run, *flags, "--resume_from_checkpoint", "true")
    assert resumed.code == 0, resumed.err
    full, after = (load_file(str(d / "adapter_model.safetensors")) for d in (tmp_path / "full", run))
    assert max((full[k] - after[k]).abs().max().item() for k in full) <= 1e-6


def test_resume_without_checkpoints_is_a_clear_error(cli, small, tmp_path):
    _, data = small
    result = train(cli, data, tmp_path / "run", "--max_steps", "2", "--resume_from_checkpoint", "true")
    assert result.code == 2 and "no complete checkpoint-* directory" in result.err


def test_non_empty_output_dir_needs_overwrite_flag(cli, small, tmp_path):
    _, data = small
    run = tmp_path / "run"
    assert train(cli, data, run, "--max_steps", "1").code == 0
    refused = train(cli, data, run, "--max_steps", "1")
    assert refused.code == 2 and "--overwrite_output_dir" in refused.err
    assert train(cli, data, run, "--max_steps", "1", "--overwrite_output_dir").code == 0


def test_yaml_config_is_overridden_by_flags_and_saved_resolved(cli, small, tmp_path):
    _, data = small
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"lora_rank": 4, "max_steps": 3, "learning_rate": 1e-3,
                                      "target_modules": "q_proj,v_proj"}))
    result = train(cli, data, tmp_path / "run", "--config", config, "--max_steps", "2")
    assert result.code == 0, result.err
    resolved = yaml.safe_load((tmp_path / "run" / "train_config.yaml").read_text())
    assert (resolved["lora_rank"], resolved["max_steps"], resolved["learning_rate"]) == (4, 2, 1e-3)
    adapter = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]


def test_default_lora_targets_are_every_linear_layer_of_glm(cli, small, tmp_path):
    _, data = small
    assert train(cli, data, tmp_path / "run", "--max_steps", "1").code == 0
    adapter = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj",
                                                        "down_proj"])


def test_unknown_target_module_is_a_clear_error(cli, small, tmp_path):
    _, data = small
    result = train(cli, data, tmp_path / "run", "--max_steps", "1", "--target_modules", "query_key_value")
    assert result.code == 2 and "check --target_modules" in result.err


def test_fp16_without_a_gpu_is_a_clear_error(cli, small, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    _, data = small
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "earlier.txt").write_text("keep")
    result = train(cli, data, tmp_path / "run", "--max_steps", "1", "--fp16", "--overwrite_output_dir")
    assert result.code == 2 and "--fp16 needs a CUDA GPU" in result.err
    assert (tmp_path / "run" / "earlier.txt").read_text() == "keep"  # a refused run clears nothing


def test_dataset_path_that_is_not_a_prepared_dataset(cli, tmp_path):
    (tmp_path / "data").mkdir()
    result = cli("train", "--dataset_path", tmp_path / "data", "--output_dir", tmp_path / "run")
    assert result.code == 2 and "has no manifest.json" in result.err and "glmtune prepare" in result.err


def test_example_config_runs(cli, small, tmp_path):
    from conftest import ROOT

    _, data = small
    example = yaml.safe_load((ROOT / "examples" / "finance_lora.yaml").read_text(encoding="utf-8"))
    result = train(cli, data, tmp_path / "run", "--config", ROOT / "examples" / "finance_lora.yaml",
                   "--max_steps", "1")
    assert result.code == 0, result.err
    resolved = yaml.safe_load((tmp_path / "run" / "train_config.yaml").read_text())
    assert {key: resolved[key] for key in example} == {**example, "max_steps": 1, "per_device_train_batch_size": 4,
                                                       "logging_steps": 1}  # the flags train() adds win
    adapter = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"]) == (example["lora_rank"], example["lora_alpha"])


def test_resume_with_other_lora_flags_is_refused(cli, small, tmp_path):
    _, data = small
    run = tmp_path / "run"
    assert train(cli, data, run, "--max_steps", "2", "--save_steps", "2").code == 0
    result = train(cli, data, run, "--max_steps", "4", "--resume_from_checkpoint", "true", "--lora_rank", "4")
    assert result.code == 2 and "r: checkpoint 8, now 4" in result.err


def test_validation_split_is_evaluated_at_the_end(cli, small, tmp_path):
    from glmtune.cli import main

    model, _ = small
    rows = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(8)]
    data = write_json(tmp_path / "rows.json", rows)
    assert main(["prepare", "--jsonl_path", str(data), "--save_path", str(tmp_path / "data"), "--model", str(model),
                 "--val_size", "2"]) == 0
    result = train(cli, tmp_path / "data", tmp_path / "run", "--max_steps", "2", "--learning_rate", "1e-2",
                   "--precision", "fp32")  # fp32: compared with an fp32 forward pass below
    assert result.code == 0, result.err
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    # The reference: the mean loss over every answer token of the 2 validation rows, base model plus the saved
    # adapter, computed here by hand; the untuned base's differs (the adapter is what was evaluated).
    tuned, untuned = (answer_token_loss(model, tmp_path / "data", adapter) for adapter in (tmp_path / "run", None))
    assert manifest["eval_loss"] == pytest.approx(tuned, rel=1e-4)
    assert abs(tuned - untuned) > 1e-3


def answer_token_loss(model, data, adapter) -> float:
    import torch
    from datasets import load_from_disk
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    network = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    if adapter is not None:
        network = PeftModel.from_pretrained(network, adapter)
    total, count = 0.0, 0
    with torch.no_grad():
        for row in load_from_disk(str(data))["validation"]:
            logits = network(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1]
            labels = torch.tensor(row["labels"][1:])
            total += torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
            count += int((labels != -100).sum())
    return total / count


def test_eval_strategy_without_validation_split_is_refused(cli, small, tmp_path):
    _, data = small
    result = train(cli, data, tmp_path / "run", "--max_steps", "2", "--eval_strategy", "steps")
    assert result.code == 2 and "needs a validation split" in result.err


def test_chunked_loss_trains_exactly_like_the_plain_loss(cli, small, tmp_path):
    _, data = small
    runs = {}
    for chunked in ("true", "false"):
        result = train(cli, data, tmp_path / chunked, "--max_steps", "3", "--gradient_accumulation_steps", "2",
                       "--chunked_loss", chunked, "--seed", "7", "--precision", "fp32")  # fp32: exact comparison
        assert result.code == 0, result.err
        runs[chunked] = json.loads((tmp_path / chunked / "manifest.json").read_text())
    assert runs["true"]["config"]["chunked_loss"] is True and runs["false"]["config"]["chunked_loss"] is False
    assert abs(runs["true"]["train_loss"] - runs["false"]["train_loss"]) < 1e-5


@pytest.mark.numeric  # --precision auto: fp32 or bf16 by the CPU; holds either way (CI runs both)
def test_same_seed_same_run(cli, small, tmp_path):
    _, data = small
    losses = []
    for name in ("a", "b"):
        assert train(cli, data, tmp_path / name, "--max_steps", "3", "--seed", "3").code == 0
        losses.append(json.loads((tmp_path / name / "manifest.json").read_text())["train_loss"])
    assert losses[0] == losses[1]


def test_gradient_checkpointing_trains_exactly_like_without(cli, small, tmp_path):
    """Recomputing activations in backward changes memory, not the result (and the adapter does get gradients:
    otherwise the later steps' losses would differ)."""
    _, data = small
    runs = []
    for checkpointing in ("false", "true"):
        result = train(cli, data, tmp_path / checkpointing, "--max_steps", "3", "--seed", "1", "--lora_dropout", "0",
                       "--learning_rate", "5e-2", "--gradient_checkpointing", checkpointing, "--precision", "fp32")
        assert result.code == 0, result.err
        runs.append(json.loads((tmp_path / checkpointing / "manifest.json").read_text()))
    assert abs(runs[0]["train_loss"] - runs[1]["train_loss"]) < 1e-6
    assert abs(runs[1]["last_logged_loss"] - runs[1]["train_loss"]) > 1e-3  # the loss moved: the adapter learned
