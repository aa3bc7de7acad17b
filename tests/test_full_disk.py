"""A full disk: prepare, train (a checkpoint and the final save), merge and convert each end with one message naming
what they were writing and where (exit code 1, no traceback), leave what was there before as it was, and leave no
half-written output. The disk is real: a size-limited tmpfs, filled up by a ballast file, so the kernel itself
answers ENOSPC to every library's writes (Arrow, safetensors, torch.save, plain files)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import write_json
from test_train import small  # noqa: F401 (a fixture: its very small GLM and dataset)

DISK_SIZE = "4m"


class SmallDisk:
    """A mounted tmpfs of DISK_SIZE; `fill(leave)` takes all its free space but `leave` bytes."""

    def __init__(self, path: Path):
        self.path = path
        self.ballast = path / "ballast"

    def free(self) -> int:
        return shutil.disk_usage(self.path).free

    def fill(self, leave: int) -> None:
        self.ballast.unlink(missing_ok=True)
        fd = os.open(self.ballast, os.O_CREAT | os.O_WRONLY)
        try:
            os.posix_fallocate(fd, 0, self.free() - leave)  # tmpfs allocates the pages: a real use of the space
        finally:
            os.close(fd)

    def empty(self) -> None:
        self.ballast.unlink(missing_ok=True)

    def leftovers(self) -> list[str]:
        """Hidden entries (the atomic writes' temporary and staging directories) anywhere on the disk."""
        return sorted(str(p.relative_to(self.path)) for p in self.path.rglob(".*"))


@pytest.fixture
def small_disk(tmp_path) -> Iterator[SmallDisk]:
    if os.geteuid() != 0:
        pytest.skip("a real full disk needs a size-limited tmpfs, and mounting one needs root")
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_SIZE}", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {mounted.stderr.strip()}")
    try:
        yield SmallDisk(mount_point)
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], check=True)


@pytest.fixture(scope="module")
def earlier_run(small):  # noqa: F811 (the fixture imported from test_train)
    """test_train's very small GLM and 8-row dataset, and a run of 2 steps with checkpoint-2 and its final adapter:
    (model, dataset, run), none of them on the small disk."""
    from glmtune.cli import main

    model, data = small
    assert main([*train_args(data, data.parent / "run"), "--max_steps", "2", "--save_steps", "2"]) == 0
    return model, data, data.parent / "run"


def train_args(data: Path, out: Path) -> list[str]:
    return ["train", "--dataset_path", str(data), "--output_dir", str(out), "--per_device_train_batch_size", "4",
            "--logging_steps", "1", "--precision", "fp32"]


def assert_one_full_disk_message(result, path: Path, what: str) -> None:
    assert result.code == 1, result.err
    assert "Traceback" not in result.err and result.err.count("error: ") == 1, result.err
    assert f"while writing {what}" in result.err and str(path) in result.err, result.err
    assert "no space left on the device" in result.err and "free there now" in result.err, result.err


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_prepare_on_a_full_disk_keeps_the_earlier_dataset(cli, earlier_run, small_disk, tmp_path):
    from datasets import load_from_disk

    model, _, _ = earlier_run
    target = small_disk.path / "data"
    rows = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(8)]
    assert cli("prepare", "--jsonl_path", write_json(tmp_path / "few.json", rows), "--save_path", target,
               "--model", model).code == 0
    before = snapshot(target)
    small_disk.fill(leave=4096)
    many = [{"prompt": f"question {i} " * 20, "completion": f"answer {i} " * 20} for i in range(400)]
    result = cli("prepare", "--jsonl_path", write_json(tmp_path / "many.json", many), "--save_path", target,
                 "--model", model, "--overwrite_output_dir")
    assert_one_full_disk_message(result, target, "the prepared dataset")
    assert f"{target} is as it was" in result.err
    assert snapshot(target) == before and len(load_from_disk(str(target))["train"]) == 8
    assert small_disk.leftovers() == []


def test_a_checkpoint_cut_short_by_a_full_disk_is_removed_and_resume_goes_on_from_the_last_complete_one(
        cli, earlier_run, small_disk):
    from glmtune.train.skeleton import checkpoint_problem

    _, data, earlier = earlier_run
    run = small_disk.path / "run"
    shutil.copytree(earlier, run)
    before = snapshot(run)
    # Room for checkpoint-4's adapter and tokenizer (about 50 KB), not for its optimizer state (72 KB, torch.save).
    small_disk.fill(leave=60 * 1024)
    result = cli(*train_args(data, run), "--max_steps", "4", "--save_steps", "2", "--resume_from_checkpoint", "true")
    assert_one_full_disk_message(result, run / "checkpoint-4", "checkpoint-4 (adapter, optimizer and trainer state)")
    assert "was written before the disk filled, and removed" in result.err
    assert "checkpoint-2 kept" in result.err and "--resume_from_checkpoint true" in result.err
    assert not (run / "checkpoint-4").exists() and small_disk.leftovers() == []
    assert snapshot(run) == before  # checkpoint-2 and the 2-step run's final adapter, byte for byte
    small_disk.empty()
    again = cli(*train_args(data, run), "--max_steps", "4", "--save_steps", "2", "--resume_from_checkpoint", "true")
    assert again.code == 0, again.err
    assert checkpoint_problem(run / "checkpoint-4") is None
    assert json.loads((run / "manifest.json").read_text())["global_step"] == 4


