"""A two-process DDP run through torchrun or accelerate launch (gloo, CPU) trains the adapter a single process
trains with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import write_json

COMMON = ["--max_steps", "3", "--logging_steps", "1", "--seed", "3", "--lora_dropout", "0", "--precision", "fp32",
          "--save_strategy", "no", "--learning_rate", "1e-2"]


# accelerate: --multi_gpu, because `--cpu --num_processes 2` silently runs one process (ENVIRONMENT.md).
LAUNCHERS = {"torchrun": ["-m", "torch.distributed.run", "--nproc_per_node", "2"],
             "accelerate": ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]}


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_two_processes_train_what_one_process_trains(tmp_path, launcher):
    from safetensors.torch import load_file

    from glmtune.cli import main
    from glmtune.models.tiny import build_tiny_glm

    rows = [{"prompt": f"question {i}", "completion": f"answer {i} " * (1 + i % 3)} for i in range(8)]
    model = build_tiny_glm(tmp_path / "model", [r["prompt"] + " " + r["completion"] for r in rows] * 5,
                           hidden_size=64, num_layers=1, vocab_size=400)
    data = write_json(tmp_path / "rows.json", rows)
    assert main(["prepare", "--jsonl_path", str(data), "--save_path", str(tmp_path / "data"), "--model",
                 str(model)]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per process on a 2-core machine
    train = ["-m", "glmtune", "train", "--dataset_path", str(tmp_path / "data"), *COMMON]
    single = subprocess.run([sys.executable, *train, "--output_dir", str(tmp_path / "single"),
                             "--per_device_train_batch_size", "4"], env=env, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = subprocess.run([sys.executable, *LAUNCHERS[launcher], *train,
                          "--output_dir", str(tmp_path / "ddp"), "--per_device_train_batch_size", "2"],
                         env=env, capture_output=True, text=True)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    assert ddp.stdout.count("Adapter saved") == 1  # the main process reports; the other stays quiet

    runs = {name: json.loads((tmp_path / name / "manifest.json").read_text()) for name in ("single", "ddp")}
    assert runs["single"]["world_size"] == 1 and runs["ddp"]["world_size"] == 2  # two ranks really ran
    # Same global batch of 4, same order: the processes' gradients are averaged by DDP, the loss normalised by the
    # tokens of both. What differs is only the order of fp32 sums (an all-reduce), ~1e-7 here.
    assert abs(runs["single"]["train_loss"] - runs["ddp"]["train_loss"]) < 1e-5
    one, two = (load_file(str(tmp_path / name / "adapter_model.safetensors")) for name in ("single", "ddp"))
    assert one.keys() == two.keys()
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5
    assert max(one[k].abs().max().item() for k in one if "lora_B" in k) > 1e-3  # the adapter did move
