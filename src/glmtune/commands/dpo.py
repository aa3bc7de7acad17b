"""glmtune dpo: Direct Preference Optimisation of a LoRA adapter on prepared preference pairs (TRL's DPOTrainer).
Every TRL DPOConfig flag (and so every transformers TrainingArguments flag) is accepted too."""

from __future__ import annotations

from typing import Any

from glmtune.arguments import DpoArguments, HealthArguments, LoraArguments, ModelArguments, PrecisionArguments
from glmtune.commands.preference import PREFERENCE_DEFAULTS, preference_main

DPO_DEFAULTS: dict[str, Any] = {
    **PREFERENCE_DEFAULTS,
    "output_dir": "output-dpo",
    # Prepare already cut every pair to --max_seq_length by its --truncation rule; TRL's collator cuts no further.
    "max_length": None,
}

OWN_ARGUMENTS = [ModelArguments, DpoArguments, LoraArguments, PrecisionArguments, HealthArguments]

# The DPOConfig options most runs set, for the help page (which answers without importing TRL): (name, default,
# help). A test checks them against the installed DPOConfig.
COMMON_DPO_OPTIONS: list[tuple[str, Any, str]] = [
    ("beta", 0.1, "Strength of the pull towards the reference model: higher keeps the policy closer to it."),
    ("loss_type", ["sigmoid"], "Preference loss: sigmoid (DPO), ipo, hinge, robust, apo_zero, sigmoid_norm, ..."),
    ("label_smoothing", 0.0, "Assumed share of flipped labels (robust DPO / cDPO)."),
    ("precompute_ref_log_probs", False, "Compute the reference log-probabilities once before training."),
    ("max_length", None, "Cut prompt + answer to this many tokens in the collator (prepare has already cut them)."),
]


def _method() -> tuple[Any, type]:
    from glmtune.train.dpo import DPO, GlmtuneDPOConfig

    return DPO, GlmtuneDPOConfig


def main(argv: list[str], defaults: dict[str, Any] | None = None) -> None:
    preference_main("glmtune dpo", __doc__, OWN_ARGUMENTS, {**DPO_DEFAULTS, **(defaults or {})}, "DPOConfig",
                    COMMON_DPO_OPTIONS, _method, argv)