def test_a_final_save_on_a_full_disk_leaves_the_earlier_adapter_and_no_staging(cli, earlier_run, small_disk):
    _, data, earlier = earlier_run
    run = small_disk.path / "run"
    shutil.copytree(earlier, run)
    before = snapshot(run)
    small_disk.fill(leave=16 * 1024)  # the adapter alone is 32 KB
    result = cli(*train_args(data, run), "--max_steps", "3", "--save_strategy", "no", "--resume_from_checkpoint",
                 "true")
    assert_one_full_disk_message(result, run, "the final adapter, tokenizer and manifest")
    assert "was written before the disk filled, and removed" in result.err
    assert "checkpoint-2 kept" in result.err
    assert snapshot(run) == before and small_disk.leftovers() == []
    assert json.loads((run / "manifest.json").read_text())["global_step"] == 2


def earlier_output(directory: Path) -> dict[str, bytes]:
    """An output a previous command left: --overwrite_output_dir may replace it, a failed write must not."""
    directory.mkdir()
    (directory / "model.safetensors").write_bytes(b"weights from before")
    return snapshot(directory)


def test_merge_on_a_full_disk_leaves_the_earlier_output(cli, earlier_run, small_disk):
    _, _, adapter = earlier_run
    target = small_disk.path / "merged"
    before = earlier_output(target)
    small_disk.fill(leave=100 * 1024)  # the merged weights are 297 KB
    result = cli("merge", "--peft_path", adapter, "--output_dir", target, "--overwrite_output_dir")
    assert_one_full_disk_message(result, target, "the merged model")
    assert "it needs at least" in result.err
    assert snapshot(target) == before and small_disk.leftovers() == []


def test_convert_on_a_full_disk_leaves_the_earlier_output(cli, shared_dir, small_disk):
    target = small_disk.path / "converted"
    before = earlier_output(target)
    small_disk.fill(leave=100 * 1024)  # the weights are 513 KB, the tokenizer 5.8 MB
    result = cli("convert", shared_dir / "fixtures" / "chatglm" / "v3", target,
                 "--tokenizer", shared_dir / "tokenizers" / "chatglm3-6b", "--overwrite_output_dir")
    assert_one_full_disk_message(result, target, "the converted model")
    assert snapshot(target) == before and small_disk.leftovers() == []


def test_each_library_s_full_disk_error_is_recognised(small_disk):
    """What the kernel's ENOSPC becomes in each library: an OSError, safetensors' SafetensorError, torch.save's
    RuntimeError without an errno (recognised by the filesystem being full); a different error is not."""
    import gc

    import torch
    from safetensors.torch import save_file

    from glmtune.disk import is_disk_full

    tensors = {"w": torch.zeros(2 << 20)}  # 8 MiB: more than the whole disk
    writes = {"open": lambda p: p.write_bytes(bytes(8 << 20)), "safetensors": lambda p: save_file(tensors, p),
              "torch.save": lambda p: torch.save(tensors, p)}
    for name, write in writes.items():
        target = small_disk.path / name
        with pytest.raises(Exception) as raised:
            write(target)
        assert is_disk_full(raised.value, target), (name, raised.value)
        target.unlink(missing_ok=True)  # safetensors removes its own partial file
    del raised
    gc.collect()  # the traceback held torch's writer, and its deleted file's pages, open
    assert not is_disk_full(RuntimeError("unexpected pos 576 vs 534"), small_disk.path)  # the disk has room now
    assert not is_disk_full(PermissionError(13, "Permission denied"), small_disk.path)


def test_a_full_disk_no_write_reported_is_still_one_message(small_disk, capsys):
    from glmtune.cli import run_command

    def command(argv: list[str]) -> None:
        with open(small_disk.path / "big", "wb") as f:  # a failed write() names no file
            f.write(bytes(8 << 20))

    assert run_command(command, []) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no space left on the device while writing a file") and err.count("error: ") == 1
    assert "Traceback" not in err and "free there now" not in err  # no free space of some other filesystem
