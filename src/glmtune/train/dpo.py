"""Direct Preference Optimisation with a LoRA adapter: TRL's DPOTrainer on the pairs `glmtune prepare` tokenized.

The reference model costs no second copy of the base weights. The policy is a PeftModel and TRL computes the
reference log-probabilities through the same weights: with the adapters disabled (the base model), or, when the run
starts from an adapter (--peft_path) with --reference start, through a frozen copy of that adapter (TRL's "ref"
adapter, adapter-sized). The run directory is laid out as train's: checkpoints while training, then the adapter, the
tokenizer, dpo_config.yaml, the loss plot and manifest.json, written last.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trl import DPOConfig, DPOTrainer

from glmtune.arguments import DpoArguments, LoraArguments, ModelArguments, PrecisionArguments
from glmtune.config import to_plain_dict
from glmtune.data.preference import PREFERENCE_COLUMNS, read_prepared_manifest
from glmtune.data.prepared import prepared_dataset_dir
from glmtune.errors import UserError
from glmtune.inference.engine import adapter_base_model, check_adapter_tokenizer
from glmtune.models import quantization
from glmtune.models.hub import canonical_model_name
from glmtune.models.loading import load_tokenizer, tokenizer_fingerprint
from glmtune.train.sft import (
    _add_lora,
    _check_output,
    _check_same_tokenizer,
    _choose_precision,
    _clear_output,
    _load_for_training,
    _load_splits,
    _long_lived_objects_frozen,
    _save_final,
)

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

    def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
        assert set(PREFERENCE_COLUMNS) <= set(dataset.column_names), dataset.column_names  # prepare wrote them
        return dataset


def run_dpo(model_args: ModelArguments, dpo_args: DpoArguments, lora_args: LoraArguments, training_args: Any,
            precision_args: PrecisionArguments | None = None) -> DpoResult:
    start_adapter = Path(dpo_args.peft_path) if dpo_args.peft_path else None
    adapter_base = adapter_base_model(start_adapter) if start_adapter else None
    output_dir = Path(training_args.output_dir)
    inputs = [Path(p) for p in (dpo_args.dataset_path, start_adapter) if p]  # never written over
    resume = _check_output(training_args, dpo_args.overwrite_output_dir, tuple(inputs))
    precision_args = precision_args or PrecisionArguments()
    precision, training_args = _choose_precision(model_args, precision_args, training_args)
    # After _choose_precision: on CPU only the replaced training_args have joined the process group.
    dataset_path = prepared_dataset_dir(dpo_args.dataset_path, model_args.model or adapter_base, training_args,
                                        dpo_args, model_args.trust_remote_code)
    dataset_dir, dataset_manifest = read_prepared_manifest(str(dataset_path), preference=True)
    model_name = model_args.model or dataset_manifest.get("model") or adapter_base
    if not model_name:
        raise UserError(f"{dataset_dir}/manifest.json names no model", hint="pass --model")
    model_name = canonical_model_name(model_name)

    tokenizer = load_tokenizer(model_name, model_args.trust_remote_code)
    _check_same_tokenizer(tokenizer, model_name, dataset_manifest, dataset_dir)
    if start_adapter:
        check_adapter_tokenizer(start_adapter, tokenizer, model_name)
    dataset, eval_dataset = _load_splits(dataset_dir, training_args)

    model = _load_for_training(model_args, model_name, precision, training_args)
    if start_adapter:
        model = _load_trainable_adapter(model, start_adapter, model_name)
    else:
        model = _add_lora(model, model_name, lora_args, resume, training_args.seed)
    _clear_output(training_args, output_dir, resume)

    trainer = PretokenizedDPOTrainer(model=model, ref_model=None, args=training_args, train_dataset=dataset,
                                     eval_dataset=eval_dataset, processing_class=tokenizer)
    reference = _settle_reference(trainer.model, start_adapter, dpo_args.reference)
    print(f"reference model: {reference}")
    with _long_lived_objects_frozen():
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    eval_metrics = trainer.evaluate() if eval_dataset is not None else {}
    if REF_ADAPTER in trainer.model.peft_config:  # the output holds the trained adapter only
        trainer.model.delete_adapter(REF_ADAPTER)

    logged = [entry for entry in trainer.state.log_history if "loss" in entry and "rewards/margins" in entry]
    rewards = {key: logged[-1][key] for key in REWARD_METRICS if key in logged[-1]} if logged else {}
    config = to_plain_dict(model_args, dpo_args, lora_args, precision_args, training_args)
    config["model"], config["precision"] = model_name, precision.name
    config["quantization"] = quantization.describe(trainer.model.get_base_model())
    _save_final(output_dir, trainer, config, command="dpo",
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


def _load_trainable_adapter(model: Any, adapter: Path, model_name: str) -> Any:
    """An earlier run's adapter (e.g. SFT), trained further: its own rank and targets, not the LoRA options."""
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
    except (ValueError, RuntimeError, KeyError, OSError) as e:  # shapes or module names of another base model
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load the adapter {adapter} onto '{model_name}': {first}",
                        hint="pass the --model the adapter was trained on, or leave --model out") from None
    model.print_trainable_parameters()
    return model


def _settle_reference(model: Any, start_adapter: Path | None, reference: str) -> str:
    """Make the reference what was asked for, and say what it is. TRL gives any PeftModel a frozen "ref" copy of its
    adapter: with a new adapter that copy is the zero update (LoRA's B starts at 0), so disabling the adapters gives
    the same log-probabilities with less compute; with --reference base it is dropped on purpose."""
    if start_adapter is not None and reference == "start":
        assert REF_ADAPTER in model.peft_config  # TRL 1.16's behaviour, which this option relies on
        return f"the base model with a frozen copy of the starting adapter {start_adapter}"
    if REF_ADAPTER in model.peft_config:
        model.delete_adapter(REF_ADAPTER)
    return "the base model without any adapter"
