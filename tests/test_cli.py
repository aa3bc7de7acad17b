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


def test_every_command_help_answers_without_importing_torch_or_the_heavy_libraries():
    from glmtune.cli import COMMANDS

    heavy = ("torch", "transformers", "trl", "bitsandbytes", "fastapi", "uvicorn")
    code = ("import contextlib, io, sys; from glmtune.cli import COMMANDS, main\n"
            "for verb in COMMANDS:\n"
            "    out = io.StringIO()\n"
            "    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
            "        main([verb, '--help'])\n"
            "    assert f'glmtune {verb}' in out.getvalue(), verb\n"
            f"print(sorted(m for m in {heavy!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert {"train", "dpo", "serve", "plan"} <= set(COMMANDS)  # the loop ran over the heavy ones too


def _flags(text: str) -> set[str]:
    import re

    return set(re.findall(r"^\s+(?:-\w, )?(--\w+)", text, flags=re.MULTILINE))


def test_command_help_lists_exactly_the_options_the_parser_accepts(cli):
    """The quick help is rendered from the dataclasses without transformers; HfArgumentParser is the reference."""
    from transformers import HfArgumentParser

    from glmtune.arguments import (
        ChatArguments,
        EvalArguments,
        InferenceArguments,
        MergeArguments,
        ModelArguments,
        PrepareArguments,
        ServeArguments,
    )
    from glmtune.commands.convert import ConvertArguments
    from glmtune.commands.demo import DemoArguments
    from glmtune.commands.plan import PlanArguments

    for verb, types in {"prepare": [ModelArguments, PrepareArguments], "infer": [ModelArguments, InferenceArguments],
                        "convert": [ConvertArguments], "demo": [DemoArguments], "plan": [PlanArguments],
                        "chat": [ModelArguments, ChatArguments], "merge": [ModelArguments, MergeArguments],
                        "eval": [ModelArguments, EvalArguments], "serve": [ModelArguments, ServeArguments]}.items():
        result = cli(verb, "--help")
        assert result.code == 0
        options = {o for a in HfArgumentParser(types)._actions for o in a.option_strings if o.startswith("--")}
        # Leave out the parser's aliases: --dashed-names and --no_FLAG for booleans that default to true.
        accepted = {o for o in options if "-" not in o[2:] and not (o.startswith("--no_") and f"--{o[5:]}" in options)}
        assert _flags(result.out) == accepted | {"--config", "--log_level", "--quiet"}, verb


def test_train_help_shows_common_training_options_with_their_real_defaults(cli):
    from transformers import TrainingArguments

    from glmtune.commands.train import TRAIN_DEFAULTS
    from glmtune.help import COMMON_TRAINING_OPTIONS

    reference = {f.name: f.default for f in __import__("dataclasses").fields(TrainingArguments)}
    for name, default, _ in COMMON_TRAINING_OPTIONS:
        assert name in reference, name
        if name not in TRAIN_DEFAULTS:
            assert default == reference[name] or str(default) == str(reference[name]), name
    result = cli("train", "--help_all")
    assert result.code == 0
    assert {f"--{name}" for name in reference} <= _flags(result.out)  # every TrainingArguments option
