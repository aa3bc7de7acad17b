"""Supervised fine-tuning with a LoRA adapter: PEFT on transformers' Trainer.

The run directory holds the Trainer's checkpoints while training (resume reads them), then the adapter in
PEFT's format, the tokenizer, the resolved config, the loss plot and manifest.json, written last.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from glmtune.arguments import (
    ComputeArguments,
    DatasetArguments,
    GenerationEvalArguments,
    LoraArguments,
    ModelArguments,
    PrecisionArguments,
)
from glmtune.artifacts import check_writable_output, empty_directory, read_json_object, write_manifest
from glmtune.config import to_plain_dict
from glmtune.data.preference import read_prepared_manifest
from glmtune.data.prepared import prepared_dataset_dir
from glmtune.errors import UserError
from glmtune.models import quantization
from glmtune.models.hub import canonical_model_name
from glmtune.models.loading import load_model, load_tokenizer, stop_token_ids, tokenizer_fingerprint
from glmtune.models.lora import base_model, resolve_target_modules
from glmtune.train.batching import make_collator, supports_packing
from glmtune.train.packed_attention import can_use_packed_sdpa, use_packed_sdpa
from glmtune.train.plot import plot_loss
from glmtune.train.precision import Precision, apply_to_training_args, choose_precision, detect_hardware

LOSS_PLOT = "loss.png"
STAGING = ".final.tmp"  # inside the output directory: the final artifacts before they are moved into place


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    final_loss: float | None


def run_sft(model_args: ModelArguments, data_args: DatasetArguments, lora_args: LoraArguments,
            training_args: Any, compute_args: ComputeArguments | None = None,
            eval_args: GenerationEvalArguments | None = None) -> TrainResult:
    from transformers import Trainer

    from glmtune.train.loss import ChunkedLossTrainer

    output_dir = Path(training_args.output_dir)
    resume = _check_output(training_args, data_args.overwrite_output_dir)
    compute_args = compute_args or ComputeArguments()
    precision, training_args = _choose_precision(model_args, compute_args, training_args)
    _check_sharding_plugins(training_args)
    # After _choose_precision: on CPU only the replaced training_args have joined the process group.
    dataset_path = prepared_dataset_dir(data_args.dataset_path, model_args.model, training_args, data_args,
                                        model_args.trust_remote_code)
    dataset_dir, dataset_manifest = read_prepared_manifest(str(dataset_path), preference=False)
    if not (model_args.model or dataset_manifest.get("model")):
        raise UserError(f"{dataset_dir}/manifest.json names no model", hint="pass --model")
    model_name = canonical_model_name(model_args.model or dataset_manifest["model"])

    tokenizer = load_tokenizer(model_name, model_args.trust_remote_code)
    _check_same_tokenizer(tokenizer, model_name, dataset_manifest, dataset_dir)
    tokenizer.padding_side = "right"  # training pads on the right; generation sets left itself
    dataset, eval_dataset = _load_splits(dataset_dir, training_args)
    eval_args = eval_args or GenerationEvalArguments()
    generation_eval = None
    if eval_args.eval_generate:
        _check_generation_eval(training_args, eval_dataset, dataset_dir)
        from glmtune.evaluation.callback import GenerationEvalCallback

        generation_eval = GenerationEvalCallback(tokenizer, stop_token_ids(model_name, tokenizer), eval_dataset,
                                                 eval_args)

    model = _load_for_training(model_args, model_name, precision, training_args)
    model = _add_lora(model, model_name, lora_args, resume, training_args.seed)
    _clear_output(training_args, output_dir, resume)

    chunked = compute_args.chunked_loss and _supports_chunked_loss(model)
    packing = data_args.packing and supports_packing(model)
    if data_args.packing and not packing:
        print("packing: off (this model derives its attention from the ids, packed samples would see each other); "
              "batches are padded")
    # Each batch in one row without padding, attention sample by sample. Not under torch.nn.DataParallel (one
    # process, several GPUs), which would split the row's sample boundaries apart from the row.
    one_row = packing and can_use_packed_sdpa(model) and training_args.n_gpu <= 1
    if one_row:
        use_packed_sdpa(model)
    trainer = (ChunkedLossTrainer if chunked else Trainer)(
        model=model,
        args=training_args,
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        data_collator=make_collator(tokenizer, packing, getattr(model.config, "hidden_size", None), one_row),
        processing_class=tokenizer,
        callbacks=[generation_eval] if generation_eval else None,
    )
    _check_generation_eval_sharding(generation_eval)
    with _long_lived_objects_frozen():
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    best = None
    if generation_eval is not None:  # the best checkpoint's adapter becomes the final one (its eval_loss measured too)
        with training_args.main_process_first(desc="loading the best checkpoint"):
            best = generation_eval.restore_best(trainer.model, output_dir)
        if best is not None:
            print(f"best checkpoint by {best['metric']}: step {best['best_step']} ({best['best_value']:.4f}); "
                  "its adapter is the final one")
    # With a validation split, the run always ends with an evaluation (and evaluates periodically too when
    # --eval_strategy asks for it).
    eval_loss = trainer.evaluate()["eval_loss"] if eval_dataset is not None else None

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    config = to_plain_dict(model_args, data_args, lora_args, compute_args, eval_args, training_args)
    # What ran: the model may not support them, auto resolved to one precision.
    config["chunked_loss"], config["packing"], config["precision"] = chunked, packing, precision.name
    config["attention"] = model.get_base_model().config._attn_implementation
    config["model"] = model_name
    config["quantization"] = quantization.describe(model.get_base_model())
    _save_final(output_dir, trainer, config,
                base_model=model_name, dataset=str(dataset_dir),
                tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
                global_step=trainer.state.global_step, train_loss=result.training_loss,
                last_logged_loss=losses[-1] if losses else None, eval_loss=eval_loss,
                train_runtime=result.metrics.get("train_runtime"), generation_eval=best,
                world_size=training_args.world_size)
    return TrainResult(output_dir, trainer.state.global_step, losses[-1] if losses else None)


def _check_output(training_args: Any, overwrite: bool, inputs: tuple[Path, ...] = ()) -> Path | None:
    """The checkpoint to resume from, if any; else --output_dir must be writable (see check_writable_output)."""
    output_dir = Path(training_args.output_dir)
    resume = _resolve_resume(training_args.resume_from_checkpoint, output_dir)
    if resume is None or output_dir.resolve() not in resume.resolve().parents:
        check_writable_output(output_dir, overwrite, inputs=inputs)
    return resume


def _choose_precision(model_args: ModelArguments, compute_args: PrecisionArguments,
                      training_args: Any) -> tuple[Precision, Any]:
    """The run's precision, and the training arguments set to match it."""
    hardware = detect_hardware()
    precision = choose_precision(compute_args.precision, training_args.bf16, training_args.fp16, hardware)
    training_args = apply_to_training_args(precision, training_args, hardware)
    if model_args.quantization_bit:  # no bitsandbytes backend: stop before loading anything
        quantization.check_backend(model_args.quantization_bit)
    return precision, training_args


