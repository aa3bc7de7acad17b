"""Training runs started from the board: each is the `glmtune METHOD ...` command in a process of its own (its own
session and process group), so that a closed browser, a page error or the board itself stopping never stops it.

A run is its --output_dir, `FOLDER/NAME`, and the board's record of it, `FOLDER/.board/NAME/`: the command
(command.json), its process id (pid) and everything it printed (log.txt), and its exit code (exit_code) once the
board saw it end. Whatever the board's state, the run's status is read from these files and the process table, so
every browser, and a board started later, sees the same runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from glmtune.board.command_line import runnable, shell_line
from glmtune.errors import UserError

RECORDS = ".board"
RUNNING, FINISHED, STOPPED, FAILED = "running", "finished", "stopped", "failed"
STOP_SIGNAL = signal.SIGINT  # as Ctrl-C in a terminal: train saves a checkpoint at the end of the step and stops


@dataclass
class Run:
    name: str
    output_dir: Path
    status: str
    command: str  # the shell line; "" for a run the board did not start

    @property
    def label(self) -> str:
        return f"{self.name} ({self.status})"


class RunManager:
    """Starts, stops and lists the runs in one folder."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._lock = threading.Lock()

    def record_dir(self, name: str) -> Path:
        return self.folder / RECORDS / name

    def start(self, name: str, argv: list[str], resume: bool = False) -> Run:
        """Start `argv` (a `glmtune ...` command whose --output_dir is FOLDER/name) as the run `name`; `resume`: the
        run goes on, and its log goes on after what the earlier part printed (the curve keeps its first part).

        Raises:
            UserError: a bad run name, or a run of that name still running.
        """
        if not name or "/" in name or name.startswith("."):
            raise UserError(f"run name {name!r}: expected a folder name (no '/', not starting with '.')")
        with self._lock:
            record = self.record_dir(name)
            if self.status(name) == RUNNING:
                raise UserError(f"run {name} is still running", hint="stop it first, or choose another name")
            record.mkdir(parents=True, exist_ok=True)
            for stale in ("exit_code", "pid"):
                (record / stale).unlink(missing_ok=True)
            (record / "command.json").write_text(json.dumps({"argv": argv, "started": time.time()}), encoding="utf-8")
            log = open(record / "log.txt", "ab" if resume else "wb")  # noqa: SIM115 - the child holds it; closed once passed
            try:
                env = {**os.environ, "PYTHONUNBUFFERED": "1"}
                process = subprocess.Popen(runnable(argv), stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True, env=env)
            finally:
                log.close()
            (record / "pid").write_text(str(process.pid), encoding="utf-8")
        threading.Thread(target=self._reap, args=(process, record), daemon=True).start()
        return self.run(name)

    def stop(self, name: str) -> bool:
        """Ask the run to stop as Ctrl-C would (a checkpoint at the end of the current step); False when it is not
        running."""
        pid = self._live_pid(name)
        if pid is None:
            return False
        os.killpg(pid, STOP_SIGNAL)  # the run leads its own process group (start_new_session)
        return True

    def status(self, name: str) -> str:
        record = self.record_dir(name)
        if self._live_pid(name) is not None:
            return RUNNING
        exit_file = record / "exit_code"
        if exit_file.is_file():
            code = int(exit_file.read_text(encoding="utf-8").strip() or 1)
            return FINISHED if code == 0 else STOPPED if code == 130 else FAILED
        if (self.folder / name / "manifest.json").is_file():
            return FINISHED
        if any((self.folder / name).glob("checkpoint-*")):
            return STOPPED
        return FAILED if record.is_dir() else STOPPED

    def run(self, name: str) -> Run:
        return Run(name, self.folder / name, self.status(name), self.command(name))

    def command(self, name: str) -> str:
        try:
            argv = json.loads((self.record_dir(name) / "command.json").read_text(encoding="utf-8"))["argv"]
        except (OSError, ValueError, KeyError):
            return ""
        return shell_line(argv)

    def log(self, name: str, tail_bytes: int | None = None) -> str:
        path = self.record_dir(name) / "log.txt"
        try:
            with open(path, "rb") as f:
                if tail_bytes is not None:
                    f.seek(max(0, path.stat().st_size - tail_bytes))
                return f.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def list(self) -> list[Run]:
        """The board's runs and the training runs found in the folder, the most recently changed first."""
        if not self.folder.is_dir():
            return []
        names = {p.name for p in (self.folder / RECORDS).glob("*") if p.is_dir()}
        names |= {p.name for p in self.folder.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and _is_training_run(p)}
        def changed(name: str) -> float:
            paths = [self.record_dir(name) / "log.txt", self.folder / name]
            return max((p.stat().st_mtime for p in paths if p.exists()), default=0.0)
        return [self.run(name) for name in sorted(names, key=changed, reverse=True)]

    def _live_pid(self, name: str) -> int | None:
        """The run's process id while that process is alive and is a glmtune command (not a recycled pid)."""
        try:
            pid = int((self.record_dir(name) / "pid").read_text(encoding="utf-8"))
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            stat = Path(f"/proc/{pid}/stat").read_text()
        except (OSError, ValueError):
            return None
        zombie = stat.rsplit(")", 1)[-1].split()[0] == "Z"
        return pid if b"glmtune" in cmdline and not zombie else None

    @staticmethod
    def _reap(process: subprocess.Popen, record: Path) -> None:
        code = process.wait()
        (record / "exit_code").write_text(str(130 if code == -signal.SIGINT else code), encoding="utf-8")


def _is_training_run(path: Path) -> bool:
    """A training command's output: its manifest, or a checkpoint of one still running or stopped."""
    manifest = path / "manifest.json"
    if manifest.is_file():
        try:
            return json.loads(manifest.read_text(encoding="utf-8")).get("command") != "prepare"
        except (OSError, ValueError):
            return False
    return any(path.glob("checkpoint-*/trainer_state.json"))
