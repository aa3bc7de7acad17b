"""What every page shares: the runs folder, its run manager, the label maker, and the model the pages default to."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from glmtune.board.demo_model import demo_model
from glmtune.board.i18n import Labeller
from glmtune.board.runs import RunManager


@dataclass
class BoardContext:
    folder: Path
    runs: RunManager
    labels: Labeller

    def default_model(self) -> str:
        """The demo's tiny model, built in the runs folder the first time a page needs it."""
        return str(demo_model(self.folder))
