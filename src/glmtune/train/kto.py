"""Kahneman-Tversky Optimisation with a LoRA adapter: TRL's KTOTrainer on answers labelled desirable or not, through
the run the preference methods share (train/preference.py).

KTO needs no pairs: each row is a prompt, one answer and its label. It trains on prepared labelled rows
(data/labelled.py) as they are, or on prepared preference pairs, two rows each (the chosen answer desirable, the
rejected one not), next to each other so that every batch holds both kinds. Its reference model is DPO's
(--reference, see train/preference.py)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from trl import KTOConfig, KTOTrainer

from glmtune.data.labelled import LABELLED_COLUMNS, check_both_labels, weight_advice
from glmtune.data.preference import PREFERENCE_COLUMNS
from glmtune.errors import UserError
from glmtune.train.preference import PreferenceMethod

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

METRICS = ("rewards/margins", "rewards/chosen", "rewards/rejected", "kl", "logps/chosen", "logps/rejected")


@dataclass
class GlmtuneKTOConfig(KTOConfig):
    """KTOConfig without its own --trust_remote_code (ModelArguments has it; see train/dpo.py's GlmtuneDPOConfig)."""

    trust_remote_code: bool = field(default=False, init=False)


def unpaired_rows(pairs: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """A batch of pairs as KTO's rows: each pair's chosen answer (label True), then its rejected one (False)."""
    rows: dict[str, list[Any]] = {"prompt_ids": [], "completion_ids": [], "label": []}
    for prompt, chosen, rejected in zip(pairs["prompt_ids"], pairs["chosen_ids"], pairs["rejected_ids"], strict=True):
        rows["prompt_ids"] += [prompt, prompt]
        rows["completion_ids"] += [chosen, rejected]
        rows["label"] += [True, False]
    return rows


def mismatched_completions(rows: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """Each row's KL completion: the answer of the nearest earlier row of the batch (cyclically) to another prompt.
    KTO estimates its KL term from mismatched (prompt, answer) rows; TRL takes the previous row's answer, which here
    would be the same prompt's other answer, so rows of the same prompt are passed over (a batch of one prompt
    falls back to TRL's rule)."""
    prompts, completions = rows["prompt_ids"], rows["completion_ids"]
    count, kl = len(prompts), []
    for j in range(count):
        earlier = [(j - step) % count for step in range(1, count)]
        other = next((k for k in earlier if prompts[k] != prompts[j]), (j - 1) % count)
        kl.append(completions[other])
    return {**rows, "KL_completion_ids": kl}


class PretokenizedKTOTrainer(KTOTrainer):
    """TRL 1.16's KTOTrainer tokenizes every dataset it is given (`_prepare_dataset`: prompt extraction, unpairing,
    the tokenizer's chat template, an eos token) with no switch to skip it, although its collator takes prompt_ids /
    completion_ids / label. Ours were rendered by glmtune's templates and cut by prepare's truncation rules: pairs are
    only unpaired here, and every row given its KL completion (TRL does that in the same method), and the balance of
    the training rows checked (TRL does that there too)."""

    def _prepare_dataset(self, dataset: Dataset, processing_class: PreTrainedTokenizerBase, args: KTOConfig,
                         dataset_name: str) -> Dataset:
        if not set(LABELLED_COLUMNS) <= set(dataset.column_names):
            assert set(PREFERENCE_COLUMNS) <= set(dataset.column_names), dataset.column_names  # prepare wrote them
            dataset = dataset.map(unpaired_rows, batched=True, remove_columns=dataset.column_names,
                                  desc=f"Unpairing the {dataset_name} pairs")
        if dataset_name == "train":
            check_balance(dataset["label"], args)
        if self.calculate_KL:  # batches as the sequential sampler will draw them
            dataset = dataset.map(mismatched_completions, batched=True, batch_size=args.per_device_train_batch_size,
                                  desc=f"KL completions of the {dataset_name} rows")
        return dataset


def check_balance(labels: list[bool], args: KTOConfig) -> None:
    """Refuse training rows of one kind only (the validation split may have taken the others), and warn when the
    weighted kinds are out of KTO's recommended balance, with the weights that would bring them in.

    Raises:
        UserError: no desirable or no undesirable row.
    """
    desirable = sum(labels)
    check_both_labels(desirable, len(labels) - desirable, "the training split")
    advice = weight_advice(desirable, len(labels) - desirable, args.desirable_weight, args.undesirable_weight)
    if advice:
        logger.warning(f"{desirable} desirable and {len(labels) - desirable} undesirable training rows, {advice}")


def check_kto_options(training_args: KTOConfig) -> None:
    """TRL's own refusals, said before anything loads.

    Raises:
        UserError: a batch of one, or a shuffled sampler, with a loss that estimates the KL term.
    """
    if training_args.loss_type == "apo_zero_unpaired":
        return
    if training_args.per_device_train_batch_size < 2:
        raise UserError(f"--per_device_train_batch_size {training_args.per_device_train_batch_size}: KTO estimates its "
                        "KL term from the other rows of a batch, so a batch needs at least 2 rows",
                        hint="--per_device_train_batch_size 2 or more (--gradient_accumulation_steps for larger "
                             "effective batches)")
    if training_args.train_sampling_strategy != "sequential":
        raise UserError(f"--train_sampling_strategy {training_args.train_sampling_strategy}: KTO's KL completions are "
                        "set for batches drawn in order", hint="leave --train_sampling_strategy out (sequential)")


KTO = PreferenceMethod("kto", PretokenizedKTOTrainer, METRICS, reference=True, check=check_kto_options, labelled=True)
