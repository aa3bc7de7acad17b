"""train's hook (--eval_generate): on every checkpoint save, answer the validation split by greedy generation and
score it as `glmtune eval` does; at the end, the best checkpoint's adapter becomes the run's final adapter.

The gap this fills: the Trainer evaluates and keeps the best model by the validation LOSS only (its
`compute_metrics` sees teacher-forced logits, never generated text), while BLEU/ROUGE/exact match need answers.
Each checkpoint's scores are written into it (generation_eval.json), so the choice at the end also covers the
checkpoints of a run that was resumed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from glmtune.arguments import GenerationEvalArguments
from glmtune.evaluation.run import EvalSample, generate_answers, reference_nll, samples_from_tokenized, score

SCORES_FILE = "generation_eval.json"

logger = logging.getLogger(__name__)


class GenerationEvalCallback(TrainerCallback):
    def __init__(self, tokenizer: Any, stop_ids: list[int], validation: Any, args: GenerationEvalArguments):
        rows = validation if args.eval_generate_max_samples is None else \
            validation.select(range(min(args.eval_generate_max_samples, len(validation))))
        self.samples: list[EvalSample] = samples_from_tokenized(tokenizer, stop_ids, rows)
        self.tokenizer, self.stop_ids, self.args = tokenizer, stop_ids, args
        self.history: dict[int, dict[str, float]] = {}  # step -> metrics, kept after --save_total_limit deletions

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        # One process evaluates (the others wait at their next synchronisation); the model is the unwrapped one.
        if not state.is_world_process_zero:
            return
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        metrics = self.history[state.global_step] = self.evaluate(model)
        (checkpoint / SCORES_FILE).write_text(json.dumps({"step": state.global_step, "metrics": metrics}, indent=2)
                                              + "\n", encoding="utf-8")
        name = self.args.eval_generate_metric
        value = metrics[name]
        if state.best_metric is None or _better(name, value, state.best_metric):
            # The Trainer keeps state.best_model_checkpoint out of --save_total_limit's deletions.
            state.best_metric, state.best_global_step = value, state.global_step
            state.best_model_checkpoint = str(checkpoint)
        # The newline keeps the line off the Trainer's progress bar, which shares stderr.
        logger.info(f"\n{checkpoint.name}: {name} {value:.4f} on {len(self.samples)} validation rows (best: "
                    f"{PREFIX_CHECKPOINT_DIR}-{state.best_global_step}, {state.best_metric:.4f})")

    def evaluate(self, model: Any) -> dict[str, float]:
        was_training = model.training
        model.eval()  # no dropout while answering
        try:
            predictions = generate_answers(model, self.tokenizer, self.stop_ids, self.samples,
                                           self.args.eval_generate_max_new_tokens, self.args.eval_generate_batch_size,
                                           progress=False)
            nll = reference_nll(model, self.tokenizer.pad_token_id, self.samples, self.args.eval_generate_batch_size,
                                progress=False)
        finally:
            model.train(was_training)
        return score(self.samples, predictions, nll).metrics

    def restore_best(self, model: Any, output_dir: Path) -> dict[str, Any] | None:
        """Load the best saved checkpoint's adapter weights into the model; returns what the manifest records."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        name = self.args.eval_generate_metric
        history = dict(self.history)
        for scores_file in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*/{SCORES_FILE}"):  # those of a resumed run too
            saved = json.loads(scores_file.read_text(encoding="utf-8"))
            history.setdefault(saved["step"], saved["metrics"])
        best = None
        for step in sorted(history):  # strictly better only: on a tie the earlier checkpoint stays
            adapter = output_dir / f"{PREFIX_CHECKPOINT_DIR}-{step}" / "adapter_model.safetensors"
            if adapter.is_file() and (best is None or _better(name, history[step][name], history[best][name])):
                best = step
        if best is None:
            return None
        checkpoint = f"{PREFIX_CHECKPOINT_DIR}-{best}"
        set_peft_model_state_dict(model, load_file(output_dir / checkpoint / "adapter_model.safetensors"))
        return {"metric": name, "best_step": best, "best_checkpoint": checkpoint, "best_value": history[best][name],
                "validation_rows": len(self.samples), "max_new_tokens": self.args.eval_generate_max_new_tokens,
                "checkpoints": [{"step": step, "metrics": history[step]} for step in sorted(history)]}


def _better(metric: str, value: float, than: float) -> bool:
    return value < than if metric == "perplexity" else value > than
