"""--log_level and --quiet on every command: glmtune's notices (stderr), transformers' and datasets' verbosity and
the progress bars follow them, while what a command exists to print (its report, its table) stays on stdout."""

from __future__ import annotations

import logging

import pytest

from glmtune.demo import demo_data_path
from glmtune.logs import configure_logging, progress_bars_enabled


@pytest.fixture(autouse=True)
def default_logging():
    yield
    configure_logging()  # the next test starts from the defaults, as a new process would


def dry_run(cli, model, *extra):
    return cli("prepare", "--jsonl_path", demo_data_path(), "--model", model, "--dry_run", "--use_cache", "false",
               *extra)


def test_quiet_keeps_the_report_and_drops_the_progress_bars(cli, tiny_model):
    loud, quiet = dry_run(cli, tiny_model), dry_run(cli, tiny_model, "--quiet")
    assert loud.code == quiet.code == 0, quiet.err
    assert "Dataset report (dry run: nothing written)" in quiet.out and quiet.out == loud.out
    assert "Tokenizing" in loud.err  # datasets' progress bar
    assert quiet.err == ""


def test_debug_level_shows_debug_lines_and_the_default_does_not(cli, tiny_model):
    default = cli("plan", "--model", tiny_model)
    debug = cli("plan", "--model", tiny_model, "--log_level", "debug")
    assert default.code == debug.code == 0, debug.err
    assert f"debug: model shape read from {tiny_model / 'config.json'}" in debug.err
    assert "debug:" not in default.err
    assert default.out == debug.out and "peak" in default.out  # the estimate itself does not change


def test_a_config_file_sets_the_log_level_and_the_flag_overrides_it(cli, tiny_model, tmp_path):
    config = tmp_path / "plan.yaml"
    config.write_text(f"model: {tiny_model}\nlog_level: debug\n", encoding="utf-8")
    from_file = cli("plan", "--config", config)
    overridden = cli("plan", "--config", config, "--log_level", "info")
    assert from_file.code == overridden.code == 0, from_file.err
    assert "debug: model shape read from" in from_file.err
    assert "debug:" not in overridden.err


def test_a_config_file_can_ask_for_quiet(cli, tiny_model, tmp_path):
    config = tmp_path / "prepare.yaml"
    config.write_text("quiet: true\n", encoding="utf-8")
    result = dry_run(cli, tiny_model, "--config", config)
    assert result.code == 0 and "Dataset report" in result.out
    assert result.err == ""


def test_an_unknown_level_in_a_config_file_is_a_user_error(cli, tiny_model, tmp_path):
    config = tmp_path / "plan.yaml"
    config.write_text("log_level: loud\n", encoding="utf-8")
    result = cli("plan", "--model", tiny_model, "--config", config)
    assert result.code == 2
    assert "error: log_level: expected one of debug, info, warning, error, found 'loud'" in result.err


@pytest.mark.parametrize("flags, level", [
    ((), logging.WARNING),  # the libraries' INFO is their internals (a whole config per load)
    (("--log_level", "debug"), logging.DEBUG),
    (("--log_level", "error"), logging.ERROR),
    (("--quiet",), logging.WARNING),
])
def test_transformers_and_datasets_verbosity_follow_the_flags(cli, tiny_model, flags, level):
    import datasets
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity(logging.CRITICAL)  # so that the command has to set it
    datasets.logging.set_verbosity(logging.CRITICAL)
    result = cli("plan", "--model", tiny_model, *flags)
    assert result.code == 0, result.err
    assert transformers_logging.get_verbosity() == level
    assert datasets.logging.get_verbosity() == level


def test_quiet_turns_every_progress_bar_off_and_the_next_command_turns_them_on(cli, tiny_model):
    import datasets
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as transformers_logging

    def bars() -> list[bool]:
        return [not are_progress_bars_disabled(), datasets.is_progress_bar_enabled(),
                transformers_logging.is_progress_bar_enabled(), progress_bars_enabled()]

    assert cli("plan", "--model", tiny_model, "--quiet").code == 0
    assert bars() == [False] * 4
    assert cli("plan", "--model", tiny_model).code == 0
    assert bars() == [True] * 4


def test_quiet_hides_notices_but_not_warnings(cli, tiny_model, capsys):
    assert cli("plan", "--model", tiny_model, "--quiet").code == 0
    logger = logging.getLogger("glmtune.some.module")
    logger.info("a notice")
    logger.warning("something to know")
    assert capsys.readouterr().err == "warning: something to know\n"


def test_other_processes_of_a_distributed_run_log_warnings_only(cli, tiny_model, monkeypatch):
    monkeypatch.setenv("RANK", "1")  # as torchrun and accelerate launch set it
    result = cli("plan", "--model", tiny_model, "--log_level", "debug")
    assert result.code == 0 and "peak" in result.out
    assert "debug:" not in result.err
    assert logging.getLogger("glmtune").level == logging.WARNING


def test_train_keeps_the_trainers_own_log_level_and_quiet_turns_its_bar_off(tmp_path):
    from transformers import TrainingArguments

    from glmtune.config import parse_arguments

    def parse(*flags: str) -> TrainingArguments:
        return parse_arguments("glmtune train", [TrainingArguments], ["--output_dir", str(tmp_path), *flags])[0]

    debug = parse("--log_level", "debug")
    assert debug.log_level == "debug" and logging.getLogger("glmtune").level == logging.DEBUG
    quiet = parse("--quiet")
    assert quiet.log_level == "passive" and quiet.disable_tqdm is True
    assert logging.getLogger("glmtune").level == logging.WARNING
    assert parse("--quiet", "--disable_tqdm", "false").disable_tqdm is False  # an explicit flag still wins


def test_every_command_help_lists_log_level_and_quiet(cli):
    from glmtune.cli import COMMANDS

    for verb in COMMANDS:
        result = cli(verb, "--help")
        assert result.code == 0
        assert "--log_level" in result.out and "--quiet" in result.out, verb


def test_a_quiet_training_run_prints_its_result_line_and_nothing_else(cli, tiny_model, tmp_path):
    data = tmp_path / "data"
    assert cli("prepare", "--data", demo_data_path(), "--save_path", data, "--model", tiny_model, "--quiet").code == 0
    result = cli("train", "--dataset_path", data, "--output_dir", tmp_path / "run", "--max_steps", "2",
                 "--logging_steps", "1", "--precision", "fp32", "--quiet")
    assert result.code == 0, result.err
    # No notice (precision, trainable parameters), no bar, no printed log dict: the result line alone.
    assert result.out.strip().startswith("Adapter saved to") and len(result.out.strip().splitlines()) == 1
    assert "precision:" not in result.err and "trainable params" not in result.err and "{'loss'" not in result.out
    assert (tmp_path / "run" / "manifest.json").is_file()
