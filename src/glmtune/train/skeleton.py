"""The steps every training method shares, as public functions in the order a run takes them.

A method module (train/sft.py, train/preference.py) is one `run_<method>()` that calls these steps top to bottom and
adds only what is particular to it: its trainer class, collator or loss, the checks it needs and the metrics it
reports. The preference methods (train/dpo.py, kto.py, orpo.py, simpo.py) share one run, `run_preference`, and each
only describes itself as a `PreferenceMethod`.

 1. check_output            --output_dir may be written, or the checkpoint to resume from (resolve_resume)
 2. choose_run_precision    fp32, bf16 or fp16 for this hardware, and the training arguments set to match
 3. prepare_data            the prepared dataset directory (a data file is tokenized into one) and its manifest
 4. resolve_model_name      --model, else the model the dataset was prepared for
 5. load_matching_tokenizer the model's tokenizer, refused unless the dataset was tokenized with it
 6. load_splits             the `train` split and the `validation` split, if any
 7. load_model_for_training the base model in the run's precision, quantized when asked
 8. attach_adapter          seeded (seed_run): a new LoRA adapter, or an earlier run's adapter trained further,
                            its layers computed by train/fused_lora.py
                            (or, for full and freeze tuning, the model's own weights made trainable)
 9. clear_output            only now, every check passed: an old run's files go
10. build_trainer           the method's Trainer class on the model, splits and tokenizer
11. run_training            Trainer.train with the long-lived objects frozen (long_lived_objects_frozen)
12. resolved_config         what the run was asked for and what it resolved to (precision, model, quantization)
13. save_final              adapter, tokenizer, <command>_config.yaml, loss plot, manifest.json last; staged, then moved
14. end_process_group       by the command, on every process (train/processes.py)

Adding a method is two files (a preference method: one PreferenceMethod in its module instead of a run):

- `train/<method>.py`: `run_<method>(...)` calling the steps above with the method's Trainer (or TRL trainer and
  config), its own checks, and the manifest fields it adds; see train/preference.py for TRL trainers on pairs
  and labelled rows, train/grpo.py for one that generates while it trains.
- `commands/<method>.py`: `main(argv)` parsing the method's argument dataclasses (train.command's
  parse_training_options), calling `run_<method>`, then `end_process_group()` and printing on the main process
  alone; plus its line in cli.COMMANDS.

Full and freeze tuning (train/finetuning.py) change step 8 only: they make weights of the model itself trainable
instead of adding an adapter (see attach_adapter), and step 13 saves the whole model then.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import yaml

from glmtune.arguments import HealthArguments, LoraArguments, ModelArguments, PrecisionArguments, TokenizeArguments
from glmtune.arguments.training import lora_init_mutates_base, peft_lora_init
from glmtune.artifacts import check_writable_output, empty_directory, read_json_object, write_manifest
from glmtune.config import to_plain_dict
from glmtune.data.preference import read_prepared_manifest
from glmtune.data.prepared import prepared_dataset_dir
from glmtune.disk import DiskFull, full_disk_error, is_disk_full, remove_partial, reporting_full_disk, tensor_bytes
from glmtune.errors import UserError
from glmtune.models import quantization
from glmtune.models.hub import canonical_model_name
from glmtune.models.loading import load_model, load_tokenizer, tokenizer_fingerprint
from glmtune.models.lora import base_model, resolve_target_modules, resolve_target_parameters, router_module
from glmtune.train.plot import plot_loss
from glmtune.train.precision import (
    ArgsT,
    Precision,
    apply_to_training_args,
    bound_onednn_caches,
    choose_precision,
    detect_hardware,
)

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from datasets import Dataset
    from peft import LoraConfig, PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainingArguments
    from transformers.trainer_utils import TrainOutput

    from glmtune.arguments.ptuning import PtuningArguments

LOSS_PLOT = "loss.png"
STAGING = ".final.tmp"  # inside the output directory: the final artifacts before they are moved into place
# On a PeftModel whose adapter started from the base weights (PiSSA, OLoRA): the directory of its adapter as it
# started, which save_final needs to convert the trained adapter into a LoRA on the original base.
INITIAL_ADAPTER = "glmtune_initial_adapter"

TrainerT = TypeVar("TrainerT", bound="Trainer")


class Splits(NamedTuple):
    train: Dataset
    validation: Dataset | None


def check_output(training_args: TrainingArguments, overwrite: bool, inputs: tuple[Path, ...] = ()) -> Path | None:
    """The checkpoint to resume from, if any; else --output_dir must be writable (see check_writable_output).

    Args:
        overwrite: --overwrite_output_dir.
        inputs: paths the run reads (a dataset, a starting adapter), never to be written over.
    Raises:
        UserError: a bad --resume_from_checkpoint, or an output directory that may not be written.
    """
    output_dir = Path(training_args.output_dir)
    resume = resolve_resume(training_args.resume_from_checkpoint, output_dir)
    if resume is None or output_dir.resolve() not in resume.resolve().parents:
        check_writable_output(output_dir, overwrite, inputs=inputs)
    return resume


def resolve_resume(value: str | None, output_dir: Path) -> Path | None:
    """--resume_from_checkpoint: a checkpoint path, or true/false (true: the latest complete one in --output_dir).

    A run killed while writing a checkpoint leaves it incomplete (the Trainer writes into checkpoint-N directly, the
    trainer state last): `true` passes over such a checkpoint to the one before it, saying so, since resuming from
    it would restart the schedule or the data order and silently end elsewhere.

    Raises:
        UserError: true with no complete checkpoint in output_dir, or a path that is not a complete checkpoint.
    """
    if value is None or str(value).lower() in {"", "false", "no", "0"}:
        return None
    if str(value).lower() in {"true", "yes", "1"}:
        checkpoints = sorted(output_dir.glob("checkpoint-*") if output_dir.is_dir() else [],
                             key=_checkpoint_step, reverse=True)
        checkpoints = [c for c in checkpoints if c.is_dir() and _checkpoint_step(c) >= 0]
        incomplete = []
        for checkpoint in checkpoints:
            if checkpoint_problem(checkpoint) is None:
                if incomplete:
                    logger.warning(f"{', '.join(incomplete)}: incomplete (the run stopped while writing it); "
                                   f"resuming from {checkpoint.name}")
                return checkpoint
            incomplete.append(checkpoint.name)
        raise UserError(f"--resume_from_checkpoint true: no complete checkpoint-* directory in {output_dir}"
                        + (f" ({', '.join(incomplete)} incomplete)" if incomplete else ""),
                        hint="check --output_dir, or start afresh with --overwrite_output_dir")
    path = Path(value)
    problem = checkpoint_problem(path)
    if problem is not None:
        raise UserError(f"--resume_from_checkpoint {value}: not a complete checkpoint directory ({problem})",
                        hint="pass a complete checkpoint-* directory of an earlier run, or true")
    return path


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` is not a checkpoint a run can resume from, or None. The Trainer writes a checkpoint's trainer state
    after its weights, optimizer, scheduler and random states: a readable one means the rest was written."""
    import json

    if not (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        return "no adapter_config.json (nor a full or freeze run's config.json)"
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "no trainer_state.json"
    except (OSError, ValueError):
        return "trainer_state.json is cut short"
    if not isinstance(state, dict) or "global_step" not in state:
        return "trainer_state.json is cut short"
    return None


def _checkpoint_step(path: Path) -> int:
    suffix = path.name.removeprefix("checkpoint-")
    return int(suffix) if suffix.isdigit() else -1


def choose_run_precision(model_args: ModelArguments, precision_args: PrecisionArguments,
                         training_args: ArgsT) -> tuple[Precision, ArgsT]:
    """The run's precision, and the training arguments set to match it. Use the returned arguments from here on: on
    CPU only they have joined the process group (see apply_to_training_args).

    Raises:
        UserError: conflicting precision flags, fp16 without a CUDA GPU, FSDP on CPU (refuse_fsdp_on_cpu), or
            --quantization_bit without a bitsandbytes backend here.
    """
    hardware = detect_hardware()
    precision = choose_precision(precision_args.precision, training_args.bf16, training_args.fp16, hardware)
    training_args = apply_to_training_args(precision, training_args, hardware)
    refuse_fsdp_on_cpu(training_args)  # every method: only now is use_cpu set
    if precision.name == "bf16" and not hardware.cuda:  # before the model's first matmul
        bound_onednn_caches()
    if model_args.quantization_bit:  # no bitsandbytes backend: stop before loading anything
        quantization.check_backend(model_args.quantization_bit)
    return precision, training_args


def refuse_fsdp_on_cpu(training_args: TrainingArguments) -> None:
    """Refuse FSDP on CPU: accelerate enables FSDP only for GPU processes (accelerate/state.py, AcceleratorState), so
    on CPU it would silently train plain DDP instead. DeepSpeed is left alone: it trains ZeRO-2/3 on CPU over gloo.

    Raises:
        UserError: --fsdp, or an FSDP accelerate config, in a CPU run.
    """
    import os

    if training_args.use_cpu and (training_args.fsdp or
                                  os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"):
        raise UserError("FSDP needs CUDA GPUs, and this run is on CPU (accelerate would train plain DDP instead)",
                        hint="on CPU: torchrun --nproc_per_node N -m glmtune train ..., or "
                             "accelerate launch --multi_gpu --num_processes N -m glmtune train ..., "
                             "or DeepSpeed (--deepspeed examples/deepspeed/ds_z3_config.json)")


def prepare_data(dataset_path: str | None, model: str | None, training_args: TrainingArguments,
                 tokenize_args: TokenizeArguments, trust_remote_code: bool,
                 preference: bool, labelled: bool = False) -> tuple[Path, dict[str, Any]]:
    """The prepared dataset directory for --dataset_path (a data file is tokenized first, by the main process, with
    `model`'s tokenizer) and its manifest, refused unless it holds the kind of data the method trains on.

    Args:
        preference: True for chosen/rejected pairs (DPO and its kin), False for conversations (SFT).
        labelled: rows labelled desirable or not are taken too (KTO).
    Raises:
        UserError: no --dataset_path, a data file without a model, tokenizing options given with a prepared
            directory, a directory prepare did not write, or data of the other kind.
    """
    directory = prepared_dataset_dir(dataset_path, model, training_args, tokenize_args, trust_remote_code)
    return read_prepared_manifest(str(directory), preference=preference, labelled=labelled)


def resolve_model_name(requested: str | None, manifest: dict[str, Any], dataset_dir: Path,
                       fallback: str | None = None) -> str:
    """--model, else the model the dataset was prepared for, else `fallback` (e.g. a starting adapter's base).

    Raises:
        UserError: none of the three names a model.
    """
    name = requested or manifest.get("model") or fallback
    if not name:
        raise UserError(f"{dataset_dir}/manifest.json names no model", hint="pass --model")
    return canonical_model_name(name)


def load_matching_tokenizer(model_name: str, trust_remote_code: bool, manifest: dict[str, Any],
                            dataset_dir: Path) -> PreTrainedTokenizerBase:
    """The model's tokenizer; refused unless it is the one the dataset was tokenized with (same fingerprint).

    Raises:
        UserError: the tokenizer can't be loaded, or its fingerprint differs from the dataset manifest's.
    """
    tokenizer = load_tokenizer(model_name, trust_remote_code)
    if tokenizer_fingerprint(tokenizer) != manifest.get("tokenizer_fingerprint"):
        raise UserError(f"{dataset_dir} was tokenized with the tokenizer of '{manifest.get('model')}', "
                        f"which differs from the tokenizer of '{model_name}'",
                        hint=f"prepare the data again with --model {model_name}, or train with "
                             f"--model {manifest.get('model')}")
    return tokenizer


def load_splits(dataset_dir: Path, training_args: TrainingArguments) -> Splits:
    """The prepared `train` split and the `validation` split, if any (required when --eval_strategy evaluates).

    Raises:
        UserError: no readable `train` split, or --eval_strategy without a `validation` split.
    """
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
    return Splits(dataset, eval_dataset)


def load_model_for_training(model_args: ModelArguments, model_name: str, precision: Precision,
                            training_args: TrainingArguments) -> PreTrainedModel:
    """The base model in the run's precision; quantized (--quantization_bit) and made ready for k-bit training.

    Raises:
        UserError: the model can't be loaded, or not with that quantization (glmtune.models.loading.load_model).
    """
    warn_if_fp16_overflows(model_name, precision)
    logger.info(f"precision: {precision.name} ({precision.reason}); LoRA weights and optimizer in fp32")
    model = load_model(model_name, model_args.trust_remote_code, dtype=precision.torch_dtype(),
                       quantization_bit=model_args.quantization_bit)
    if model_args.quantization_bit:
        model = quantization.prepare_for_training(model, training_args.gradient_checkpointing,
                                                  training_args.gradient_checkpointing_kwargs)
    return model


def seed_run(seed: int) -> None:
    """Seed every generator. The adapter's random init draws from the global generator, so this runs right before
    the adapter is made (attach_adapter does it): otherwise two runs with the same --seed start from different
    adapters, since the Trainer seeds only when it is built, after the adapter exists. Seeding earlier, before the
    model loads, would change which random numbers the adapter gets, and so every run's result."""
    from transformers import set_seed

    set_seed(seed)


def attach_adapter(model: PreTrainedModel, model_name: str, lora_args: LoraArguments, seed: int,
                   resume: Path | None = None, start_adapter: Path | None = None,
                   ptuning_args: PtuningArguments | None = None) -> PeftModel | PreTrainedModel:
    """What the run trains, seeded first (seed_run): an earlier run's adapter trained further (`start_adapter`: its own
    rank and targets, the LoRA options don't apply), a new LoRA adapter from the LoRA options, or (--finetuning_type
    full or freeze) no adapter: the model's own weights, all or the chosen blocks', trainable and the rest frozen.

    Args:
        resume: the checkpoint the run resumes from, whose adapter must have the shape the LoRA options give.
        start_adapter: an earlier run's adapter directory to train further (dpo's --peft_path).
        ptuning_args: the prefix's options (--finetuning_type ptuning, train/ptuning.py); None: a command without
            P-Tuning v2.
    Raises:
        UserError: LoRA targets the model lacks, a checkpoint's adapter of another shape, or a starting adapter
            that does not fit the model.
    """
    from glmtune.train.fused_lora import fuse_lora_linears

    seed_run(seed)
    if lora_args.finetuning_type == "ptuning":
        from glmtune.train.ptuning import attach_prefix

        return attach_prefix(model, model_name, lora_args, ptuning_args, resume, start_adapter)
    router = check_moe_options(model, model_name, lora_args, start_adapter)
    if lora_args.finetuning_type != "lora":
        from glmtune.train.finetuning import make_trainable

        if start_adapter is not None:
            raise UserError(f"--finetuning_type {lora_args.finetuning_type} trains the model's own weights, and "
                            "--peft_path starts from an adapter", hint="leave one of them out")
        if lora_args.train_router or lora_args.moe_aux_loss_coef is not None:
            raise UserError("--train_router and --moe_aux_loss_coef apply to LoRA runs",
                            hint="--finetuning_type full trains the routers with everything else")
        return make_trainable(model, model_name, lora_args)
    if start_adapter is not None:
        from glmtune.train.ptuning import refuse_prefix_start

        refuse_prefix_start(start_adapter)
        peft_model = load_trainable_adapter(model, start_adapter, model_name)
    else:
        peft_model = add_lora(model, model_name, lora_args, resume)
    if lora_args.moe_aux_loss_coef is not None and router is not None:
        from glmtune.models.moe import add_balance_loss

        add_balance_loss(peft_model, router, lora_args.moe_aux_loss_coef)
    # Every method's LoRA layers: the same sums with fewer operators (train/fused_lora.py). A call it does not cover
    # (the adapter disabled for a reference model, dropout in training, DoRA, a quantized base) runs peft's forward.
    fuse_lora_linears(peft_model)
    return peft_model


def check_moe_options(model: PreTrainedModel, model_name: str, lora_args: LoraArguments,
                      start_adapter: Path | None) -> str | None:
    """The model's router module (None for a model without one), once --train_router and --moe_aux_loss_coef are
    known to apply to it.

    Raises:
        UserError: either option on a model with no router glmtune knows, or --train_router with a starting
            adapter (whose own trainable modules apply).
    """
    router = router_module(model.config.model_type)
    asked = [flag for flag, given in (("--train_router", lora_args.train_router),
                                      ("--moe_aux_loss_coef", lora_args.moe_aux_loss_coef is not None)) if given]
    if asked and router is None:
        raise UserError(f"{' and '.join(asked)}: '{model_name}' ({model.config.model_type}) is not a mixture of "
                        "experts glmtune knows the router of", hint="these options apply to glm4_moe (GLM-4.5/4.6/4.7)")
    if lora_args.train_router and start_adapter is not None:
        raise UserError("--train_router applies to a new adapter; the starting adapter keeps its own trainable "
                        "modules", hint="leave --train_router out")
    return router


def add_lora(model: PreTrainedModel, model_name: str, lora_args: LoraArguments, resume: Path | None) -> PeftModel:
    """A new LoRA adapter on `model`; when resuming, refused unless the checkpoint's adapter has the same shape."""
    from peft import LoraConfig, get_peft_model

    model_type = model.config.model_type
    parameters = unquantized_targets(model, resolve_target_parameters(model_type, lora_args.target_modules))
    dropout = lora_args.lora_dropout
    if parameters and dropout > 0:  # peft's parameter LoRA (lora.ParamWrapper) refuses dropout
        logger.warning(f"--lora_dropout {dropout}: LoRA on {model_type}'s expert and MLP weights (peft's "
                       "target_parameters) has no input dropout; training without dropout")
        dropout = 0.0
    peft_config = LoraConfig(
        task_type="CAUSAL_LM", r=lora_args.lora_rank, lora_alpha=lora_args.lora_alpha, lora_dropout=dropout,
        target_modules=resolve_target_modules(model_type, lora_args.target_modules),
        target_parameters=parameters or None,
        modules_to_save=[router_module(model_type)] if lora_args.train_router else None,
        use_dora=lora_args.use_dora, use_rslora=lora_args.use_rslora,
        init_lora_weights=peft_lora_init(lora_args.init_lora_weights),
    )
    if resume is not None:
        check_same_adapter_shape(resume, peft_config)
    check_variant_on_packed_weights(model, model_name, lora_args)
    try:
        peft_model = get_peft_model(model, peft_config)
    except ValueError as e:  # e.g. a --target_modules name the model doesn't have
        raise UserError(f"cannot add LoRA to '{model_name}': {e}", hint="check --target_modules") from None
    except TypeError as e:  # an init that decomposes the weights, on packed weights of a kind not checked above
        raise UserError(f"--init_lora_weights {lora_args.init_lora_weights} on '{model_name}': {e}",
                        hint=UNQUANTIZED_INIT_HINT) from None
    if lora_init_mutates_base(lora_args.init_lora_weights):
        keep_initial_adapter(peft_model)
    log_trainable_parameters(peft_model)
    return peft_model


UNQUANTIZED_INIT_HINT = ("leave --quantization_bit out, or use --init_lora_weights true or gaussian on a quantized "
                         "base")
PACKED_BITS = {"Params4bit": 4, "Int8Params": 8}  # bitsandbytes' packed weight classes


def check_variant_on_packed_weights(model: PreTrainedModel, model_name: str, lora_args: LoraArguments) -> None:
    """Refuse, before peft touches the model, the LoRA variants that can't train on its bitsandbytes-packed weights.

    Raises:
        UserError: PiSSA or OLoRA on a 4- or 8-bit base (both subtract their start from the base weights: peft
            refuses PiSSA on packed weights, and OLoRA re-quantizes the rest, so the adapter converted for the
            original base would not compute the trained model); DoRA on an 8-bit base on the CPU (peft's DoRA
            dequantizes the weight every step and, on the CPU, puts back an Int8Params without its scales, so the
            next forward pass fails inside bitsandbytes).
    """
    packed = {(PACKED_BITS[type(w).__name__], w.device.type) for w in model.parameters()
              if type(w).__name__ in PACKED_BITS}
    if not packed:
        return
    bits = max(b for b, _ in packed)
    init = lora_args.init_lora_weights
    if lora_init_mutates_base(init):
        raise UserError(f"--init_lora_weights {init} on '{model_name}' loaded in {bits}-bit: PiSSA and OLoRA move "
                        "part of each base weight into the adapter, which needs the unquantized weights (peft "
                        "refuses PiSSA on packed weights; OLoRA's re-quantized remainder is not the base its saved "
                        "adapter is converted for, so that adapter would not compute the trained model)",
                        hint=UNQUANTIZED_INIT_HINT)
    if lora_args.use_dora and (8, "cpu") in packed:
        raise UserError(f"--use_dora on '{model_name}' loaded in 8-bit on the CPU: peft's DoRA dequantizes each "
                        "weight every step and, on the CPU, puts it back without its bitsandbytes scales, so the "
                        "next forward pass fails", hint="use --quantization_bit 4 (DoRA trains there), or leave "
                        "--quantization_bit out")


def keep_initial_adapter(peft_model: PeftModel) -> None:
    """Save the adapter as PiSSA or OLoRA made it, before training, to a temporary directory: those inits move part
    of each base weight into the adapter, so the trained adapter fits only the changed base; at the end save_final
    converts it, with this starting point, into a plain LoRA (twice the rank) on the original base, as peft's
    save_pretrained(path_initial_model_for_weight_conversion=...) does."""
    import atexit
    import tempfile

    directory = Path(tempfile.mkdtemp(prefix="glmtune-initial-")) / "initial"
    atexit.register(shutil.rmtree, directory.parent, ignore_errors=True)
    config = peft_model.peft_config["default"]
    init, config.init_lora_weights = config.init_lora_weights, True  # peft loads it back without decomposing again
    try:
        peft_model.save_pretrained(str(directory))
    finally:
        config.init_lora_weights = init
    setattr(peft_model, INITIAL_ADAPTER, directory)


def unquantized_targets(model: PreTrainedModel, parameters: list[str]) -> list[str]:
    """The target parameters that are plain tensors: peft's parameter LoRA adds BA to the weight itself, which a
    bitsandbytes-packed weight (a quantized base's dense and shared-expert MLP) can't take. Those go unadapted; the
    fused 3-D experts bitsandbytes doesn't quantize stay targeted."""
    packed = {target for name, weight in model.named_parameters() for target in parameters
              if type(weight).__name__ in ("Params4bit", "Int8Params") and name.endswith(f".{target}")}
    if packed:
        logger.warning(f"LoRA leaves {', '.join(sorted(packed))} out: quantized weights can't be adapted as "
                       "parameters (peft's target_parameters)")
    return [target for target in parameters if target not in packed]


def check_same_adapter_shape(checkpoint: Path, peft_config: LoraConfig) -> None:
    """Resuming restores the adapter's weights: its rank and target modules must be the ones asked for."""
    saved = read_json_object(checkpoint / "adapter_config.json", "adapter config")
    ours = {"r": peft_config.r, "lora_alpha": peft_config.lora_alpha,
            "target_modules": sorted(peft_config.target_modules) if not isinstance(peft_config.target_modules, str)
            else peft_config.target_modules,
            "target_parameters": sorted(peft_config.target_parameters or []),
            "use_dora": bool(peft_config.use_dora), "use_rslora": bool(peft_config.use_rslora)}
    theirs = {"r": saved.get("r"), "lora_alpha": saved.get("lora_alpha"),
              "target_modules": sorted(saved.get("target_modules") or []) if isinstance(ours["target_modules"], list)
              else saved.get("target_modules"),
              "target_parameters": sorted(saved.get("target_parameters") or []),
              "use_dora": bool(saved.get("use_dora")), "use_rslora": bool(saved.get("use_rslora"))}
    differing = [f"{key}: checkpoint {theirs[key]}, now {ours[key]}" for key in ours if ours[key] != theirs[key]]
    if differing:
        raise UserError(f"cannot resume from {checkpoint}: its LoRA adapter differs from the one asked for",
                        problems=differing, hint="resume with the LoRA flags the run started with")


def load_trainable_adapter(model: PreTrainedModel, adapter: Path, model_name: str) -> PeftModel:
    """An earlier run's adapter (e.g. SFT), trainable: its own rank and targets, not the LoRA options."""
    from peft import PeftModel

    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
    except (ValueError, RuntimeError, KeyError, OSError) as e:  # shapes or module names of another base model
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load the adapter {adapter} onto '{model_name}': {first}",
                        hint="pass the --model the adapter was trained on, or leave --model out") from None
    log_trainable_parameters(peft_model)
    return peft_model


def clear_output(training_args: TrainingArguments, resume: Path | None) -> None:
    """Every check passed: only now may an old run be cleared away (by the main process, the others wait). A resumed
    run keeps its checkpoints; a staging directory left by an interrupted final save goes either way."""
    output_dir = Path(training_args.output_dir)
    with training_args.main_process_first(desc="preparing the output directory"):
        if training_args.process_index == 0:
            if resume is None:
                empty_directory(output_dir)
            shutil.rmtree(output_dir / STAGING, ignore_errors=True)


def build_trainer(trainer_class: type[TrainerT], model: PeftModel | PreTrainedModel, training_args: TrainingArguments,
                  splits: Splits, tokenizer: PreTrainedTokenizerBase, health: HealthArguments | None = None,
                  loraplus_lr_ratio: float | None = None, **method_options: Any) -> TrainerT:
    """The method's Trainer (transformers' or TRL's) on the run's model, splits and tokenizer, with the numerical
    health guard (train/health.py, `health`: its policy; None for the defaults) and, given `loraplus_lr_ratio`
    (--loraplus_lr_ratio), LoRA+'s optimizer (use_loraplus); `method_options` are the rest of its constructor's
    arguments (a collator, callbacks, a reference model...)."""
    from transformers.trainer_callback import PrinterCallback

    from glmtune.logs import progress_bars_enabled
    from glmtune.train.epoch_order import EpochOrderCallback
    from glmtune.train.health import NumericalHealthCallback
    from glmtune.train.interrupt import StopOnSignalCallback

    trainer = trainer_class(model=model, args=training_args, train_dataset=splits.train,
                            eval_dataset=splits.validation, processing_class=tokenizer, **method_options)
    trainer.add_callback(NumericalHealthCallback(health or HealthArguments()))
    trainer.add_callback(StopOnSignalCallback())
    trainer.add_callback(EpochOrderCallback())  # a mid-epoch resume takes the batches the run would have taken
    if not progress_bars_enabled():  # --quiet: the Trainer would print every logged dict instead of its bar
        trainer.remove_callback(PrinterCallback)
    if loraplus_lr_ratio is not None:
        use_loraplus(trainer, loraplus_lr_ratio)
    return trainer


def use_loraplus(trainer: Trainer, ratio: float) -> None:
    """Give the Trainer peft's LoRA+ optimizer: --optim's class and settings, the B matrices (and DoRA's magnitudes)
    at `ratio` x --learning_rate. The Trainer makes its optimizer only when it has none, and its scheduler then
    follows each group's own learning rate.

    Raises:
        UserError: DeepSpeed or FSDP, which build their own optimizer.
    """
    from peft.optimizers import create_loraplus_optimizer

    args = trainer.args
    if args.deepspeed or args.fsdp:
        raise UserError("--loraplus_lr_ratio: DeepSpeed and FSDP build their own optimizer, without LoRA+'s groups",
                        hint="train LoRA+ with plain DDP (torchrun), or leave --loraplus_lr_ratio out")
    optimizer_class, settings = trainer.get_optimizer_cls_and_kwargs(args, trainer.model)
    settings = {key: value for key, value in settings.items() if key != "lr"}
    trainer.optimizer = create_loraplus_optimizer(trainer.model, optimizer_class, lr=args.learning_rate,
                                                  loraplus_lr_ratio=ratio, loraplus_weight_decay=args.weight_decay,
                                                  **settings)


@contextlib.contextmanager
def long_lived_objects_frozen() -> Iterator[None]:
    """Everything loaded before training (libraries, tokenizer, model, dataset index) lives for the whole run: kept
    out of the cyclic garbage collector's sight (gc.freeze), it is not rescanned by every full collection, such as
    the Trainer's gc.collect() at the start (accelerate's free_memory; measured: 0.35 s, 3% of
    bench/train_speed.py's run). Reference counting still frees them; only cycles among them wait until training
    ends."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def run_training(trainer: Trainer, resume: Path | None) -> TrainOutput:
    """Train (from the checkpoint `resume`, if any) with the long-lived objects frozen.

    Raises:
        TrainingInterrupted: Ctrl-C or SIGTERM stopped the run after saving a checkpoint (train/interrupt.py).
        TrainingDiverged: non-finite gradients (train/health.py).
        DiskFull: the disk filled while a checkpoint was written; that checkpoint is removed, earlier ones are kept.
    """
    from glmtune.train.interrupt import stop_if_interrupted

    try:
        with long_lived_objects_frozen():
            result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except Exception as e:
        if isinstance(e, UserError) or not is_disk_full(e, Path(trainer.args.output_dir)):
            raise
        raise _full_disk_while_training(trainer, e) from e
    stop_if_interrupted(trainer)
    return result


def _full_disk_while_training(trainer: Trainer, error: BaseException) -> DiskFull:
    """The Trainer writes checkpoint-N in place (the trainer state last): one cut short by a full disk is removed,
    so that nothing looks like a checkpoint but this run's complete ones."""
    output_dir = Path(trainer.args.output_dir)
    checkpoint = output_dir / f"checkpoint-{trainer.state.global_step}"
    if not (checkpoint.is_dir() and checkpoint_problem(checkpoint) is not None):
        path = Path(getattr(error, "filename", None) or output_dir)
        return full_disk_error(path, "the training run's files", cause=error)
    written = remove_partial(checkpoint) if trainer.is_world_process_zero() else None
    return full_disk_error(checkpoint, f"{checkpoint.name} (adapter, optimizer and trainer state)",
                           needed=_checkpoint_bytes(trainer), written=written, hint=_after_full_disk(output_dir),
                           cause=error)


def _after_full_disk(output_dir: Path) -> str:
    """What the user can do once space is freed: resume from the complete checkpoints kept, else run again."""
    complete = sorted((c for c in output_dir.glob("checkpoint-*") if checkpoint_problem(c) is None),
                      key=_checkpoint_step)
    if not complete:
        return f"free space on that filesystem and run it again (nothing in {output_dir} was replaced)"
    return (f"free space on that filesystem, then run the same command with --resume_from_checkpoint true "
            f"({', '.join(c.name for c in complete)} kept; nothing else in {output_dir} was replaced)")


def _checkpoint_bytes(trainer: Trainer) -> int:
    """A checkpoint's trainable weights and optimizer state: the bulk of it (the tokenizer and states are small)."""
    import torch

    weights = tensor_bytes(p for p in trainer.model.parameters() if p.requires_grad)
    if trainer.optimizer is None:
        return weights
    states = trainer.optimizer.state_dict()["state"].values()
    return weights + tensor_bytes(t for state in states for t in state.values() if torch.is_tensor(t))


def resolved_config(arguments: tuple[object, ...], model_name: str, precision: Precision,
                    model: PeftModel | PreTrainedModel,
                    **what_ran: Any) -> dict[str, Any]:
    """The run's configuration for <command>_config.yaml and the manifest: every argument dataclass's values, then
    what the run resolved (`what_ran`: e.g. a feature the model turned out not to support; the model's canonical
    name, the precision auto chose, the quantization it loaded with)."""
    config = to_plain_dict(*arguments)
    config.update(what_ran)
    config["model"], config["precision"] = model_name, precision.name
    config["quantization"] = quantization.describe(base_model(model))
    return config


def save_final(output_dir: Path, trainer: Trainer, config: dict[str, Any], command: str, **fields: Any) -> None:
    """Write the final artifacts into a staging directory, then move them into output_dir, manifest last.

    Every process calls it (a sharded model gathers its weights); only the main one writes.

    Args:
        config: the resolved configuration (resolved_config), written as <command>_config.yaml and in the manifest.
        command: the verb that wrote the run ("train", "dpo"): the config file's name and the manifest's command.
        fields: the manifest's other fields (base model, dataset, step, losses, metrics...).
    Raises:
        DiskFull: the disk filled; the staging directory is removed and output_dir's files are as they were.
    """
    from glmtune.train.health import check_finite_weights, health_callback

    check_finite_weights(trainer.model)  # never an adapter of NaNs saved as a success
    fields.setdefault("finetuning_type", config.get("finetuning_type", "lora"))  # lora: an adapter; else a model
    guard = health_callback(trainer)
    if guard is not None and guard.skipped:
        fields["nonfinite_updates_skipped"] = guard.skipped
    staging = output_dir / STAGING
    adapter = tensor_bytes(p for p in trainer.model.parameters() if p.requires_grad)
    try:
        with reporting_full_disk(output_dir, "the final adapter, tokenizer and manifest", adapter, staging,
                                 _after_full_disk(output_dir)):
            _write_final(output_dir, staging, trainer, config, command, fields)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # whatever stopped it: no half-written staging left behind
        raise


def _write_final(output_dir: Path, staging: Path, trainer: Trainer, config: dict[str, Any], command: str,
                 fields: dict[str, Any]) -> None:
    # The adapter (adapter_config.json + adapter_model.safetensors) or, for full and freeze runs, the whole model
    # (config.json + model.safetensors); the tokenizer.
    trainer.save_model(str(staging))
    if not trainer.is_world_process_zero():
        return
    initial = getattr(trainer.model, INITIAL_ADAPTER, None)
    if initial is not None:  # PiSSA / OLoRA: the adapter as a LoRA on the original base (keep_initial_adapter)
        trainer.model.save_pretrained(str(staging), path_initial_model_for_weight_conversion=str(initial))
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


def log_trainable_parameters(model: PeftModel) -> None:
    """peft's print_trainable_parameters, through the glmtune logger (so that --quiet silences it)."""
    trainable, total = model.get_nb_trainable_parameters()
    logger.info(f"trainable params: {trainable:,} || all params: {total:,} || "
                f"trainable%: {100 * trainable / max(total, 1):.4f}")


def warn_if_fp16_overflows(model_name: str, precision: Precision) -> None:
    """fp16 on a family its authors trained in bf16 (the GLM-4 line) overflows into NaN losses: said before loading."""
    from glmtune.models.families import family_of_source
    from glmtune.models.hub import resolve_model

    family = family_of_source(resolve_model(model_name))
    if precision.name == "fp16" and family.bf16_trained:
        logger.warning(f"fp16 with {family.name}: its authors train it in bf16, and its activations exceed fp16's "
                       "range (NaN losses, seen by users on the GLM-4 line); prefer --precision bf16 (any GPU since "
                       "Ampere) or fp32")


def saved_what(finetuning_type: str) -> str:
    """What a run's output directory holds, for the line a command prints at the end."""
    return {"lora": "Adapter", "ptuning": "Prefix"}.get(finetuning_type, "Model")
