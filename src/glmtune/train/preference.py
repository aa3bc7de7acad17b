"""The run every preference method shares (dpo, kto, orpo, simpo): TRL's trainer for the method on the pairs
`glmtune prepare` tokenized, on the shared training skeleton (train/skeleton.py).

A method module (train/dpo.py, train/kto.py, train/orpo.py, train/simpo.py) says only what is its own, as a
PreferenceMethod: its command, its TRL trainer (taught to take glmtune's tokenized rows as they are), the metrics it
logs, and whether it measures against a reference model.

The reference model, for the methods that have one (DPO, KTO), costs no second copy of the base weights. The policy
is a PeftModel and TRL computes the reference log-probabilities through the same weights: with the adapters disabled
(the base model), or, when the run starts from an adapter (--peft_path) with --reference start, through a frozen copy
of that adapter (TRL's "ref" adapter, adapter-sized). ORPO and SimPO need none. The run directory is laid out as
train's: checkpoints while training, then the adapter, the tokenizer, <command>_config.yaml, the loss plot and
manifest.json, written last.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from glmtune.arguments import HealthArguments, LoraArguments, ModelArguments, PrecisionArguments
from glmtune.inference.engine import adapter_base_model, check_adapter_tokenizer
from glmtune.models.loading import tokenizer_fingerprint
from glmtune.train.command import check_liger
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
    saved_what,
)

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import Trainer, TrainingArguments

REF_ADAPTER = "ref"  # the name TRL gives the frozen copy of a starting adapter
NO_REFERENCE = "none: the loss compares the policy's own likelihoods of the two answers"


@dataclass(frozen=True)
class PreferenceMethod:
    command: str  # the verb: the config file's name and the manifest's command
    trainer_class: type[Trainer]  # TRL's trainer, taking glmtune's tokenized rows
    metrics: tuple[str, ...]  # what the trainer logs that the manifest and the result keep (first and last logged)
    reference: bool  # whether the loss measures the policy against a reference model (--reference)
    check: Callable[[Any], None] | None = None  # the method's refusals of its config, before anything loads
    labelled: bool = False  # also trains on rows labelled desirable or not, unpaired (KTO)


@dataclass
class PreferenceResult:
    output_dir: Path
    global_step: int
    final_loss: float | None
    rewards: dict[str, float] = field(default_factory=dict)  # the last logged values of the method's metrics


def run_preference(method: PreferenceMethod, model_args: ModelArguments, method_args: Any, lora_args: LoraArguments,
                   training_args: TrainingArguments, precision_args: PrecisionArguments | None = None,
                   health_args: HealthArguments | None = None) -> PreferenceResult:
    """Preference-tune a LoRA adapter (a new one, or --peft_path's) on prepared pairs with `method`, and save the run.

    Args:
        model_args: --model (else the dataset's, else the starting adapter's base), quantization, remote code.
        method_args: --dataset_path, --peft_path to start from, --overwrite_output_dir, and --reference for the
            methods with a reference model.
        lora_args: the new adapter's rank, alpha, dropout and targets (ignored with --peft_path).
        training_args: the method's TRL config as glmtune declares it (TrainingArguments plus beta, loss_type...).
        precision_args: --precision; None for auto.
        health_args: what a non-finite gradient does (--nan_policy); None for the defaults (stop).
    Returns:
        The run directory, the steps taken, the last logged loss and method metrics.
    Raises:
        UserError: any option, input or output the run can't use, before anything is written.
    """
    start_adapter = Path(method_args.peft_path) if method_args.peft_path else None
    adapter_base = adapter_base_model(start_adapter) if start_adapter else None
    output_dir = Path(training_args.output_dir)
    inputs = [Path(p) for p in (method_args.dataset_path, start_adapter) if p]  # never written over
    resume = check_output(training_args, method_args.overwrite_output_dir, tuple(inputs))
    precision_args = precision_args or PrecisionArguments()
    precision, training_args = choose_run_precision(model_args, precision_args, training_args)
    if method.check is not None:
        method.check(training_args)
    check_liger(training_args)
    dataset_dir, dataset_manifest = prepare_data(method_args.dataset_path, model_args.model or adapter_base,
                                                 training_args, method_args, model_args.trust_remote_code,
                                                 preference=True, labelled=method.labelled)
    model_name = resolve_model_name(model_args.model, dataset_manifest, dataset_dir, fallback=adapter_base)

    tokenizer = load_matching_tokenizer(model_name, model_args.trust_remote_code, dataset_manifest, dataset_dir)
    if start_adapter:
        check_adapter_tokenizer(start_adapter, tokenizer, model_name)
    splits = load_splits(dataset_dir, training_args)

    model = load_model_for_training(model_args, model_name, precision, training_args)
    model = attach_adapter(model, model_name, lora_args, training_args.seed, resume, start_adapter)
    clear_output(training_args, resume)

    options = {"ref_model": None} if method.reference else {}
    trainer = build_trainer(method.trainer_class, model, training_args, splits, tokenizer, health_args,
                            loraplus_lr_ratio=lora_args.loraplus_lr_ratio, **options)
    reference = (settle_reference(trainer.model, start_adapter, method_args.reference) if method.reference
                 else NO_REFERENCE)
    logger.info(f"reference model: {reference}")
    result = run_training(trainer, resume)
    eval_metrics = trainer.evaluate() if splits.validation is not None else {}
    if REF_ADAPTER in getattr(trainer.model, "peft_config", {}):  # the output holds the trained adapter only
        trainer.model.delete_adapter(REF_ADAPTER)

    logged = [entry for entry in trainer.state.log_history if "loss" in entry and method.metrics[0] in entry]
    first, last = (_pick(logged[0], method.metrics), _pick(logged[-1], method.metrics)) if logged else ({}, {})
    config = resolved_config((model_args, method_args, lora_args, precision_args, training_args), model_name,
                             precision, trainer.model)
    save_final(output_dir, trainer, config, command=method.command,
               base_model=model_name, dataset=str(dataset_dir), start_adapter=method_args.peft_path,
               reference=reference, tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
               global_step=trainer.state.global_step, train_loss=result.training_loss,
               last_logged_loss=logged[-1]["loss"] if logged else None,
               first_logged_rewards=first or None, last_logged_rewards=last or None,
               eval_metrics={k: v for k, v in eval_metrics.items() if isinstance(v, (int, float))} or None,
               train_runtime=result.metrics.get("train_runtime"), world_size=training_args.world_size)
    return PreferenceResult(output_dir, trainer.state.global_step, logged[-1]["loss"] if logged else None, last)


def _pick(entry: dict[str, Any], keys: tuple[str, ...]) -> dict[str, float]:
    return {key: entry[key] for key in keys if key in entry}


def settle_reference(model: PeftModel, start_adapter: Path | None, reference: str) -> str:
    """Make the reference what was asked for, and say what it is. TRL gives any PeftModel a frozen "ref" copy of its
    adapter: with a new adapter that copy is the zero update (LoRA's B starts at 0), so disabling the adapters gives
    the same log-probabilities with less compute; with --reference base it is dropped on purpose. A model without
    adapters (full or freeze tuning, --finetuning_type) gets TRL's frozen copy of itself: twice the weights' memory."""
    if not hasattr(model, "peft_config"):
        return "a frozen copy of the model as the run starts (made by TRL: a second copy of the weights)"
    if start_adapter is not None and reference == "start":
        assert REF_ADAPTER in model.peft_config  # TRL 1.16's behaviour (DPO and KTO), which this option relies on
        return f"the base model with a frozen copy of the starting adapter {start_adapter}"
    if REF_ADAPTER in model.peft_config:
        model.delete_adapter(REF_ADAPTER)
    return "the base model without any adapter"


def summary(result: PreferenceResult, finetuning_type: str = "lora") -> str:
    """The line a preference command prints at the end: where the adapter (or model) went, and the last logged
    metrics."""
    line = f"\n{saved_what(finetuning_type)} saved to {result.output_dir} after {result.global_step} steps"
    if result.final_loss is None or not result.rewards:
        return line
    shown = [f"loss {result.final_loss:.4f}"]
    if "rewards/accuracies" in result.rewards:
        shown.append(f"reward accuracy {result.rewards['rewards/accuracies']:.2f}")
    if "rewards/margins" in result.rewards:
        shown.append(f"reward margin {result.rewards['rewards/margins']:.4f}")
    return line + f" (last logged: {', '.join(shown)})"
