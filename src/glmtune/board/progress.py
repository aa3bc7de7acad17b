"""What a training run's files say about it while it runs and after: the progress bar and logged losses in the log
the board captured from the command, and the trainer state each checkpoint carries (a run the board did not start
has no captured log, and its curve comes from its latest checkpoint)."""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# transformers' training bar, as tqdm draws it (no description before the percentage, unlike "Tokenizing: 40%|"):
# " 40%|████      | 12/30 [02:09<03:19, 11.11s/it]". The ETA is "?" before the first step.
_BAR = re.compile(r"(?:^|[\r\n])[ \t]*\d+%\|[^|\r\n]*\|\s*(\d+)/(\d+) \[([\d:]+)<([\d:?]+)")
# The Trainer's log line: a dict of strings ("{'loss': '7.627', 'grad_norm': '2.798', ..., 'epoch': '1'}").
_LOGGED = re.compile(r"(?:^|[\r\n])(\{'[^\r\n]*\})")


@dataclass
class Progress:
    step: int = 0
    total: int = 0
    elapsed: str = ""
    eta: str = ""
    train_loss: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    eval_loss: list[tuple[int, float]] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        return self.step / self.total if self.total else 0.0

    def summary(self) -> str:
        if not self.total:
            return ""
        eta = f", about {self.eta} left" if self.eta and self.eta != "?" and self.step < self.total else ""
        return f"step {self.step}/{self.total} ({self.fraction:.0%}), {self.elapsed} elapsed{eta}"


def parse_log(text: str) -> Progress:
    """Progress and losses from a run's captured stdout and stderr. Each logged dict belongs to the step the bar
    showed last before it: the Trainer logs at the end of a step, after moving the bar."""
    progress = Progress()
    bars = [(m.start(), m) for m in _BAR.finditer(text)]
    for _, match in bars:
        step, total, elapsed, eta = match.groups()
        progress.step, progress.total, progress.elapsed, progress.eta = int(step), int(total), elapsed, eta
    for match in _LOGGED.finditer(text):
        entry = _literal(match.group(1))
        if entry is None:
            continue
        step = max((int(m.group(1)) for p, m in bars if p < match.start()), default=0)
        if "loss" in entry:
            progress.train_loss.append((step, entry["loss"]))
        if "eval_loss" in entry:
            progress.eval_loss.append((step, entry["eval_loss"]))
    return progress


def losses_from_state(state: dict[str, Any]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(training losses, validation losses) as (step, loss) from a trainer_state.json's log_history."""
    history = state.get("log_history", [])
    train = [(int(e["step"]), float(e["loss"])) for e in history if "loss" in e and "step" in e]
    evals = [(int(e["step"]), float(e["eval_loss"])) for e in history if "eval_loss" in e and "step" in e]
    return train, evals


def latest_state(output_dir: Path) -> dict[str, Any] | None:
    """The trainer state of the run's latest checkpoint that has a readable one, else None."""
    checkpoints = sorted(output_dir.glob("checkpoint-*/trainer_state.json"), key=_step_of, reverse=True)
    for path in checkpoints:
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # being written: the one before it is complete
            continue
    return None


def run_progress(output_dir: Path, log_text: str | None) -> Progress:
    """The captured log's view when there is one; else the latest checkpoint's trainer state."""
    if log_text:
        return parse_log(log_text)
    state = latest_state(output_dir)
    if state is None:
        return Progress()
    train, evals = losses_from_state(state)
    return Progress(step=int(state.get("global_step", 0)), total=int(state.get("max_steps", 0)),
                    train_loss=train, eval_loss=evals)


def log_lines(text: str, last: int = 200) -> list[str]:
    """The log as a terminal would show it: each progress bar's last state only (tqdm redraws a line with carriage
    returns), blank lines left out, the last `last` lines."""
    lines = [line.rsplit("\r", 1)[-1] for line in text.split("\n")]
    return [line for line in lines if line.strip()][-last:]


def _literal(text: str) -> dict[str, float] | None:
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None
    if not isinstance(value, dict):
        return None
    out = {}
    for key, raw in value.items():
        try:
            out[str(key)] = float(raw)
        except (TypeError, ValueError):
            continue
    return out


def _step_of(path: Path) -> int:
    try:
        return int(path.parent.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1
