"""The methods beside train's LoRA and dpo under the two multi-process launchers, torchrun and accelerate launch (two
gloo processes on the CPU): each run finishes as two ranks, one process writes the output and reports, and the output
loads where it should (peft for adapters and prefixes, transformers for whole models).

Which method under which launcher, to keep the count of two-process runs (20-40 s each) small: the launchers differ
only in the environment they give the processes (accelerate launch adds the ACCELERATE_* settings the Trainer's
Accelerator reads; both start the same gloo process group), the methods only in the trainer they run (TRL's
KTOTrainer, ORPOTrainer, CPOTrainer for simpo, GRPOTrainer; transformers' Trainer for train's tuning types). So
KTOTrainer, CPOTrainer, GRPOTrainer and the Trainer (ptuning, freeze) run under accelerate launch, KTOTrainer,
ORPOTrainer, GRPOTrainer and the Trainer (full) under torchrun, and each pair left out shares both halves with pairs
that run: simpo under torchrun is
orpo's launch with CPOTrainer, which runs under accelerate; orpo under accelerate is simpo's launch with ORPOTrainer,
which runs under torchrun; freeze under torchrun is full's launch with the frozen parameters LoRA and P-Tuning
already run with under both; full under accelerate is freeze's launch with every parameter trained, as full runs under
torchrun; dpo under accelerate is train's LoRA launch there (tests/test_distributed.py) with DPOTrainer, which runs
under torchrun (tests/test_dpo.py). P-Tuning under torchrun is tests/test_ptuning_runs.py's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import write_json
from test_distributed import LAUNCHERS, failure
from test_dpo import pairs  # noqa: F401  (the fixture, reused)
from test_grpo import SUMS
from test_ptuning_runs import prepared  # noqa: F401  (the fixture, reused)

RUN = ["--max_steps", "2", "--logging_steps", "1", "--precision", "fp32", "--save_strategy", "no", "--seed", "3",
       "--disable_tqdm", "true"]
GRPO = ["--num_generations", "4", "--max_completion_length", "6", "--per_device_train_batch_size", "4",
        "--reward_funcs", "length"]


def launch(launcher: str, tmp_path, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf_home")}  # one thread per process
    done = subprocess.run([sys.executable, *LAUNCHERS[launcher], "-m", "glmtune", *map(str, args)], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, failure(done)
    return done


def two_rank_manifest(run) -> dict:
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["global_step"] == 2  # two ranks really ran, to the end
    return manifest


@pytest.mark.parametrize(("launcher", "command"), [
    ("torchrun", "kto"), ("torchrun", "orpo"), ("torchrun", "grpo"),
    ("accelerate", "kto"), ("accelerate", "simpo"), ("accelerate", "grpo"),
])
def test_preference_and_grpo_runs_train_as_two_ranks_and_save_an_adapter_peft_loads(pairs, tiny_model,  # noqa: F811
                                                                                    tmp_path, launcher, command):
    """KTO's KL term is taken within a rank's batch of 2 rows; ORPO and SimPO have no reference pass; GRPO's ranks
    each generate their share of the groups (per_device 4 x 2 ranks = 2 prompts of 4 completions a step)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if command == "grpo":
        model, data, extra = tiny_model, write_json(tmp_path / "sums.json", SUMS), GRPO
        metric = "rewards/length/mean"
    else:
        model, data, _ = pairs
        extra = ["--per_device_train_batch_size", "2", "--learning_rate", "2e-3"]
        metric = "rewards/margins"
    done = launch(launcher, tmp_path, command, "--model", model, "--dataset_path", data, "--output_dir",
                  tmp_path / "run", *extra, *RUN)
    assert done.stdout.count("Adapter saved") == 1  # the main process reports; the other stays quiet
    assert metric in two_rank_manifest(tmp_path / "run")["last_logged_rewards"]
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), tmp_path / "run")
    assert tuned.peft_config["default"].peft_type == "LORA"


@pytest.mark.parametrize(("launcher", "finetuning_type"), [
    ("accelerate", "ptuning"), ("accelerate", "freeze"), ("torchrun", "full"),
])
def test_train_s_other_tuning_types_run_as_two_ranks_and_save_what_loads(prepared, tmp_path,  # noqa: F811
                                                                         launcher, finetuning_type):
    """A prefix loads with peft; a full or freeze run's model with transformers, with exactly the weights the tuning
    type trains changed."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = prepared.parent / "model"
    done = launch(launcher, tmp_path, "train", "--dataset_path", prepared, "--output_dir", tmp_path / "run",
                  "--finetuning_type", finetuning_type, "--pre_seq_len", "4", "--freeze_trainable_layers", "1",
                  "--per_device_train_batch_size", "2", "--learning_rate", "1e-2", *RUN)
    saved = "Prefix" if finetuning_type == "ptuning" else "Model"
    assert done.stdout.count(f"{saved} saved") == 1
    assert two_rank_manifest(tmp_path / "run")["finetuning_type"] == finetuning_type
    if finetuning_type == "ptuning":
        tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "run")
        assert tuned.peft_config["default"].peft_type == "PREFIX_TUNING"
        return
    AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    trained, start = load_file(str(tmp_path / "run" / "model.safetensors")), load_file(str(base / "model.safetensors"))
    moved = {k for k in start if not (trained[k] == start[k]).all()}
    # the tiny model has one block: freeze's last block is all of them, the embeddings and final norm stay
    assert moved == (set(start) if finetuning_type == "full" else {k for k in start if k.startswith("model.layers.")})
