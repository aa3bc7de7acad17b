"""Group Relative Policy Optimization with a LoRA adapter: TRL's GRPOTrainer on prompts rendered by glmtune's
templates (train/grpo_data.py), scored by reward functions (train/rewards.py), on the shared training skeleton.

For each prompt the training model samples --num_generations completions of up to --max_completion_length tokens;
each is scored by every reward function, the weighted sum (--reward_weights) is compared with its group's mean, and
the adapter is pushed towards the completions above it. Generation is by the training model itself (transformers'
generate); on GPUs TRL's vLLM mode (--use_vllm, --vllm_mode colocate|server) generates faster (docs/commands/grpo.md).
The run directory is laid out as train's: checkpoints, then the adapter, tokenizer, grpo_config.yaml, the loss plot
and manifest.json, written last.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trl import GRPOConfig, GRPOTrainer

from glmtune.arguments import HealthArguments, LoraArguments, ModelArguments, PrecisionArguments
from glmtune.arguments.grpo import GrpoArguments
from glmtune.errors import UserError
from glmtune.inference.engine import adapter_base_model, check_adapter_tokenizer
from glmtune.models.loading import load_tokenizer, stop_token_ids, tokenizer_fingerprint
from glmtune.train.command import check_liger
from glmtune.train.grpo_data import is_prepared, refuse_missing_references, rows_from_file, rows_from_prepared
from glmtune.train.rewards import reward_functions
from glmtune.train.skeleton import (
    Splits,
    attach_adapter,
    build_trainer,
    check_output,
    choose_run_precision,
    clear_output,
    load_matching_tokenizer,
    load_model_for_training,
    resolve_model_name,
    resolved_config,
    run_training,
    save_final,
    saved_what,
)

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

METRICS = ("reward", "reward_std", "completions/mean_length", "kl")  # and rewards/<name>/mean, one per function


@dataclass
class GlmtuneGRPOConfig(GRPOConfig):
    """GRPOConfig without its own --trust_remote_code (ModelArguments has it; see train/dpo.py's GlmtuneDPOConfig),
    and with --reward_weights as one comma-separated value (1,0.5) as well as TRL's list (1 0.5, or a YAML list)."""

    trust_remote_code: bool = field(default=False, init=False)
    reward_weights: list[str] | None = field(
        default=None, metadata={"help": "Weights of the reward functions, in --reward_funcs' order: '1,0.5' or "
                                        "'1 0.5' (default: 1 each)."})

    def __post_init__(self) -> None:
        if self.reward_weights is not None:
            self.reward_weights = parse_weights(self.reward_weights)
        if self.generation_batch_size is not None and self.steps_per_generation is not None:
            # A copy of a resolved config (the precision step's dataclasses.replace, also under a launcher, where the
            # copy's world size is the process group's and the first config's was 1): TRL refuses both set, having set
            # both itself. The steps stay; the batch is derived again. A user giving both is refused by the command
            # (commands/grpo.py), before parsing, as only the command line and the YAML file can tell.
            self.generation_batch_size = None
        super().__post_init__()


def parse_weights(values: list[Any] | str | float) -> list[float]:
    """--reward_weights as floats, from '1,0.5', ['1', '0.5'], ['1,0.5'] or [1, 0.5].

    Raises:
        UserError: a weight that is not a number.
    """
    items = values if isinstance(values, list) else [values]
    parts = [p for item in items for p in str(item).split(",") if p.strip()]
    try:
        return [float(p) for p in parts]
    except ValueError:
        raise UserError(f"--reward_weights: {values} are not numbers", hint="e.g. --reward_weights 1,0.5") from None


class PretokenizedGRPOTrainer(GRPOTrainer):
    """TRL 1.16's GRPOTrainer generates from the ids of `_tokenize_prompts`, which re-tokenizes text prompts with the
    tokenizer (control-token text in them would become control tokens) or templates conversational ones with the
    tokenizer's chat template (not glmtune's). Ours were rendered and encoded by glmtune already: generation starts
    from each row's `prompt_ids` as they are; `prompt` (their text) is what the rewards and TRL's logs see."""

    _batch_prompt_ids: list[list[int]] | None = None

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        self._batch_prompt_ids = [list(row["prompt_ids"]) for row in inputs]
        try:
            return super()._generate_and_score_completions(inputs)
        finally:
            self._batch_prompt_ids = None

    def _tokenize_prompts(self, prompts: list) -> tuple[list[list[int]], None, dict[str, Any]]:
        assert self._batch_prompt_ids is not None and len(self._batch_prompt_ids) == len(prompts)
        return self._batch_prompt_ids, None, {}


@dataclass
class GrpoResult:
    output_dir: Path
    global_step: int
    first_rewards: dict[str, float]  # the first logged step's mean reward, per function and in all
    last_rewards: dict[str, float]  # the last logged step's


def run_grpo(model_args: ModelArguments, grpo_args: GrpoArguments, lora_args: LoraArguments,
             training_args: GlmtuneGRPOConfig, precision_args: PrecisionArguments | None = None,
             health_args: HealthArguments | None = None) -> GrpoResult:
    """GRPO-tune a LoRA adapter (a new one, or --peft_path's) on the prompts of --dataset_path, and save the run.

    Raises:
        UserError: any option, input, reward function or output the run can't use, before anything is written;
            a reward function that raises or returns a wrong result while training (train/rewards.py).
    """
    start_adapter = Path(grpo_args.peft_path) if grpo_args.peft_path else None
    adapter_base = adapter_base_model(start_adapter) if start_adapter else None
    output_dir = Path(training_args.output_dir)
    inputs = [Path(p) for p in (grpo_args.dataset_path, start_adapter) if p]
    resume = check_output(training_args, grpo_args.overwrite_output_dir, tuple(inputs))
    precision_args = precision_args or PrecisionArguments()
    precision, training_args = choose_run_precision(model_args, precision_args, training_args)
    check_grpo_options(grpo_args, training_args)
    check_liger(training_args)
    length_target = grpo_args.length_target or max(1, training_args.max_completion_length // 2)
    rewards = reward_functions(grpo_args.reward_funcs or "", length_target)
    weights = training_args.reward_weights
    if weights is not None and len(weights) != len(rewards):
        raise UserError(f"--reward_weights gives {len(weights)} weights for {len(rewards)} reward functions "
                        f"({', '.join(f.__name__ for f in rewards)})", hint="one weight per --reward_funcs entry")

    evaluates = training_args.eval_strategy != "no"
    model_name, tokenizer, rows, eval_rows = read_prompts(model_args, grpo_args, adapter_base, evaluates)
    names = [f.__name__ for f in rewards]
    if "accuracy" in names:
        refuse_missing_references(rows, "accuracy")
    if start_adapter:
        check_adapter_tokenizer(start_adapter, tokenizer, model_name)
    from datasets import Dataset

    splits = Splits(Dataset.from_list(rows), Dataset.from_list(eval_rows) if eval_rows else None)

    model = load_model_for_training(model_args, model_name, precision, training_args)
    # TRL stops generating at the generation config's eos ids: the model's end-of-turn tokens, as inference stops.
    model.generation_config.eos_token_id = stop_token_ids(model_name, tokenizer)
    model = attach_adapter(model, model_name, lora_args, training_args.seed, resume, start_adapter)
    clear_output(training_args, resume)

    trainer = build_trainer(PretokenizedGRPOTrainer, model, training_args, splits, tokenizer, health_args,
                            reward_funcs=rewards)
    result = run_training(trainer, resume)
    eval_metrics = trainer.evaluate() if splits.validation is not None else {}

    logged = [entry for entry in trainer.state.log_history if "reward" in entry]
    first, last = (_rewards(logged[0]), _rewards(logged[-1])) if logged else ({}, {})
    config = resolved_config((model_args, grpo_args, lora_args, precision_args, training_args), model_name,
                             precision, trainer.model, length_target=length_target)
    save_final(output_dir, trainer, config, command="grpo",
               base_model=model_name, dataset=grpo_args.dataset_path, start_adapter=grpo_args.peft_path,
               prompts=len(rows), reward_funcs=names, tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
               global_step=trainer.state.global_step, train_loss=result.training_loss,
               first_logged_rewards=first or None, last_logged_rewards=last or None,
               eval_metrics={k: v for k, v in eval_metrics.items() if isinstance(v, (int, float))} or None,
               train_runtime=result.metrics.get("train_runtime"), world_size=training_args.world_size)
    return GrpoResult(output_dir, trainer.state.global_step, first, last)


def check_grpo_options(grpo_args: GrpoArguments, training_args: GlmtuneGRPOConfig) -> None:
    """What glmtune's GRPO run does not take, said before anything loads.

    Raises:
        UserError: --eval_strategy with a data file (its validation prompts are a prepared dataset's `validation`
            split), or --enable_thinking / --format with a prepared dataset (prepare rendered it).
    """
    if training_args.eval_strategy != "no" and not (grpo_args.dataset_path and is_prepared(grpo_args.dataset_path)):
        raise UserError(f"--eval_strategy {training_args.eval_strategy.value}: grpo evaluates on the `validation` "
                        f"split of a prepared dataset, and {grpo_args.dataset_path} is a data file",
                        hint="glmtune prepare it with --val_size and pass the prepared directory, or leave "
                             "--eval_strategy out")
    if grpo_args.dataset_path and is_prepared(grpo_args.dataset_path):
        given = [flag for flag, value in (("--enable_thinking", grpo_args.enable_thinking),
                                          ("--format", grpo_args.format)) if value is not None]
        if given:
            raise UserError(f"{' and '.join(given)}: {grpo_args.dataset_path} is a prepared dataset, rendered by "
                            "`glmtune prepare` already", hint="give these options to prepare, or pass the data file")


def read_prompts(model_args: ModelArguments, grpo_args: GrpoArguments, adapter_base: str | None,
                 evaluates: bool = False) -> tuple[str, PreTrainedTokenizerBase, list[dict[str, Any]],
                                                   list[dict[str, Any]]]:
    """(model name, tokenizer, prompt rows, validation prompt rows) of --dataset_path: a prepared dataset (its
    tokenizer must be the model's; its `validation` split's prompts when `evaluates`) or a data file (rendered here
    with the model's template; no validation prompts).

    Raises:
        UserError: no --dataset_path, no model named, a tokenizer that differs from the dataset's, bad rows, or
            no prompts at all.
    """
    path = grpo_args.dataset_path
    if not path:
        raise UserError("--dataset_path is required: the prompts to generate from",
                        hint="a data file in any format `glmtune prepare` reads, or a prepared dataset directory")
    if is_prepared(path):
        from glmtune.data.preference import read_prepared_manifest

        dataset_dir, manifest = read_prepared_manifest(path, preference=False)
        model_name = resolve_model_name(model_args.model, manifest, dataset_dir, fallback=adapter_base)
        tokenizer = load_matching_tokenizer(model_name, model_args.trust_remote_code, manifest, dataset_dir)
        stop_ids = stop_token_ids(model_name, tokenizer)
        rows = rows_from_prepared(tokenizer, stop_ids, dataset_dir)
        eval_rows = rows_from_prepared(tokenizer, stop_ids, dataset_dir, "validation") if evaluates else []
    else:
        if not Path(path).is_file():
            raise UserError(f"--dataset_path {path}: no such file or prepared dataset directory")
        if not (model_args.model or adapter_base):
            raise UserError(f"--dataset_path {path} is a data file: the model to render it for is needed",
                            hint="pass --model")
        model_name = resolve_model_name(model_args.model, {}, Path(path), fallback=adapter_base)
        tokenizer = load_tokenizer(model_name, model_args.trust_remote_code)
        rows, eval_rows = rows_from_file(tokenizer, path, grpo_args.format, grpo_args.enable_thinking), []
    if not rows:
        raise UserError(f"--dataset_path {path}: no prompts")
    logger.info(f"{len(rows)} prompts from {path}" + (f", {len(eval_rows)} to evaluate on" if eval_rows else ""))
    return model_name, tokenizer, rows, eval_rows


def _rewards(entry: dict[str, Any]) -> dict[str, float]:
    """A logged step's reward figures: the mean reward, its spread, each function's mean, the completions' length."""
    return {key: value for key, value in entry.items()
            if key in METRICS or (key.startswith("rewards/") and key.endswith("/mean"))}


def summary(result: GrpoResult, finetuning_type: str = "lora") -> str:
    """The line grpo prints at the end: where the adapter (or model) went, and the mean reward first and last
    logged."""
    line = f"\n{saved_what(finetuning_type)} saved to {result.output_dir} after {result.global_step} steps"
    if "reward" not in result.first_rewards or "reward" not in result.last_rewards:
        return line
    return line + (f" (mean reward: {result.first_rewards['reward']:.4f} first logged, "
                   f"{result.last_rewards['reward']:.4f} last logged)")
