"""P-Tuning v2 runs as train's other runs go: from a YAML config, resumed after an interruption to the prefix the
uninterrupted run learns, under torchrun (two CPU processes, gloo), and on 4-bit and 8-bit quantized bases."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import cut_short_copy, write_json

ROWS = [{"prompt": f"question {i}", "completion": f"answer {i} " * (1 + i % 3)} for i in range(8)]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from glmtune.cli import main
    from glmtune.models.tiny import build_tiny_glm

    tmp = tmp_path_factory.mktemp("ptuning_runs")
    model = build_tiny_glm(tmp / "model", [r["prompt"] + " " + r["completion"] for r in ROWS] * 5,
                           hidden_size=64, num_layers=1, vocab_size=400)
    data = write_json(tmp / "rows.json", ROWS)
    assert main(["prepare", "--jsonl_path", str(data), "--save_path", str(tmp / "data"), "--model", str(model)]) == 0
    return tmp / "data"


def prefix_difference(run, other) -> float:
    from safetensors.torch import load_file

    a, b = (load_file(str(d / "adapter_model.safetensors")) for d in (run, other))
    assert a.keys() == b.keys() and a
    return max((a[k] - b[k]).abs().max().item() for k in a)


def config_file(path, data, **extra):
    config = {"dataset_path": str(data), "finetuning_type": "ptuning", "pre_seq_len": 4, "prefix_projection": False,
              "max_steps": 6, "save_strategy": "steps", "save_steps": 2, "per_device_train_batch_size": 2,
              "precision": "fp32", "logging_steps": 1, "disable_tqdm": True, **extra}
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_yaml_ptuning_run_resumes_to_the_uninterrupted_prefix(cli, prepared, tmp_path):
    config = config_file(tmp_path / "ptuning.yaml", prepared)
    full = cli("train", "--config", config, "--output_dir", tmp_path / "full")
    assert full.code == 0, full.err
    saved = yaml.safe_load((tmp_path / "full" / "train_config.yaml").read_text())
    assert saved["finetuning_type"] == "ptuning" and saved["pre_seq_len"] == 4
    assert saved["learning_rate"] == pytest.approx(2e-2)

    cut = tmp_path / "cut"
    cut_short_copy(tmp_path / "full", (2, 4), cut, "trainer state cut short")
    result = cli("train", "--config", config, "--output_dir", cut, "--resume_from_checkpoint", "true")
    assert result.code == 0, result.err
    assert "resuming from checkpoint-2" in result.err
    assert prefix_difference(tmp_path / "full", cut) <= 1e-6


def test_resuming_with_another_prefix_length_is_refused_naming_both(cli, prepared, tmp_path):
    config = config_file(tmp_path / "ptuning.yaml", prepared, max_steps=2)
    assert cli("train", "--config", config, "--output_dir", tmp_path / "run").code == 0
    result = cli("train", "--config", config, "--output_dir", tmp_path / "run", "--pre_seq_len", "8",
                 "--max_steps", "4", "--resume_from_checkpoint", "true")
    assert result.code == 2
    assert "num_virtual_tokens: checkpoint 4, now 8" in result.err


def test_two_processes_train_the_prefix_one_process_trains(prepared, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per process on a 2-core machine
    train = ["-m", "glmtune", "train", "--dataset_path", str(prepared), "--finetuning_type", "ptuning",
             "--pre_seq_len", "4", "--max_steps", "4", "--save_strategy", "no", "--precision", "fp32",
             "--logging_steps", "1", "--seed", "3", "--disable_tqdm", "true"]
    single = subprocess.run([sys.executable, *train, "--output_dir", str(tmp_path / "single"),
                             "--per_device_train_batch_size", "4"], env=env, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *train,
                          "--output_dir", str(tmp_path / "ddp"), "--per_device_train_batch_size", "2"],
                         env=env, capture_output=True, text=True)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    runs = {name: json.loads((tmp_path / name / "manifest.json").read_text()) for name in ("single", "ddp")}
    assert runs["single"]["world_size"] == 1 and runs["ddp"]["world_size"] == 2
    assert abs(runs["single"]["train_loss"] - runs["ddp"]["train_loss"]) < 1e-5
    assert prefix_difference(tmp_path / "single", tmp_path / "ddp") < 1e-5


@pytest.mark.parametrize("bits", [4, 8])
def test_a_prefix_trains_on_a_quantized_base_as_peft_allows(cli, prepared, tmp_path, bits):
    pytest.importorskip("bitsandbytes")
    run = tmp_path / "run"
    result = cli("train", "--dataset_path", prepared, "--output_dir", run, "--finetuning_type", "ptuning",
                 "--pre_seq_len", "4", "--quantization_bit", str(bits), "--max_steps", "2", "--save_strategy",
                 "steps", "--save_steps", "1", "--per_device_train_batch_size", "4", "--logging_steps", "1")
    assert result.code == 0, result.err
    adapter = json.loads((run / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "PREFIX_TUNING"
    assert json.loads((run / "manifest.json").read_text())["config"]["quantization_bit"] == bits
    assert prefix_difference(run / "checkpoint-1", run) > 0  # step 2 moved the prefix step 1 saved


def test_resuming_a_projected_prefix_is_refused_saying_why(cli, prepared, tmp_path):
    config = config_file(tmp_path / "ptuning.yaml", prepared, max_steps=2, prefix_projection=True)
    assert cli("train", "--config", config, "--output_dir", tmp_path / "run").code == 0
    result = cli("train", "--config", config, "--output_dir", tmp_path / "run", "--max_steps", "4",
                 "--resume_from_checkpoint", "true")
    assert result.code == 2
    assert "peft saves the prefix the MLP computes, not the MLP" in result.err
    assert "--prefix_projection false" in result.err
