"""The board's default model: the tiny random GLM `glmtune demo` builds, made once per board folder, so that the
whole page can be tried offline in minutes."""

from __future__ import annotations

import threading
from pathlib import Path

DEMO_MODEL = "demo-base-model"
_lock = threading.Lock()


def demo_model(folder: Path) -> Path:
    """FOLDER/demo-base-model, built on first use as the demo builds its base model (its tokenizer trained on the
    bundled data's text)."""
    path = folder / DEMO_MODEL
    with _lock:
        if (path / "config.json").is_file():
            return path
        from glmtune.data.prepare import load_data
        from glmtune.demo import demo_data_path
        from glmtune.models.tiny import build_tiny_glm

        data = load_data([str(demo_data_path())], None)
        texts = [m.content for c in data.conversations for m in c.messages] * 4  # as commands/demo.py
        tmp = folder / f".{DEMO_MODEL}.tmp"
        build_tiny_glm(tmp, texts)
        tmp.rename(path)  # complete or absent: a board stopped while building leaves no half model behind
        return path
