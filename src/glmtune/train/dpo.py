"""Direct Preference Optimisation with a LoRA adapter: TRL's DPOTrainer on the pairs `glmtune prepare` tokenized,
on the shared training skeleton (train/skeleton.py).

What DPO adds to the skeleton's steps: TRL's trainer and config (taking glmtune's tokenized pairs as they are), the
starting adapter (--peft_path, whose base model and tokenizer the run must match), the reference model, and the
reward metrics in the manifest.

The reference model costs no second copy of the base weights. The policy is a PeftModel and TRL computes the
reference log-probabilities through the same weights: with the adapters disabled (the base model), or, when the run
starts from an adapter (--peft_path) with --reference start, through a frozen copy of that adapter (TRL's "ref"
adapter, adapter-sized). Full and freeze runs (--finetuning_type) train the model's own weights: TRL then keeps a
frozen copy of the whole model as the reference (twice the weights' memory). The run directory is laid out as
train's: checkpoints while training, then the adapter (or the whole model), the tokenizer, dpo_config.yaml, the loss
plot and manifest.json, written last.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from trl import DPOConfig, DPOTrainer

from glmtune.arguments import DpoArguments, HealthArguments, LoraArguments, ModelArguments, PrecisionArguments
from glmtune.data.preference import PREFERENCE_COLUMNS
from glmtune.inference.engine import adapter_base_model, check_adapter_tokenizer
from glmtune.models.loading import tokenizer_fingerprint
from glmtune.train.skeleton import (
    attach_adapter,
    build_trainer,
    check_output,
    choose_run_precision,
    clear_output,
    load_matching_tokenizer,
    load_model_for_training,
    load_splits,
    prepare_data,
    resolve_model_name,
    resolved_config,
    run_training,
    save_final,
)

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from datasets import Dataset
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

REWARD_METRICS = ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")
REF_ADAPTER = "ref"  # the name TRL gives the frozen copy of a starting adapter


@dataclass
class DpoResult:
    output_dir: Path
    global_step: int
    final_loss: float | None
    rewards: dict[str, float] = field(default_factory=dict)  # the last logged REWARD_METRICS


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


def run_dpo(model_args: ModelArguments, dpo_args: DpoArguments, lora_args: LoraArguments,
            training_args: GlmtuneDPOConfig, precision_args: PrecisionArguments | None = None,
            health_args: HealthArguments | None = None) -> DpoResult:
    """Preference-tune a LoRA adapter (a new one, or --peft_path's) on prepared pairs and save the run.

    Args:
        model_args: --model (else the dataset's, else the starting adapter's base), quantization, remote code.
        dpo_args: --dataset_path (pairs), --peft_path to start from, --reference, --overwrite_output_dir.
        lora_args: the new adapter's rank, alpha, dropout and targets (ignored with --peft_path).
        training_args: TRL's DPOConfig as glmtune declares it (TrainingArguments plus beta, loss_type...).
        precision_args: --precision; None for auto.
        health_args: what a non-finite gradient does (--nan_policy); None for the defaults (stop).
    Returns:
        The run directory, the steps taken, the last logged loss and reward metrics.
    Raises:
        UserError: any option, input or output the run can't use, before anything is written.
    """
    start_adapter = Path(dpo_args.peft_path) if dpo_args.peft_path else None
    adapter_base = adapter_base_model(start_adapter) if start_adapter else None
    output_dir = Path(training_args.output_dir)
    inputs = [Path(p) for p in (dpo_args.dataset_path, start_adapter) if p]  # never written over
    resume = check_output(training_args, dpo_args.overwrite_output_dir, tuple(inputs))
    precision_args = precision_args or PrecisionArguments()
    precision, training_args = choose_run_precision(model_args, precision_args, training_args)
    dataset_dir, dataset_manifest = prepare_data(dpo_args.dataset_path, model_args.model or adapter_base,
                                                 training_args, dpo_args, model_args.trust_remote_code,
                                                 preference=True)
    model_name = resolve_model_name(model_args.model, dataset_manifest, dataset_dir, fallback=adapter_base)

    tokenizer = load_matching_tokenizer(model_name, model_args.trust_remote_code, dataset_manifest, dataset_dir)
    if start_adapter:
        check_adapter_tokenizer(start_adapter, tokenizer, model_name)
    splits = load_splits(dataset_dir, training_args)

    model = load_model_for_training(model_args, model_name, precision, training_args)
    model = attach_adapter(model, model_name, lora_args, training_args.seed, resume, start_adapter)
    clear_output(training_args, resume)

    trainer = build_trainer(PretokenizedDPOTrainer, model, training_args, splits, tokenizer, health_args,
                            loraplus_lr_ratio=lora_args.loraplus_lr_ratio, ref_model=None)
    reference = _settle_reference(trainer.model, start_adapter, dpo_args.reference)
    logger.info(f"reference model: {reference}")
    result = run_training(trainer, resume)
    eval_metrics = trainer.evaluate() if splits.validation is not None else {}
    if REF_ADAPTER in getattr(trainer.model, "peft_config", {}):  # the output holds the trained adapter only
        trainer.model.delete_adapter(REF_ADAPTER)

    logged = [entry for entry in trainer.state.log_history if "loss" in entry and "rewards/margins" in entry]
    rewards = {key: logged[-1][key] for key in REWARD_METRICS if key in logged[-1]} if logged else {}
    config = resolved_config((model_args, dpo_args, lora_args, precision_args, training_args), model_name, precision,
                             trainer.model)
    save_final(output_dir, trainer, config, command="dpo",
               base_model=model_name, dataset=str(dataset_dir), start_adapter=dpo_args.peft_path,
               reference=reference, tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
               global_step=trainer.state.global_step, train_loss=result.training_loss,
               last_logged_loss=logged[-1]["loss"] if logged else None,
               first_logged_rewards={key: logged[0][key] for key in REWARD_METRICS if key in logged[0]}
               if logged else None,
               last_logged_rewards=rewards or None,
               eval_metrics={k: v for k, v in eval_metrics.items() if isinstance(v, (int, float))} or None,
               train_runtime=result.metrics.get("train_runtime"), world_size=training_args.world_size)
    return DpoResult(output_dir, trainer.state.global_step, logged[-1]["loss"] if logged else None, rewards)


def _settle_reference(model: PeftModel, start_adapter: Path | None, reference: str) -> str:
    """Make the reference what was asked for, and say what it is. TRL gives any PeftModel a frozen "ref" copy of its
    adapter: with a new adapter that copy is the zero update (LoRA's B starts at 0), so disabling the adapters gives
    the same log-probabilities with less compute; with --reference base it is dropped on purpose. A model without
    adapters (full or freeze tuning) gets TRL's frozen copy of itself."""
    if not hasattr(model, "peft_config"):
        return "a frozen copy of the model as DPO starts (made by TRL: a second copy of the weights)"
    if start_adapter is not None and reference == "start":
        assert REF_ADAPTER in model.peft_config  # TRL 1.16's behaviour, which this option relies on
        return f"the base model with a frozen copy of the starting adapter {start_adapter}"
    if REF_ADAPTER in model.peft_config:
        model.delete_adapter(REF_ADAPTER)
    return "the base model without any adapter"
