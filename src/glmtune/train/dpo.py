"""Direct Preference Optimisation with a LoRA adapter: TRL's DPOTrainer on the pairs `glmtune prepare` tokenized,
through the run the preference methods share (train/preference.py).

What DPO adds: TRL's trainer and config (taking glmtune's tokenized pairs as they are), the reference model
(--reference, see train/preference.py) and the reward metrics in the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from trl import DPOConfig, DPOTrainer

from glmtune.arguments import DpoArguments, HealthArguments, LoraArguments, ModelArguments, PrecisionArguments
from glmtune.data.preference import PREFERENCE_COLUMNS
from glmtune.train.preference import REF_ADAPTER, PreferenceMethod, PreferenceResult, run_preference

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

REWARD_METRICS = ("rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected")
DpoResult = PreferenceResult

__all__ = ["REF_ADAPTER", "DPO", "DpoResult", "GlmtuneDPOConfig", "PretokenizedDPOTrainer", "run_dpo"]


@dataclass
class GlmtuneDPOConfig(DPOConfig):
    """DPOConfig without its own --trust_remote_code: ModelArguments has that flag (for the tokenizer and the model
    glmtune loads), and TRL's is read only for a model TRL loads by name, which glmtune never asks it to. A field
    with init=False is not an option of the parser."""

    trust_remote_code: bool = field(default=False, init=False)


class PretokenizedDPOTrainer(DPOTrainer):
    """TRL 1.16's DPOTrainer tokenizes every dataset it is given (`_prepare_dataset` extracts a prompt, appends the
    eos token to text answers, applies the tokenizer's chat template) and has no switch to skip that, although its
    collator takes exactly prompt_ids / chosen_ids / rejected_ids. Ours were rendered by glmtune's templates (the
    ChatGLM family's included) and cut by prepare's truncation rules, so they go to the collator unchanged."""

    def _prepare_dataset(self, dataset: Dataset, processing_class: PreTrainedTokenizerBase, args: DPOConfig,
                         dataset_name: str) -> Dataset:
        assert set(PREFERENCE_COLUMNS) <= set(dataset.column_names), dataset.column_names  # prepare wrote them
        return dataset


DPO = PreferenceMethod("dpo", PretokenizedDPOTrainer, REWARD_METRICS, reference=True)


def run_dpo(model_args: ModelArguments, dpo_args: DpoArguments, lora_args: LoraArguments,
            training_args: GlmtuneDPOConfig, precision_args: PrecisionArguments | None = None,
            health_args: HealthArguments | None = None) -> DpoResult:
    """Preference-tune a LoRA adapter (a new one, or --peft_path's) on prepared pairs with DPO and save the run
    (train/preference.py's run_preference, whose arguments these are)."""
    return run_preference(DPO, model_args, dpo_args, lora_args, training_args, precision_args, health_args)
