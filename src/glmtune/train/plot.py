"""The loss curve of a run, as a PNG next to its adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_loss(log_history: list[dict[str, Any]], path: Path) -> Path | None:
    """Plot the training loss logged by the Trainer; None when nothing was logged."""
    points = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry and "step" in entry]
    evals = [(entry["step"], entry["eval_loss"]) for entry in log_history if "eval_loss" in entry]
    if not points and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if points:
        steps, losses = zip(*points, strict=True)
        ax.plot(steps, losses, marker="." if len(points) < 50 else None, label="training")
    if evals:
        steps, losses = zip(*evals, strict=True)
        ax.plot(steps, losses, marker="o", label="validation")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("glmtune train")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
