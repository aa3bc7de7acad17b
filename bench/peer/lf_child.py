"""One LLaMA-Factory training run, inside LLaMA-Factory's own environment (not glmtune's).

    <peer venv>/bin/python bench/peer/lf_child.py CONFIG.json

CONFIG holds LLaMA-Factory's arguments (what its YAML would hold). Prints one JSON line: the Trainer's
train_runtime, the steps, the logged losses, and the tokens the model was fed, counted at the model's forward
(real: attention-mask positions that are not padding; fed: every position, padding included).
"""

from __future__ import annotations

import json
import sys

from llamafactory.train.tuner import run_exp
from transformers import TrainerCallback


class Recorder(TrainerCallback):
    """Counts the tokens of each forward and keeps the logs (LLaMA-Factory's run_exp returns nothing)."""

    def __init__(self) -> None:
        self.real = 0
        self.fed = 0
        self.losses: list[float] = []
        self.runtime: float | None = None
        self.steps = 0
        self.counting = False

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and not self.counting:
            model.register_forward_pre_hook(self._count, with_kwargs=True)
            self.counting = True

    def _count(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        if ids is None:
            return
        self.fed += ids.numel()
        # A neat_packing mask numbers each packed sample (1, 2, ...) and marks padding 0; in a 4-D mask (where
        # LLaMA-Factory already built one: [batch, heads, query, key]) a real query attends to some key.
        if mask is None:
            self.real += ids.numel()
        elif mask.dim() == 2:
            self.real += int((mask != 0).sum())
        else:
            self.real += int((mask[:, 0].amax(-1) != mask.min()).sum())

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            self.losses.append(float(logs["loss"]))
        if "train_runtime" in logs:
            self.runtime = float(logs["train_runtime"])
        self.steps = state.global_step


def main() -> None:
    config = json.loads(open(sys.argv[1], encoding="utf-8").read())
    recorder = Recorder()
    run_exp(config, callbacks=[recorder])
    print(json.dumps({"runtime": recorder.runtime, "steps": recorder.steps, "losses": recorder.losses,
                      "real_tokens": recorder.real, "fed_tokens": recorder.fed}))


if __name__ == "__main__":
    main()
