"""The board's logic without a browser: the commands it builds, what it reads from a run's log and files, how it
starts, lists and stops runs, the data report it shows, and its refusal to listen openly without a password."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from glmtune.board.app import check_exposure, is_loopback, parse_auth
from glmtune.board.command_line import glmtune_command, resume_command, shell_line, training_command
from glmtune.board.dataset_report import histogram, trained_spans
from glmtune.board.plan_output import read_plan
from glmtune.board.progress import log_lines, losses_from_state, parse_log, run_progress
from glmtune.board.runs import FAILED, FINISHED, RUNNING, STOPPED, RunManager
from glmtune.data.report import MARK_CLOSE, MARK_OPEN
from glmtune.errors import UserError

# What `glmtune train` printed in a real run (tqdm's carriage returns kept), cut to two logging steps.
TRAIN_LOG = ("trainable params: 245,760 || all params: 3,372,800 || trainable%: 7.2865\n"
             "\r  0%|          | 0/30 [00:00<?, ?it/s]\r  3%|▎         | 1/30 [00:12<06:13, 12.88s/it]"
             "\r  7%|▋         | 2/30 [00:22<05:06, 10.93s/it]\r 10%|█         | 3/30 [00:30<04:23,  9.74s/it]"
             "\r                                              \r"
             "{'loss': '7.627', 'grad_norm': '2.798', 'learning_rate': '0.0028', 'epoch': '1'}\n"
             "\r 10%|█         | 3/30 [00:30<04:23,  9.74s/it]\r 20%|██        | 6/30 [00:58<03:30,  8.78s/it]"
             "\r                                              \r"
             "{'loss': '5.426', 'grad_norm': '2.574', 'learning_rate': '0.0025', 'epoch': '2'}\n"
             "{'eval_loss': '5.9', 'eval_runtime': '0.5', 'epoch': '2'}\n"
             "\rTokenizing: 100%|██████████| 48/48 [00:00<00:00, 458.90 examples/s]\n"
             "\r 23%|██▎       | 7/30 [01:06<03:18,  8.63s/it]")


def test_a_command_leaves_out_unset_options_and_writes_booleans_and_lists_as_glmtune_reads_them():
    argv = glmtune_command("prepare", {"model": "m", "data": ["a.json", "b b.json"], "format": None,
                                       "max_seq_length": 256, "dry_run": True, "learning_rate": 2e-4, "val": ""})
    assert argv == ["glmtune", "prepare", "--model", "m", "--data", "a.json", "b b.json", "--max_seq_length", "256",
                    "--dry_run", "true", "--learning_rate", "0.0002"]
    assert shell_line(argv).endswith("--data a.json 'b b.json' --max_seq_length 256 --dry_run true "
                                     "--learning_rate 0.0002")


def test_every_training_command_the_board_builds_parses_with_that_commands_own_options():
    from transformers import TrainingArguments

    from glmtune.commands.train import OWN_ARGUMENTS
    from glmtune.train.command import parse_training_options

    argv = training_command("train", {"model": "m", "dataset_path": "d.json", "output_dir": "out", "max_steps": 4,
                                      "num_train_epochs": 3.0, "per_device_train_batch_size": 4,
                                      "learning_rate": 3e-3, "lora_rank": 8, "lora_alpha": 16.0,
                                      "logging_steps": 1, "save_steps": 2, "val_size": None})
    parsed = parse_training_options("glmtune train", [*OWN_ARGUMENTS, TrainingArguments], argv[2:], {})
    training = parsed[-1]
    assert (training.max_steps, training.learning_rate, training.save_steps) == (4, 3e-3, 2)
    with pytest.raises(ValueError, match="unknown training method"):
        training_command("pretrain", {})


def test_resume_repeats_the_runs_command_from_its_latest_checkpoint_and_never_overwrites():
    argv = ["glmtune", "train", "--output_dir", "o", "--overwrite_output_dir", "true", "--max_steps", "9",
            "--resume_from_checkpoint", "false"]
    assert resume_command(argv) == ["glmtune", "train", "--output_dir", "o", "--max_steps", "9",
                                    "--resume_from_checkpoint", "true"]


def test_the_log_gives_step_total_eta_and_each_loss_at_the_step_it_was_logged():
    progress = parse_log(TRAIN_LOG)
    assert (progress.step, progress.total, progress.elapsed, progress.eta) == (7, 30, "01:06", "03:18")
    assert progress.train_loss == [(3, 7.627), (6, 5.426)]
    assert progress.eval_loss == [(6, 5.9)]
    assert progress.summary() == "step 7/30 (23%), 01:06 elapsed, about 03:18 left"


def test_the_log_shows_each_progress_bar_once_in_its_last_state():
    lines = log_lines(TRAIN_LOG)
    assert lines[0].startswith("trainable params")
    assert lines[-1] == "\r 23%|██▎       | 7/30 [01:06<03:18,  8.63s/it]".lstrip("\r")
    assert sum("%|" in line for line in lines) == 2  # Tokenizing and training: one line each, not one per redraw
    assert log_lines(TRAIN_LOG, last=1) == lines[-1:]


def test_a_run_without_a_log_takes_its_curve_from_its_latest_complete_checkpoint(tmp_path):
    state = {"global_step": 4, "max_steps": 8, "log_history": [{"loss": 3.0, "step": 2}, {"loss": 2.0, "step": 4},
                                                                {"eval_loss": 2.5, "step": 4}]}
    for step, text in ((2, json.dumps({"global_step": 2, "log_history": []})), (4, json.dumps(state)),
                       (6, "{ half written")):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(text)
    progress = run_progress(tmp_path, None)
    assert (progress.step, progress.total) == (4, 8)
    assert (progress.train_loss, progress.eval_loss) == losses_from_state(state) == ([(2, 3.0), (4, 2.0)],
                                                                                   [(4, 2.5)])


def test_the_histogram_counts_every_sample_once_and_marks_the_bins_over_the_limit():
    lengths = [1, 5, 10, 11, 20, 39, 40]
    bins = histogram(lengths, max_seq_length=20, bins=4)
    assert [label for label, _, _ in bins] == ["1-10", "11-20", "21-30", "31-40"]
    assert [n for _, n, _ in bins] == [3, 2, 0, 2]
    assert [over for _, _, over in bins] == [False, False, True, True]
    assert histogram([], 512) == []


def test_trained_spans_split_a_report_sample_at_its_marks():
    sample = f"<|user|>\nhi<|assistant|>{MARK_OPEN}\nhello{MARK_CLOSE}<|user|>x{MARK_OPEN}bye{MARK_CLOSE}"
    assert trained_spans(sample) == [("<|user|>\nhi<|assistant|>", None), ("\nhello", "trained"),
                                     ("<|user|>x", None), ("bye", "trained")]


def test_listening_beyond_loopback_needs_a_password():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")
    check_exposure("127.0.0.1", None)
    check_exposure("0.0.0.0", ("u", "p"))
    with pytest.raises(UserError, match="a password is required"):
        check_exposure("0.0.0.0", None)
    assert parse_auth("alice:s3:cret") == ("alice", "s3:cret")
    for bad in ("alice", ":p", "alice:"):
        with pytest.raises(UserError, match="USER:PASS"):
            parse_auth(bad)


def test_board_refuses_a_public_host_without_a_password_with_exit_code_2(cli, monkeypatch):
    monkeypatch.delenv("GLMTUNE_BOARD_AUTH", raising=False)
    result = cli("board", "--host", "0.0.0.0")
    assert result.code == 2 and "a password is required" in result.err and "--auth" in result.err


def _fake_command(tmp_path: Path, body: str) -> list[str]:
    """A stand-in for `glmtune train`: a Python script named so that the run manager recognises its process."""
    script = tmp_path / "glmtune_fake_train.py"
    script.write_text(body)
    return [sys.executable, str(script)]


def _wait(condition, timeout: float = 20.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_a_run_lives_in_its_own_process_group_and_stops_on_sigint_as_ctrl_c_would(tmp_path):
    body = ("import signal, sys, time\n"
            "def stop(*_):\n    print('saving a checkpoint', flush=True); sys.exit(130)\n"
            "signal.signal(signal.SIGINT, stop)\nprint('started', flush=True)\ntime.sleep(60)\n")
    runs = RunManager(tmp_path / "runs")
    runs.start("a", _fake_command(tmp_path, body))
    _wait(lambda: "started" in runs.log("a"))
    import os

    pid = int((runs.record_dir("a") / "pid").read_text())
    assert os.getpgid(pid) == pid != os.getpgid(0)  # a Ctrl-C at the board's terminal does not reach it
    assert runs.status("a") == RUNNING
    with pytest.raises(UserError, match="still running"):
        runs.start("a", _fake_command(tmp_path, body))
    assert runs.stop("a")
    _wait(lambda: runs.status("a") != RUNNING)
    assert runs.status("a") == STOPPED and "saving a checkpoint" in runs.log("a")
    assert not runs.stop("a")


def test_runs_are_listed_from_the_folder_so_another_board_sees_the_same_ones(tmp_path):
    folder = tmp_path / "runs"
    first = RunManager(folder)
    first.start("ok", _fake_command(tmp_path, "print('done')\n"))
    first.start("bad", [sys.executable, "-c", "import sys; sys.exit(3)"])
    _wait(lambda: first.status("ok") == FINISHED and first.status("bad") == FAILED)
    (folder / "finished-elsewhere").mkdir()
    (folder / "finished-elsewhere" / "manifest.json").write_text(json.dumps({"command": "train"}))
    (folder / "a-prepared-dataset").mkdir()
    (folder / "a-prepared-dataset" / "manifest.json").write_text(json.dumps({"command": "prepare"}))
    (folder / "demo-base-model").mkdir()
    later = RunManager(folder)
    assert {r.name: r.status for r in later.list()} == {"ok": FINISHED, "bad": FAILED,
                                                        "finished-elsewhere": FINISHED}
    assert later.run("ok").command.endswith("glmtune_fake_train.py")
    with pytest.raises(UserError, match="run name"):
        later.start("../escape", ["true"])


def test_a_resumed_run_keeps_the_log_of_its_first_part(tmp_path):
    runs = RunManager(tmp_path / "runs")
    runs.start("a", _fake_command(tmp_path, "print('first part')\n"))
    _wait(lambda: runs.status("a") == FINISHED)
    runs.start("a", [sys.executable, "-c", "print('second part')"], resume=True)
    _wait(lambda: runs.status("a") == FINISHED and "second part" in runs.log("a"))
    assert runs.log("a").index("first part") < runs.log("a").index("second part")
    runs.start("a", [sys.executable, "-c", "print('afresh')"])
    _wait(lambda: runs.status("a") == FINISHED and "afresh" in runs.log("a"))
    assert "first part" not in runs.log("a")


def test_the_plan_chart_reads_back_every_figure_plan_printed(tiny_model, capsys):
    from glmtune.commands.plan import PlanArguments, run
    from glmtune.plan.memory import GIB

    estimate = run(PlanArguments(model=str(tiny_model), precision="fp32", device_memory_gib=1.0))
    figures = read_plan(capsys.readouterr().out)
    assert figures.parts == {part: round(value / GIB, 2) for part, value in estimate.lines.items()}
    assert (figures.total, figures.device) == (round(estimate.total / GIB, 2), 1.0)
    assert read_plan("error: --model is required") == type(figures)()


def test_the_data_report_is_prepares_dry_run_with_its_bad_rows_located_and_every_kept_samples_length(tiny_model,
                                                                                                     tmp_path):
    from glmtune.board.dataset_report import dataset_report

    data = tmp_path / "rows.jsonl"
    data.write_text('{"instruction": "什么是股票？", "input": "", "output": "股票是股份公司发行的所有权凭证。"}\n'
                    '{"instruction": "broken"\n'
                    '{"instruction": "What is a bond?", "input": ""}\n'
                    '{"instruction": "What does APR stand for?", "input": "", "output": "Annual Percentage Rate."}\n',
                    encoding="utf-8")
    result = dataset_report(str(tiny_model), [str(data)], max_seq_length=512)
    assert (result.report.rows_read, result.report.bad_rows_skipped, result.report.kept) == (4, 2, 2)
    assert [b.location for b in result.bad_rows] == [f"{data}:2", f"{data}:3"]
    assert "output" in result.bad_rows[1].problem  # the missing field is named
    assert "rows read:         4 (2 bad rows skipped)" in result.text and "dry run: nothing written" in result.text
    assert len(result.lengths) == 2 and max(result.lengths) == result.report.length_percentiles["max"]
    assert not (tmp_path / "rows.rejects.jsonl").exists()
