"""Two-process DDP runs through torchrun or accelerate launch (gloo, CPU): they train the adapter a single process
trains with the same global batch, tokenize a data file once, and resume to the uninterrupted run's adapter."""

from __future__ import annotations

import json
import os
import shutil
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
    assert single.returncode == 0, failure(single)
    ddp = subprocess.run([sys.executable, *LAUNCHERS[launcher], *train,
                          "--output_dir", str(tmp_path / "ddp"), "--per_device_train_batch_size", "2"],
                         env=env, capture_output=True, text=True)
    assert ddp.returncode == 0, failure(ddp)
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


def test_two_process_run_prepares_a_data_file_once_and_resumes_to_the_uninterrupted_adapter(tmp_path):
    """Under torchrun: a raw data file is tokenized by the main process alone (the other waits) into prepare's cache;
    a run interrupted after its step-2 checkpoint and resumed with --resume_from_checkpoint true ends with the adapter
    of the run that was never interrupted; checkpoints and the final adapter are written once, by the main process."""
    from safetensors.torch import load_file

    from glmtune.models.tiny import build_tiny_glm

    # 16 rows, a global batch of 4: 4 steps per epoch, so the resumed run starts mid-epoch (skips seen batches).
    rows = [{"prompt": f"question {i}", "completion": f"answer {i} " * (1 + i % 3)} for i in range(16)]
    model = build_tiny_glm(tmp_path / "model", [r["prompt"] + " " + r["completion"] for r in rows] * 5,
                           hidden_size=64, num_layers=1, vocab_size=400)
    data = write_json(tmp_path / "rows.json", rows)
    hf_home = tmp_path / "hf_home"  # prepare's cache, empty at first
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(hf_home)}

    def torchrun(output_dir, *extra):
        command = [sys.executable, *LAUNCHERS["torchrun"], "-m", "glmtune", "train", "--dataset_path", str(data),
                   "--model", str(model), "--max_seq_length", "64", *COMMON, "--per_device_train_batch_size", "2",
                   "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2",
                   "--output_dir", str(output_dir), *extra]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        assert done.returncode == 0, failure(done)
        return done.stdout + done.stderr  # the report on stdout, notices (the main process's alone) on stderr

    def tokenize_entries():
        return sorted(p.name for p in (hf_home / "glmtune" / "prepare").iterdir() if p.name != "datasets")

    out = torchrun(tmp_path / "full")
    assert out.count("Dataset report") == 1 and out.count("tokenized once, by this process") == 1
    assert "reused from the cache" not in out
    assert len(tokenize_entries()) == 1  # one tokenizing, for both processes
    assert len(list((hf_home / "glmtune" / "prepare" / "datasets").iterdir())) == 1

    # Each file once, from the main process (rng states: one per process, by design), no temporary leftovers.
    tokenizer_files = {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    adapter_files = {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    checkpoint_files = adapter_files | tokenizer_files | {"optimizer.pt", "scheduler.pt", "trainer_state.json",
                                                          "training_args.bin", "rng_state_0.pth", "rng_state_1.pth"}
    for step in (2, 4):
        assert {p.name for p in (tmp_path / "full" / f"checkpoint-{step}").iterdir()} == checkpoint_files
    assert {p.name for p in (tmp_path / "full").iterdir()} == (
        adapter_files | tokenizer_files | {"checkpoint-2", "checkpoint-4", "train_config.yaml", "training_args.bin",
                                           "loss.png", "manifest.json"})

    # What a run stopped after its step-2 checkpoint leaves behind.
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    out = torchrun(tmp_path / "resumed", "--resume_from_checkpoint", "true")
    assert out.count("Dataset report") == 1 and "reused from the cache" in out  # not tokenized again
    assert len(tokenize_entries()) == 1

    runs = {name: json.loads((tmp_path / name / "manifest.json").read_text()) for name in ("full", "resumed")}
    assert runs["full"]["world_size"] == runs["resumed"]["world_size"] == 2
    assert runs["full"]["global_step"] == runs["resumed"]["global_step"] == 4
    # Resuming restores the adapter, the optimizer and scheduler states, each process's RNG and the position in the
    # epoch: steps 3-4 run on the same batches from the same state. Only the order of the all-reduce's fp32 sums may
    # differ between runs (~1e-7, as in the test above); measured here: identical, 0.0.
    full, resumed = (load_file(str(tmp_path / name / "adapter_model.safetensors")) for name in ("full", "resumed"))
    assert full.keys() == resumed.keys()
    assert max((full[k] - resumed[k]).abs().max().item() for k in full) < 1e-5
    start = load_file(str(tmp_path / "full" / "checkpoint-2" / "adapter_model.safetensors"))
    assert max((full[k] - start[k]).abs().max().item() for k in full) > 1e-4  # steps 3-4 did train


def test_data_file_as_dataset_path_needs_a_model(cli, tmp_path):
    data = write_json(tmp_path / "rows.json", [{"prompt": "q", "completion": "a"}])
    result = cli("train", "--dataset_path", data, "--output_dir", tmp_path / "run")
    assert result.code == 2 and "is a data file, and tokenizing it needs --model" in result.err
    assert not (tmp_path / "run").exists()


def test_tokenize_options_with_a_prepared_directory_are_refused(cli, tiny_model, tmp_path):
    data = write_json(tmp_path / "rows.json", [{"prompt": "q", "completion": "a"}])
    assert cli("prepare", "--jsonl_path", data, "--save_path", tmp_path / "data", "--model", tiny_model).code == 0
    result = cli("train", "--dataset_path", tmp_path / "data", "--output_dir", tmp_path / "run",
                 "--max_seq_length", "64", "--val_size", "1")
    assert result.code == 2 and "--max_seq_length --val_size apply to a data file" in result.err
    assert "keeps the options it was prepared with" in result.err


def failure(done: subprocess.CompletedProcess) -> str:
    """What a failed launch said: the processes' own error lines (a launcher's report of a crashed process ends
    its output and hides them), then the tail."""
    clues = [line for line in done.stderr.splitlines()
             if any(word in line for word in ("Error", "error:", "terminate called", "what()", "Abort", "Signal"))]
    return "\n".join(clues[-40:]) + "\n--- tail ---\n" + done.stderr[-2000:]
