"""The command line itself: verbs, help and start-up cost."""

from __future__ import annotations

import subprocess
import sys


def test_importing_the_cli_imports_no_torch_or_transformers():
    code = "import sys, glmtune.cli; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_top_level_help_lists_every_command(cli):
    result = cli("--help")
    assert result.code == 0
    for verb in ("demo", "prepare", "train", "infer"):
        assert f"  {verb}" in result.out


def test_command_help_shows_the_seed_flags(cli):
    result = cli("train", "--help")
    assert result.code == 0
    for flag in ("--dataset_path", "--lora_rank", "--lora_alpha", "--lora_dropout", "--per_device_train_batch_size",
                 "--gradient_accumulation_steps", "--max_steps", "--save_steps", "--save_total_limit",
                 "--learning_rate", "--logging_steps", "--output_dir", "--fp16", "--model", "--target_modules",
                 "--resume_from_checkpoint", "--config"):
        assert flag in result.out, flag


def test_no_arguments_prints_usage_and_exits_2(cli):
    result = cli()
    assert result.code == 2 and "usage: glmtune" in result.out
