"""A child run with its peak memory: the RSS of its whole process tree, sampled, and the kernel's exact peak."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")


def run_measured(cmd: list[str], env: dict[str, str] | None = None, interval: float = 0.2) -> tuple[dict, str, int]:
    """Run cmd; (its last stdout line as JSON, its stdout, its peak memory in bytes).

    The peak is the larger of the tree's summed RSS, sampled every `interval` seconds (the run plus any worker
    processes it starts), and the kernel's own peak RSS of the largest single process in the tree (wait4's
    ru_maxrss, exact, which a sample can miss).
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        sampled = 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            sampled = max(sampled, tree_rss(proc.pid))
            time.sleep(interval)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed ({proc.returncode}):\n{stderr[-4000:]}")
    lines = [line for line in stdout.splitlines() if line.startswith("{\"")]
    if not lines:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... printed no result:\n{stdout[-2000:]}\n{stderr[-2000:]}")
    return json.loads(lines[-1]), stdout, max(sampled, usage.ru_maxrss * 1024)


def tree_rss(pid: int) -> int:
    """Summed resident memory of pid and its descendants, in bytes (0 for processes gone meanwhile)."""
    total = 0
    stack = [pid]
    while stack:
        current = stack.pop()
        try:
            total += int(Path(f"/proc/{current}/statm").read_text().split()[1]) * PAGE
            for task in Path(f"/proc/{current}/task").iterdir():
                stack.extend(int(c) for c in (task / "children").read_text().split())
        except (OSError, ValueError):
            continue
    return total
