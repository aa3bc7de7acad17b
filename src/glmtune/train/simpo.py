"""SimPO (and CPO) with a LoRA adapter: TRL's CPOTrainer (trl.experimental) on the pairs `glmtune prepare` tokenized,
through the run the preference methods share (train/preference.py).

SimPO needs no reference model: its reward is an answer's average log-probability per token under the policy, times
beta, and the loss asks the chosen answer's to exceed the rejected one's by a margin (simpo_gamma). SimPO is CPO's
trainer with loss_type simpo and no behaviour-cloning term (cpo_alpha 0), glmtune simpo's defaults; CPO itself is
--loss_type sigmoid --cpo_alpha 1."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from glmtune.train.paired_rows import PretokenizedPairs
from glmtune.train.preference import PreferenceMethod

with warnings.catch_warnings():  # on import, trl.experimental warns that its API may change: our tests pin it
    warnings.filterwarnings("ignore", message="You are importing from 'trl.experimental'")
    from trl.experimental.cpo import CPOConfig, CPOTrainer

METRICS = ("rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected", "nll_loss")


@dataclass
class GlmtuneCPOConfig(CPOConfig):
    """CPOConfig without its own --trust_remote_code (ModelArguments has it; see train/dpo.py's GlmtuneDPOConfig)."""

    trust_remote_code: bool = field(default=False, init=False)


class PretokenizedCPOTrainer(PretokenizedPairs, CPOTrainer):
    """CPOTrainer on glmtune's tokenized pairs (train/paired_rows.py)."""


SIMPO = PreferenceMethod("simpo", PretokenizedCPOTrainer, METRICS, reference=False)
