"""glmtune orpo: Odds Ratio Preference Optimisation of a LoRA adapter on prepared preference pairs (TRL's
ORPOTrainer): SFT on the chosen answers and preference tuning in one stage, with no reference model. Every TRL
ORPOConfig flag (and so every transformers TrainingArguments flag) is accepted too."""

from __future__ import annotations

from typing import Any

from glmtune.arguments import HealthArguments, LoraArguments, ModelArguments, PrecisionArguments
from glmtune.arguments.preference import PreferenceArguments
from glmtune.commands.preference import PREFERENCE_DEFAULTS, preference_main

ORPO_DEFAULTS: dict[str, Any] = {
    **PREFERENCE_DEFAULTS,
    "output_dir": "output-orpo",
    "remove_unused_columns": False,  # TRL's pair collator reads every column (it sets this itself, with a warning)
}

OWN_ARGUMENTS = [ModelArguments, PreferenceArguments, LoraArguments, PrecisionArguments, HealthArguments]

# The ORPOConfig options most runs set, for the help page: (name, default, help). Checked against ORPOConfig by a test.
COMMON_ORPO_OPTIONS: list[tuple[str, Any, str]] = [
    ("beta", 0.1, "Weight of the odds-ratio term against the chosen answers' likelihood (the paper's lambda)."),
    ("disable_dropout", True, "Turn dropout off in the model while training."),
]


def _method() -> tuple[Any, type]:
    from glmtune.train.orpo import ORPO, GlmtuneORPOConfig

    return ORPO, GlmtuneORPOConfig


def main(argv: list[str], defaults: dict[str, Any] | None = None) -> None:
    preference_main("glmtune orpo", __doc__, OWN_ARGUMENTS, {**ORPO_DEFAULTS, **(defaults or {})}, "ORPOConfig",
                    COMMON_ORPO_OPTIONS, _method, argv)