def _check_sharding_plugins(training_args: Any) -> None:
    """FSDP needs GPUs: accelerate 1.15 enables it only for GPU processes, so on CPU (use_cpu, see
    apply_to_training_args) it drops an FSDP `accelerate launch --config_file` without a word and trains plain DDP
    (seen with examples/accelerate/fsdp.yaml on two CPU processes). DeepSpeed is not dropped: the Trainer's
    Accelerator gets the DeepSpeed plugin and switches to DeepSpeed whatever the device (accelerate/state.py,
    AcceleratorState), and DeepSpeed's CPU accelerator trains ZeRO-2/3 over gloo (measured: same adapter as DDP)."""
    import os

    if training_args.use_cpu and (training_args.fsdp or
                                  os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"):
        raise UserError("FSDP needs CUDA GPUs, and this run is on CPU (accelerate would train plain DDP instead)",
                        hint="on CPU: torchrun --nproc_per_node N -m glmtune train ..., or "
                             "accelerate launch --multi_gpu --num_processes N -m glmtune train ..., "
                             "or DeepSpeed (--deepspeed examples/deepspeed/ds_z3_config.json)")


def _check_generation_eval_sharding(generation_eval: Any) -> None:
    """--eval_generate generates on the main process alone; under DeepSpeed ZeRO-3 each forward gathers weights from
    every process, so the main process would wait for the others forever."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if generation_eval is not None and is_deepspeed_zero3_enabled():
        raise UserError("--eval_generate can't run under DeepSpeed ZeRO-3 (it generates on the main process alone, "
                        "and ZeRO-3 needs every process in each forward)",
                        hint="ZeRO-2 (examples/deepspeed/ds_z2_config.json), or train without --eval_generate and "
                             "run glmtune eval on the adapter afterwards")


def _load_for_training(model_args: ModelArguments, model_name: str, precision: Precision, training_args: Any) -> Any:
    print(f"precision: {precision.name} ({precision.reason}); LoRA weights and optimizer in fp32")
    model = load_model(model_name, model_args.trust_remote_code, dtype=precision.torch_dtype(),
                       quantization_bit=model_args.quantization_bit)
    if model_args.quantization_bit:
        model = quantization.prepare_for_training(model, training_args.gradient_checkpointing,
                                                  training_args.gradient_checkpointing_kwargs)
    return model


def _clear_output(training_args: Any, output_dir: Path, resume: Path | None) -> None:
    """Every check passed: only now may an old run be cleared away (by the main process, the others wait)."""
    with training_args.main_process_first(desc="preparing the output directory"):
        if training_args.process_index == 0:
            if resume is None:
                empty_directory(output_dir)
            shutil.rmtree(output_dir / STAGING, ignore_errors=True)


@contextlib.contextmanager
def _long_lived_objects_frozen() -> Iterator[None]:
    """Everything loaded before training (libraries, tokenizer, model, dataset index) lives for the whole run: kept
    out of the cyclic garbage collector's sight (gc.freeze), it is not rescanned by every full collection. The
    Trainer calls gc.collect() when training starts (accelerate's free_memory): 0.35 s for a loaded run's objects
    here, 3% of bench/train_speed.py's whole training run; Python's own full collections during training scan them
    too. Reference counting still frees them; only cycles among them (and garbage cycles not yet collected when
    training starts: no collection is run first, it would cost the same 0.35 s) wait until training ends."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _check_generation_eval(training_args: Any, eval_dataset: Any, dataset_dir: Path) -> None:
    if eval_dataset is None:
        raise UserError(f"--eval_generate needs a validation split, and {dataset_dir} has none",
                        hint="prepare the data with --val_size")
    if training_args.save_strategy == "no":
        raise UserError("--eval_generate evaluates each saved checkpoint, and --save_strategy is no",
                        hint="pass --save_strategy steps with --save_steps N (or epoch)")
    if training_args.load_best_model_at_end or training_args.metric_for_best_model:
        raise UserError("--eval_generate keeps the best checkpoint by its own metric; --load_best_model_at_end and "
                        "--metric_for_best_model choose by the Trainer's", hint="use one or the other")


def _load_splits(dataset_dir: Path, training_args: Any) -> tuple[Any, Any]:
    """The prepared `train` split and the `validation` split, if any."""
    from datasets import load_from_disk

    try:
        splits = load_from_disk(str(dataset_dir))
        dataset = splits["train"]
    except (FileNotFoundError, KeyError) as e:
        raise UserError(f"{dataset_dir} has a manifest but no readable `train` split ({e})",
                        hint="prepare it again with `glmtune prepare`") from None
    eval_dataset = splits["validation"] if "validation" in splits else None
    if eval_dataset is None and training_args.eval_strategy != "no":
        raise UserError(f"--eval_strategy {training_args.eval_strategy.value} needs a validation split, and "
                        f"{dataset_dir} has none", hint="prepare the data with --val_size")
    return dataset, eval_dataset


def _add_lora(model: Any, model_name: str, lora_args: LoraArguments, resume: Path | None, seed: int) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    # The adapter's random init draws from the global generator: seed it first, or two runs with the same --seed
    # start from different adapters (the Trainer seeds only after the adapter exists).
    set_seed(seed)
    peft_config = LoraConfig(
        task_type="CAUSAL_LM", r=lora_args.lora_rank, lora_alpha=lora_args.lora_alpha,
        lora_dropout=lora_args.lora_dropout,
        target_modules=resolve_target_modules(model.config.model_type, lora_args.target_modules),
    )
    if resume is not None:
        _check_same_adapter_shape(resume, peft_config)
    try:
        model = get_peft_model(model, peft_config)
    except ValueError as e:  # e.g. a --target_modules name the model doesn't have
        raise UserError(f"cannot add LoRA to '{model_name}': {e}", hint="check --target_modules") from None
    model.print_trainable_parameters()
    return model


def _check_same_adapter_shape(checkpoint: Path, peft_config: Any) -> None:
    """Resuming restores the adapter's weights: its rank and target modules must be the ones asked for."""
    saved = read_json_object(checkpoint / "adapter_config.json", "adapter config")
    ours = {"r": peft_config.r, "lora_alpha": peft_config.lora_alpha,
            "target_modules": sorted(peft_config.target_modules) if not isinstance(peft_config.target_modules, str)
            else peft_config.target_modules}
    theirs = {"r": saved.get("r"), "lora_alpha": saved.get("lora_alpha"),
              "target_modules": sorted(saved.get("target_modules") or []) if isinstance(ours["target_modules"], list)
              else saved.get("target_modules")}
    differing = [f"{key}: checkpoint {theirs[key]}, now {ours[key]}" for key in ours if ours[key] != theirs[key]]
    if differing:
        raise UserError(f"cannot resume from {checkpoint}: its LoRA adapter differs from the one asked for",
                        problems=differing, hint="resume with the LoRA flags the run started with")


def _supports_chunked_loss(model: Any) -> bool:
    """The chunked loss needs the model to return its final hidden states without computing every position's
    logits (transformers' `logits_to_keep`), and to expose its output layer; remote-code models may not."""
    base = base_model(model)
    return "logits_to_keep" in inspect.signature(base.forward).parameters and \
        base.get_output_embeddings() is not None


def _resolve_resume(value: str | None, output_dir: Path) -> Path | None:
    """--resume_from_checkpoint: a checkpoint path, or true/false (true: the latest one in --output_dir)."""
    from transformers.trainer_utils import get_last_checkpoint

    if value is None or str(value).lower() in {"", "false", "no", "0"}:
        return None
    if str(value).lower() in {"true", "yes", "1"}:
        last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
        if last is None:
            raise UserError(f"--resume_from_checkpoint true: no checkpoint-* directory in {output_dir}",
                            hint="check --output_dir, or pass the checkpoint's path")
        return Path(last)
    path = Path(value)
    if not (path / "trainer_state.json").is_file() or not (path / "adapter_config.json").is_file():
        raise UserError(f"--resume_from_checkpoint {value}: not a checkpoint directory (no trainer_state.json "
                        "and adapter_config.json)", hint="pass a checkpoint-* directory of an earlier run, or true")
    return path


def _check_same_tokenizer(tokenizer: Any, model_name: str, manifest: dict[str, Any], dataset_dir: Path) -> None:
    if tokenizer_fingerprint(tokenizer) != manifest.get("tokenizer_fingerprint"):
        raise UserError(f"{dataset_dir} was tokenized with the tokenizer of '{manifest.get('model')}', "
                        f"which differs from the tokenizer of '{model_name}'",
                        hint=f"prepare the data again with --model {model_name}, or train with "
                             f"--model {manifest.get('model')}")


def _save_final(output_dir: Path, trainer: Any, config: dict[str, Any], command: str = "train",
                **fields: Any) -> None:
    """Write the final artifacts into a staging directory, then move them into output_dir, manifest last."""
    staging = output_dir / STAGING
    # Every process takes part (a sharded model gathers its weights); only the main one writes. This saves the
    # adapter (adapter_config.json + adapter_model.safetensors) and the tokenizer.
    trainer.save_model(str(staging))
    if not trainer.is_world_process_zero():
        return
    (staging / f"{command}_config.yaml").write_text(yaml.safe_dump(config, sort_keys=True, allow_unicode=True),
                                                   encoding="utf-8")
    plot_loss(trainer.state.log_history, staging / LOSS_PLOT)
    write_manifest(staging, command, config, **fields)
    moved = sorted(staging.iterdir(), key=lambda p: p.name == "manifest.json")  # manifest last
    for item in moved:
        target = output_dir / item.name
        if target.is_dir():
            shutil.rmtree(target)
        item.replace(target)
    staging.rmdir()
