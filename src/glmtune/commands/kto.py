"""glmtune kto: Kahneman-Tversky Optimisation of a LoRA adapter (TRL's KTOTrainer) on answers labelled desirable or
not: prepared labelled rows (prompt, completion, label true/false), or preference pairs, each giving its chosen
answer as desirable and its rejected one as not. Every TRL KTOConfig flag (and so every transformers
TrainingArguments flag) is accepted too."""

from __future__ import annotations

from typing import Any

from glmtune.arguments import HealthArguments, LoraArguments, ModelArguments, PrecisionArguments
from glmtune.arguments.preference import KtoArguments
from glmtune.commands.preference import PREFERENCE_DEFAULTS, preference_main

KTO_DEFAULTS: dict[str, Any] = {
    **PREFERENCE_DEFAULTS,
    "output_dir": "output-kto",
    # Prepare already cut every pair to --max_seq_length by its --truncation rule; TRL's collator cuts no further.
    "max_length": None,
}

OWN_ARGUMENTS = [ModelArguments, KtoArguments, LoraArguments, PrecisionArguments, HealthArguments]

# The KTOConfig options most runs set, for the help page: (name, TRL's default, help); the help shows glmtune's
# defaults above where they differ. Checked against KTOConfig by a test.
COMMON_KTO_OPTIONS: list[tuple[str, Any, str]] = [
    ("beta", 0.1, "Strength of the pull towards the reference model: higher keeps the policy closer to it."),
    ("loss_type", "kto", "kto, or apo_zero_unpaired."),
    ("desirable_weight", 1.0, "Weight of the desirable answers' losses (raise it when they are fewer)."),
    ("undesirable_weight", 1.0, "Weight of the undesirable answers' losses."),
    ("max_length", 1024, "Cut prompt + answer to this many tokens in the collator (prepare has already cut them)."),
]


def _method() -> tuple[Any, type]:
    from glmtune.train.kto import KTO, GlmtuneKTOConfig

    return KTO, GlmtuneKTOConfig


def main(argv: list[str], defaults: dict[str, Any] | None = None) -> None:
    preference_main("glmtune kto", __doc__, OWN_ARGUMENTS, {**KTO_DEFAULTS, **(defaults or {})}, "KTOConfig",
                    COMMON_KTO_OPTIONS, _method, argv)
