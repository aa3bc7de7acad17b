"""glmtune demo: the whole pipeline offline in a few minutes on a CPU. Builds a tiny random GLM, prepares
the bundled finance Q&A, LoRA-trains on it, and shows answers before and after tuning."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glmtune.arguments import (
    DatasetArguments,
    LoraArguments,
    ModelArguments,
    OutputDirArguments,
    OverwriteArguments,
    PrepareArguments,
    option,
)
from glmtune.artifacts import check_writable_output, empty_directory
from glmtune.config import parse_arguments
from glmtune.demo import demo_data_path
from glmtune.logs import progress_bars_enabled

logger = logging.getLogger(__name__)


# The shared --output_dir has no default (merge and eval require one); the demo writes here unless told.
DEMO_DEFAULTS: dict[str, Any] = {"output_dir": "glmtune-demo"}


@dataclass
class DemoArguments(OverwriteArguments, OutputDirArguments):
    help_overrides = {"output_dir": "Where the demo writes everything.",
                      "overwrite_output_dir": "Replace --output_dir if it exists."}

    max_steps: int = option("Training steps (batch 16).", default=150)
    show: int = option("How many questions to show before/after.", default=6)


def main(argv: list[str]) -> None:
    (args,) = parse_arguments("glmtune demo", [DemoArguments], argv, DEMO_DEFAULTS, description=__doc__)
    run(args)


def run(args: DemoArguments) -> float:
    """Run the demo; returns the exact-match rate of the tuned answers on the training questions."""
    from transformers import TrainingArguments

    from glmtune.commands import prepare
    from glmtune.data.prepare import load_data
    from glmtune.inference.engine import Engine, GenerationSettings
    from glmtune.models.tiny import build_tiny_glm
    from glmtune.train.sft import run_sft
    from glmtune.train.skeleton import LOSS_PLOT

    out = Path(args.output_dir)
    check_writable_output(out, args.overwrite_output_dir)
    empty_directory(out)
    started = time.time()
    data_file = demo_data_path()
    data = load_data([str(data_file)], None)

    _step(1, "build a tiny random GLM (transformers' GlmForCausalLM) and a BPE tokenizer")
    texts = [m.content for c in data.conversations for m in c.messages] * 4
    base = build_tiny_glm(out / "base-model", texts)
    _step(2, "prepare the bundled finance Q&A")
    prepare.run(ModelArguments(model=str(base)),
                PrepareArguments(data=[str(data_file)], save_path=str(out / "dataset"), max_seq_length=256))
    _step(3, f"LoRA-train for {args.max_steps} steps")
    training = TrainingArguments(
        output_dir=str(out / "run"), max_steps=args.max_steps, per_device_train_batch_size=16,
        learning_rate=3e-3, lr_scheduler_type="cosine", warmup_steps=10, logging_steps=10,
        save_strategy="no", report_to="none", remove_unused_columns=False, seed=0,
        disable_tqdm=not progress_bars_enabled())
    run_sft(ModelArguments(model=str(base)), DatasetArguments(dataset_path=str(out / "dataset")),
            LoraArguments(lora_rank=16, lora_alpha=32, lora_dropout=0.0), training)

    _step(4, "answer the training questions, before and after tuning")
    engine = Engine(str(base), str(out / "run"))
    settings = GenerationSettings(max_new_tokens=48)
    with engine.adapter_disabled():
        before = engine.generate(data.conversations, settings, batch_size=16)
    after = engine.generate(data.conversations, settings, batch_size=16)
    expected = [c.messages[-1].content for c in data.conversations]
    exact = sum(a == e for a, e in zip(after, expected, strict=True)) / len(expected)
    answers = out / "answers.jsonl"
    with open(answers, "w", encoding="utf-8") as f:
        for row, b, a in zip(data.rows, before, after, strict=True):
            f.write(json.dumps({**row, "before": b, "after": a}, ensure_ascii=False) + "\n")

    for row, conversation, b, a in list(zip(data.rows, data.conversations, before, after, strict=True))[: args.show]:
        print(f"\nQ: {conversation.messages[0].content}\n   expected: {row['output']}\n"
              f"   before:   {_short(b)}\n   after:    {a}")
    print(f"\nExact match after tuning: {exact:.0%} of {len(expected)} training questions "
          f"(before: {sum(b == e for b, e in zip(before, expected, strict=True)) / len(expected):.0%}); "
          f"{time.time() - started:.0f} s in all.")
    _print_artifacts(out, base, LOSS_PLOT, answers)
    return exact


def _step(number: int, text: str) -> None:
    logger.info(f"\n=== demo step {number}/4: {text}")


def _short(text: str, limit: int = 60) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."


def _print_artifacts(out: Path, base: Path, loss_plot: str, answers: Path) -> None:
    rows: list[tuple[str, Any]] = [
        ("base model", base), ("dataset", out / "dataset"), ("adapter", out / "run"),
        ("loss curve", out / "run" / loss_plot), ("answers", answers),
    ]
    print("\nArtifacts:")
    for name, path in rows:
        print(f"  {name:<11} {path}")
    print(f"\nAsk the tuned model yourself:\n  glmtune infer --peft_path {out / 'run'} --prompt '什么是股票？'"
          f"\n  glmtune chat --peft_path {out / 'run'}      (interactive, streaming; /exit to leave)")
