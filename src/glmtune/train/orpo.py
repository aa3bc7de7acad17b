"""Odds Ratio Preference Optimisation with a LoRA adapter: TRL's ORPOTrainer (trl.experimental) on the pairs
`glmtune prepare` tokenized, through the run the preference methods share (train/preference.py).

ORPO needs no reference model: its loss is the chosen answer's likelihood (SFT's) minus beta times the log-sigmoid
of the log odds ratio of the chosen answer over the rejected one, both under the policy alone. So SFT and preference
tuning are one stage, and the run starts from the base model (or --peft_path's adapter)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from glmtune.train.paired_rows import PretokenizedPairs
from glmtune.train.preference import PreferenceMethod

with warnings.catch_warnings():  # on import, trl.experimental warns that its API may change: our tests pin it
    warnings.filterwarnings("ignore", message="You are importing from 'trl.experimental'")
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

METRICS = ("rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected", "log_odds_ratio",
           "log_odds_chosen", "nll_loss")


@dataclass
class GlmtuneORPOConfig(ORPOConfig):
    """ORPOConfig without its own --trust_remote_code (ModelArguments has it; see train/dpo.py's GlmtuneDPOConfig)."""

    trust_remote_code: bool = field(default=False, init=False)


class PretokenizedORPOTrainer(PretokenizedPairs, ORPOTrainer):
    """ORPOTrainer on glmtune's tokenized pairs (train/paired_rows.py)."""


ORPO = PreferenceMethod("orpo", PretokenizedORPOTrainer, METRICS, reference=False)
