"""The seed project's three command lines, verbatim, as scripts at the repository root (with --model pointing
at a tiny local model, and fewer steps)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT, write_json


def run_script(name: str, *args, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(ROOT / name), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_seed_command_lines_run_end_to_end(tmp_path, tiny_model):
    rows = [{"instruction": f"问题{i}", "input": "", "output": f"回答{i}"} for i in range(4)]
    write_json(tmp_path / "alpaca_data.json", rows)
    step1 = run_script("tokenize_dataset_rows.py", "--jsonl_path", "alpaca_data.json", "--save_path", "data/alpaca",
                       "--max_seq_length", "512", "--model", tiny_model, cwd=tmp_path)
    assert step1.returncode == 0, step1.stderr
    # The seed README's finetune line verbatim, then --max_steps 2 overrides its 52000 (last flag wins).
    step2 = run_script("finetune.py", "--dataset_path", "data/alpaca", "--lora_rank", "8", "--lora_alpha", "32",
                       "--lora_dropout", "0.1", "--per_device_train_batch_size", "1",
                       "--gradient_accumulation_steps", "1", "--max_steps", "52000", "--save_steps", "1000",
                       "--save_total_limit", "2", "--learning_rate", "2e-5", "--logging_steps", "50",
                       "--output_dir", "output", "--max_steps", "2", cwd=tmp_path)
    assert step2.returncode == 0, step2.stderr
    assert (tmp_path / "output" / "adapter_model.safetensors").is_file()
    step3 = run_script("infer.py", "--peft_path", "output", "--max_length", "512", "--temperature", "0",
                       "--max_new_tokens", "4", cwd=tmp_path)
    assert step3.returncode == 0, step3.stderr
    answers = [json.loads(line) for line in step3.stdout.splitlines()]
    assert [a["prompt"] for a in answers] == ["你能做什么呢？", "你是谁？", "可以写一首诗吗？", "你是谁开发的？"]


def test_seed_default_model_offline_is_one_clear_line(tmp_path):
    write_json(tmp_path / "data.json", [{"instruction": "q", "input": "", "output": "a"}])
    result = run_script("tokenize_dataset_rows.py", "--jsonl_path", "data.json", "--save_path", "out",
                        "--max_seq_length", "512", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines()[0] == ("error: model 'THUDM/chatglm-6b' is not in the local cache and "
                                             "HF_HUB_OFFLINE is set")
    assert "--model PATH" in result.stderr and "Traceback" not in result.stderr


def test_seed_step_one_takes_data_as_well_as_jsonl_path(tmp_path, tiny_model):
    write_json(tmp_path / "data.json", [{"instruction": "q", "input": "", "output": "a"}])
    for flag in ("--data", "--jsonl_path"):
        result = run_script("tokenize_dataset_rows.py", flag, "data.json", "--save_path", f"out{flag}",
                            "--model", tiny_model, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert (tmp_path / f"out{flag}" / "manifest.json").is_file()
