"""The same batches after a mid-epoch resume as in the run never interrupted.

glmtune trains with transformers' LengthGroupedSampler (`--train_sampling_strategy group_by_length`, train's
default), which draws each epoch's order from the global CPU random state at the start of the epoch: it has no
generator of its own, unlike the random sampler accelerate makes seedable per epoch. A run resumed inside an epoch
draws that epoch's order again from whatever state the new process is in, then skips the batches already trained:
other samples, another result (measured: 1.9e-3 off the uninterrupted adapter, resumed 3 steps before the end of a
12-step run, fp32). The Trainer's own rng_state.pth holds the state at the checkpoint's step, not at the epoch's start.

EpochOrderCallback records the CPU random state at each epoch's start in the checkpoint's trainer_state.json (as a
stateful callback: written with it, last, so every complete checkpoint has it), and a run resumed inside an epoch puts
it back before the order is drawn; the Trainer restores the checkpoint's own random state after skipping the batches.
A run that is never resumed draws exactly what it drew before.
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

if TYPE_CHECKING:
    from transformers import TrainerControl, TrainerState, TrainingArguments

class EpochOrderCallback(TrainerCallback, ExportableState):
    """Saves the CPU random state each epoch's order is drawn from; restores it when resuming inside that epoch."""

    def __init__(self, epoch: int | None = None, cpu_random_state: str | None = None) -> None:
        self.epoch = epoch
        self.cpu_random_state = cpu_random_state  # base64 of torch.get_rng_state(), at the start of `epoch`
        self._first_epoch = True

    def state(self) -> dict[str, Any]:
        return {"args": {"epoch": self.epoch, "cpu_random_state": self.cpu_random_state}, "attributes": {}}

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        name = type(self).__name__
        saved = state.stateful_callbacks.get(name)
        if isinstance(saved, dict):  # a resumed run: what its checkpoint recorded
            self.epoch, self.cpu_random_state = saved["args"]["epoch"], saved["args"]["cpu_random_state"]
        # A checkpoint written without this callback has no entry, and the Trainer's save expects one.
        state.stateful_callbacks[name] = self.state()

    def on_epoch_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        import torch

        epoch = int(state.epoch or 0)
        resumed_inside = self._first_epoch and state.epoch is not None and state.epoch != epoch
        self._first_epoch = False
        # A checkpoint written before glmtune recorded the state has none: the order is drawn afresh, as it was then.
        if resumed_inside and self.epoch == epoch and self.cpu_random_state is not None:
            torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(self.cpu_random_state)), dtype=torch.uint8))
            return
        self.epoch = epoch
        self.cpu_random_state = base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii")
