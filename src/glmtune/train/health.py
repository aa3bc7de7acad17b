"""The numerical health guard: a run whose gradients stop being finite numbers ends there with a diagnosis, or skips
that update (--nan_policy), and no adapter with non-finite weights is ever saved as a success.

The gap this fills: transformers' Trainer replaces a NaN loss in its logs by the running average
(`logging_nan_inf_filter`) and applies the NaN update anyway, so a diverged run logs a plausible loss, ends with
exit code 0 and saves an adapter of NaNs. The check runs where the Trainer hands the gradients over before the
optimizer step (`on_pre_optimizer_step`): a NaN or infinite loss gives non-finite gradients there.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from glmtune.errors import UserError

if TYPE_CHECKING:
    import torch
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from glmtune.arguments import HealthArguments

logger = logging.getLogger(__name__)

ZERO_LOSS_LOGS = 3  # logged losses of exactly 0 in a row before the run says so
HIGH_LORA_LEARNING_RATE = 1e-2  # LoRA's usual rates are 1e-4..5e-4 (glmtune's default 2e-4)


class TrainingDiverged(UserError):
    """Training produced non-finite numbers: the message says where and what to change."""


class NumericalHealthCallback(TrainerCallback):
    """Checks every update's gradients before the optimizer applies them; counts the updates it skipped."""

    def __init__(self, health: HealthArguments):
        self.policy = health.nan_policy
        self.max_skips = health.nan_max_skips
        self.skipped = 0  # non-finite updates dropped in the whole run
        self.in_a_row = 0
        self.zero_losses = 0

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              model: Any = None, lr_scheduler: Any = None, **kwargs: Any) -> None:
        gradients = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        if all_finite(gradients):
            self.in_a_row = 0
            return
        self.in_a_row += 1
        step = state.global_step + 1  # the update being made
        if args.fp16:  # the loss scaler skips an overflowing update and lowers its scale: its own business, a while
            if self.in_a_row <= self.max_skips:
                return
            raise TrainingDiverged(diagnosis(step, args, state, lr_scheduler, self.in_a_row))
        if self.policy == "skip" and self.in_a_row <= self.max_skips:
            for parameter in model.parameters():
                parameter.grad = None  # torch's optimizers leave a parameter without a gradient as it is
            self.skipped += 1
            logger.warning(f"step {step}: non-finite gradients, update skipped ({self.in_a_row} in a row, "
                           f"{self.skipped} in all; --nan_max_skips {self.max_skips})")
            return
        raise TrainingDiverged(diagnosis(step, args, state, lr_scheduler, self.in_a_row))

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        loss = (logs or {}).get("loss")
        if loss is None:
            return
        self.zero_losses = self.zero_losses + 1 if loss == 0 else 0
        if self.zero_losses == ZERO_LOSS_LOGS:
            logger.warning(f"the training loss has been exactly 0 for {ZERO_LOSS_LOGS} logged steps (step "
                           f"{state.global_step}): its batches may hold no supervised token (see the dataset "
                           "report's trained tokens), or the model's outputs have collapsed")


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every element of every tensor is finite, with one device synchronisation."""
    import torch

    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def diagnosis(step: int, args: TrainingArguments, state: TrainerState, lr_scheduler: Any, in_a_row: int) -> str:
    """What happened, with the numbers a user needs to decide what to change."""
    rate = lr_scheduler.get_last_lr()[0] if lr_scheduler is not None else args.learning_rate
    precision = "fp16" if args.fp16 else "bf16" if args.bf16 else "fp32"
    norms = [entry["grad_norm"] for entry in state.log_history if "grad_norm" in entry][-5:]
    history = ", ".join(f"{n:.3g}" for n in norms) if norms else "none logged yet"
    advice = []
    if args.fp16:
        advice.append("fp16 overflowed: train in bf16 (--precision bf16) or fp32; the GLM-4 line is trained in bf16")
    if rate >= HIGH_LORA_LEARNING_RATE or any(not math.isfinite(n) or n > 1e3 for n in norms):
        advice.append(f"the learning rate {rate:.3g} is high for LoRA (usual: 1e-4 to 5e-4): lower --learning_rate")
    advice.append("resume from the last checkpoint with a lower --learning_rate, or --nan_policy skip to drop such "
                  "updates")
    return (f"training diverged at step {step}: non-finite gradients ({in_a_row} update(s) in a row); learning rate "
            f"{rate:.3g}, precision {precision}, last logged gradient norms: {history}. The checkpoints saved before "
            f"this step are kept; nothing else was written. What to try: {'; '.join(advice)}")


def check_finite_weights(model: Any) -> None:
    """The last line of defence before a save: refuse to write trainable weights that are not finite numbers.

    Raises:
        TrainingDiverged: a trainable parameter holds a NaN or an infinity.
    """
    bad = [name for name, p in model.named_parameters() if p.requires_grad and not all_finite([p.detach()])]
    if bad:
        raise TrainingDiverged(f"the trained weights hold NaN or infinite values ({len(bad)} tensors, e.g. {bad[0]}): "
                               "the adapter is not saved",
                               hint="lower --learning_rate, or train in bf16/fp32 instead of fp16")


def health_callback(trainer: Any) -> NumericalHealthCallback | None:
    """The run's guard among the trainer's callbacks, if it has one."""
    return next((c for c in trainer.callback_handler.callbacks if isinstance(c, NumericalHealthCallback)), None)
