"""Stopping a run on request: Ctrl-C (SIGINT) or SIGTERM (a scheduler's, or `kill`) ends the current step, saves a
checkpoint and stops, so that `--resume_from_checkpoint true` goes on from there; a second signal acts at once, as
it would without glmtune.

Only in a run of one process: under torchrun or accelerate launch each process gets the signal at its own step, and
one stopping while another goes on would leave the group waiting for it.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from glmtune.errors import UserError

if TYPE_CHECKING:
    from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(UserError):
    """The run stopped on request after saving a checkpoint: exit 130, as an interrupted command does."""

    exit_code = 130


class StopOnSignalCallback(TrainerCallback):
    """Turns the first SIGINT/SIGTERM into "save a checkpoint at the end of this step, then stop"."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.stopped_at: int | None = None
        self._previous: dict[int, Any] = {}

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        if args.world_size == 1 and threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._request) for s in SIGNALS}

    def _request(self, signum: int, frame: Any) -> None:
        self.signal_name = signal.Signals(signum).name
        self._restore()  # a second signal: what it would do without glmtune (KeyboardInterrupt, termination)
        logger.warning(f"{self.signal_name}: saving a checkpoint at the end of this step, then stopping (send it again "
                       "to stop at once)")

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        if self.signal_name is not None and self.stopped_at is None:
            control.should_save = control.should_training_stop = True
            self.stopped_at = state.global_step

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        self._restore()

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


def stop_if_interrupted(trainer: Trainer) -> None:
    """After training: a run stopped on request ends here, its checkpoint saved, without the final save.

    Raises:
        TrainingInterrupted: the run was stopped by a signal.
    """
    callback = next((c for c in trainer.callback_handler.callbacks if isinstance(c, StopOnSignalCallback)), None)
    if callback is None or callback.stopped_at is None:
        return
    raise TrainingInterrupted(f"stopped by {callback.signal_name} at step {callback.stopped_at}: "
                              f"checkpoint-{callback.stopped_at} saved in {trainer.args.output_dir}",
                              hint="run the same command with --resume_from_checkpoint true to go on")
