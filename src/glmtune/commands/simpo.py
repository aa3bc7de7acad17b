"""glmtune simpo: SimPO (Simple Preference Optimisation) of a LoRA adapter on prepared preference pairs, with no
reference model (TRL's CPOTrainer with loss_type simpo and cpo_alpha 0; --loss_type sigmoid --cpo_alpha 1 trains
CPO instead). Every TRL CPOConfig flag (and so every transformers TrainingArguments flag) is accepted too."""

from __future__ import annotations

from typing import Any

from glmtune.arguments import HealthArguments, LoraArguments, ModelArguments, PrecisionArguments
from glmtune.arguments.preference import PreferenceArguments
from glmtune.commands.preference import PREFERENCE_DEFAULTS, preference_main

SIMPO_DEFAULTS: dict[str, Any] = {
    **PREFERENCE_DEFAULTS,
    "output_dir": "output-simpo",
    "remove_unused_columns": False,  # TRL's pair collator reads every column (it sets this itself, with a warning)
    "loss_type": "simpo",
    "cpo_alpha": 0.0,  # no behaviour-cloning (SFT) term: SimPO's loss alone
    # SimPO's recipe for Llama-3-8B (base): beta 2.0 and a target margin gamma of 0.5 x beta (TRL's beta 0.1 and
    # gamma 0.5 are CPO's).
    "beta": 2.0,
    "simpo_gamma": 1.0,
}

OWN_ARGUMENTS = [ModelArguments, PreferenceArguments, LoraArguments, PrecisionArguments, HealthArguments]

# The CPOConfig options most runs set, for the help page: (name, TRL's default, help); glmtune's defaults above are
# shown where they differ. Checked against CPOConfig by a test.
COMMON_SIMPO_OPTIONS: list[tuple[str, Any, str]] = [
    ("loss_type", "sigmoid", "simpo (SimPO), or CPO's sigmoid, hinge, ipo; alphapo."),
    ("beta", 0.1, "Scale of the reward (an answer's mean log-probability per token)."),
    ("simpo_gamma", 0.5, "Target reward margin of the chosen answer over the rejected one (loss_type simpo)."),
    ("cpo_alpha", 1.0, "Weight of the chosen answers' likelihood (SFT) term: 0 for SimPO, 1 for CPO."),
]


def _method() -> tuple[Any, type]:
    from glmtune.train.simpo import SIMPO, GlmtuneCPOConfig

    return SIMPO, GlmtuneCPOConfig


def main(argv: list[str], defaults: dict[str, Any] | None = None) -> None:
    preference_main("glmtune simpo", __doc__, OWN_ARGUMENTS, {**SIMPO_DEFAULTS, **(defaults or {})}, "CPOConfig",
                    COMMON_SIMPO_OPTIONS, _method, argv)
