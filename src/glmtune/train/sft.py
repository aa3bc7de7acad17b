"""Supervised fine-tuning with a LoRA adapter: PEFT on transformers' Trainer, on the shared training skeleton.

What SFT adds to the skeleton's steps: the chunked loss (ChunkedLossTrainer), packing (a batch's samples end to end,
in one row where the model's attention allows), and --eval_generate (generate on each checkpoint, keep the best).
The run directory holds the Trainer's checkpoints while training (resume reads them), then the adapter in
PEFT's format, the tokenizer, the resolved config, the loss plot and manifest.json, written last.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from glmtune.arguments import (
    ComputeArguments,
    DatasetArguments,
    GenerationEvalArguments,
    HealthArguments,
    LoraArguments,
    ModelArguments,
)
from glmtune.arguments.ptuning import PtuningArguments
from glmtune.errors import UserError
from glmtune.models.loading import stop_token_ids, tokenizer_fingerprint
from glmtune.models.lora import base_model
from glmtune.train.batching import make_collator, supports_packing
from glmtune.train.packed_attention import can_use_packed_sdpa, use_packed_sdpa
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
    from transformers import TrainingArguments

    from glmtune.evaluation.callback import GenerationEvalCallback


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    final_loss: float | None


def run_sft(model_args: ModelArguments, data_args: DatasetArguments, lora_args: LoraArguments,
            training_args: TrainingArguments, compute_args: ComputeArguments | None = None,
            eval_args: GenerationEvalArguments | None = None, health_args: HealthArguments | None = None,
            ptuning_args: PtuningArguments | None = None) -> TrainResult:
    """Fine-tune a LoRA adapter on a prepared dataset (or a data file, tokenized first) and save the run.

    Args:
        model_args: --model (else the dataset's), quantization and remote-code options.
        data_args: --dataset_path, the tokenizing options for a data file, --overwrite_output_dir.
        lora_args: the new adapter's rank, alpha, dropout and targets.
        training_args: transformers' TrainingArguments (output_dir, steps, batch, resume, DeepSpeed/FSDP...).
        compute_args: precision and the chunked loss; None for their defaults.
        eval_args: --eval_generate, scoring each saved checkpoint by generation; None for off.
        health_args: what a non-finite gradient does (--nan_policy); None for the defaults (stop).
        ptuning_args: the prefix's options for --finetuning_type ptuning; None for their defaults.
    Returns:
        The run directory, the steps taken and the last logged training loss.
    Raises:
        UserError: any option, input or output the run can't use, before anything is written.
    """
    from transformers import Trainer

    from glmtune.train.loss import ChunkedLossTrainer

    output_dir = Path(training_args.output_dir)
    resume = check_output(training_args, data_args.overwrite_output_dir)
    compute_args = compute_args or ComputeArguments()
    precision, training_args = choose_run_precision(model_args, compute_args, training_args)
    dataset_dir, dataset_manifest = prepare_data(data_args.dataset_path, model_args.model, training_args, data_args,
                                                 model_args.trust_remote_code, preference=False)
    model_name = resolve_model_name(model_args.model, dataset_manifest, dataset_dir)

    tokenizer = load_matching_tokenizer(model_name, model_args.trust_remote_code, dataset_manifest, dataset_dir)
    tokenizer.padding_side = "right"  # training pads on the right; generation sets left itself
    splits = load_splits(dataset_dir, training_args)
    eval_args = eval_args or GenerationEvalArguments()
    generation_eval = None
    if eval_args.eval_generate:
        _check_generation_eval(training_args, splits.validation, dataset_dir, lora_args.finetuning_type)
        from glmtune.evaluation.callback import GenerationEvalCallback

        generation_eval = GenerationEvalCallback(tokenizer, stop_token_ids(model_name, tokenizer), splits.validation,
                                                 eval_args)

    model = load_model_for_training(model_args, model_name, precision, training_args)
    ptuning_args = ptuning_args or PtuningArguments()
    model = attach_adapter(model, model_name, lora_args, training_args.seed, resume, ptuning_args=ptuning_args)
    clear_output(training_args, resume)

    chunked = compute_args.chunked_loss and _supports_chunked_loss(model)
    packing = data_args.packing and supports_packing(model)
    if data_args.packing and not packing:
        logger.info("packing: off (this model derives its attention from the ids, packed samples would see each "
                    "other); batches are padded")
    # Each batch in one row without padding, attention sample by sample. Not under torch.nn.DataParallel (one
    # process, several GPUs), which would split the row's sample boundaries apart from the row.
    one_row = packing and can_use_packed_sdpa(model) and training_args.n_gpu <= 1
    if one_row:
        use_packed_sdpa(model)
    trainer = build_trainer(
        ChunkedLossTrainer if chunked else Trainer, model, training_args, splits, tokenizer, health_args,
        loraplus_lr_ratio=lora_args.loraplus_lr_ratio,
        data_collator=make_collator(tokenizer, packing, getattr(model.config, "hidden_size", None), one_row),
        callbacks=[generation_eval] if generation_eval else None,
    )
    _check_generation_eval_sharding(generation_eval)
    result = run_training(trainer, resume)
    best = None
    if generation_eval is not None:  # the best checkpoint's adapter becomes the final one (its eval_loss measured too)
        with training_args.main_process_first(desc="loading the best checkpoint"):
            best = generation_eval.restore_best(trainer.model, output_dir)
        if best is not None:
            logger.info(f"best checkpoint by {best['metric']}: step {best['best_step']} ({best['best_value']:.4f}); "
                        "its adapter is the final one")
    # With a validation split, the run always ends with an evaluation (and evaluates periodically too when
    # --eval_strategy asks for it).
    eval_loss = trainer.evaluate()["eval_loss"] if splits.validation is not None else None

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    # What ran: the model may not support them, auto resolved to one precision.
    config = resolved_config((model_args, data_args, lora_args, ptuning_args, compute_args, eval_args, training_args),
                             model_name, precision, model, chunked_loss=chunked, packing=packing,
                             attention=base_model(model).config._attn_implementation)
    save_final(output_dir, trainer, config, command="train",
               base_model=model_name, dataset=str(dataset_dir),
               tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
               global_step=trainer.state.global_step, train_loss=result.training_loss,
               last_logged_loss=losses[-1] if losses else None, eval_loss=eval_loss,
               train_runtime=result.metrics.get("train_runtime"), generation_eval=best,
               world_size=training_args.world_size)
    return TrainResult(output_dir, trainer.state.global_step, losses[-1] if losses else None)


def _check_generation_eval_sharding(generation_eval: GenerationEvalCallback | None) -> None:
    """--eval_generate generates on the main process alone; under DeepSpeed ZeRO-3 each forward gathers weights from
    every process, so the main process would wait for the others forever."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if generation_eval is not None and is_deepspeed_zero3_enabled():
        raise UserError("--eval_generate can't run under DeepSpeed ZeRO-3 (it generates on the main process alone, "
                        "and ZeRO-3 needs every process in each forward)",
                        hint="ZeRO-2 (examples/deepspeed/ds_z2_config.json), or train without --eval_generate and "
                             "run glmtune eval on the adapter afterwards")


def _check_generation_eval(training_args: TrainingArguments, eval_dataset: Dataset | None, dataset_dir: Path,
                           finetuning_type: str = "lora") -> None:
    if finetuning_type != "lora":
        raise UserError(f"--eval_generate keeps the best checkpoint's adapter, and --finetuning_type "
                        f"{finetuning_type} trains no adapter", hint="leave --eval_generate out, and run glmtune eval "
                        "on the checkpoints (--model CHECKPOINT) afterwards")
    if eval_dataset is None:
        raise UserError(f"--eval_generate needs a validation split, and {dataset_dir} has none",
                        hint="prepare the data with --val_size")
    if training_args.save_strategy == "no":
        raise UserError("--eval_generate evaluates each saved checkpoint, and --save_strategy is no",
                        hint="pass --save_strategy steps with --save_steps N (or epoch)")
    if training_args.load_best_model_at_end or training_args.metric_for_best_model:
        raise UserError("--eval_generate keeps the best checkpoint by its own metric; --load_best_model_at_end and "
                        "--metric_for_best_model choose by the Trainer's", hint="use one or the other")


def _supports_chunked_loss(model: PeftModel) -> bool:
    """The chunked loss needs the model to return its final hidden states without computing every position's
    logits (transformers' `logits_to_keep`), and to expose its output layer; remote-code models may not."""
    base = base_model(model)
    return "logits_to_keep" in inspect.signature(base.forward).parameters and \
        base.get_output_embeddings() is not None
