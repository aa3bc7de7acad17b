"""GRPO's prompts: each row of a data file (any format prepare reads) or of a prepared dataset as the ids generation
starts from, with its reference answer for the rewards.

A data file's row is its conversation up to the last assistant turn, rendered by glmtune's template with the
generation prompt (--enable_thinking: the template's thinking switch), control-token text kept as text
(data/control.py); that last assistant turn, if any, is the reference (a preference row's: the chosen answer). A
prepared dataset's row (input_ids, labels) is split where its last supervised span starts: the ids before it are
the prompt, the span (without its stop token) the reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from glmtune.errors import UserError

# The columns of the prompts dataset: what GRPOTrainer reads (prompt), what glmtune's trainer generates from
# (prompt_ids), and what every reward function gets besides (reference, location).
PROMPT_COLUMNS = ("prompt", "prompt_ids", "reference", "location")


def is_prepared(dataset_path: str) -> bool:
    """Whether --dataset_path is a directory `glmtune prepare` wrote (rather than a data file)."""
    return (Path(dataset_path) / "manifest.json").is_file()


def rows_from_file(tokenizer: Any, dataset_path: str, format_name: str | None,
                   enable_thinking: bool | None) -> list[dict[str, Any]]:
    """The prompts of a data file's rows, rendered with the generation prompt.

    Raises:
        UserError: the file can't be read, its format detected, or a row is malformed (every one listed).
    """
    from glmtune.data.prepare import load_data
    from glmtune.data.templates import encode_prompt

    data = load_data([dataset_path], format_name, need_answer=False)
    rows = []
    for conversation in data.conversations:
        last = conversation.messages[-1] if conversation.messages else None
        reference = last.content.strip() if last is not None and last.role == "assistant" else None
        prompt_ids = encode_prompt(tokenizer, conversation.prompt_part(), enable_thinking)
        rows.append({"prompt": tokenizer.decode(prompt_ids, skip_special_tokens=False), "prompt_ids": prompt_ids,
                     "reference": reference, "location": conversation.location})
    return rows


def rows_from_prepared(tokenizer: Any, stop_ids: list[int], dataset_dir: Path,
                       split_name: str = "train") -> list[dict[str, Any]]:
    """The prompts of a prepared dataset's `train` (or `validation`) split (evaluation's split of a row into prompt
    and answer).

    Raises:
        UserError: no readable such split, or rows supervised from their first token (--train_on_prompt, text).
    """
    from datasets import load_from_disk

    from glmtune.evaluation.run import samples_from_tokenized

    try:
        split = load_from_disk(str(dataset_dir))[split_name]
    except (FileNotFoundError, KeyError) as e:
        if split_name == "validation":
            raise UserError(f"--eval_strategy: {dataset_dir} has no `validation` split to evaluate on",
                            hint="prepare it with --val_size, or leave --eval_strategy out") from None
        raise UserError(f"{dataset_dir} has a manifest but no readable `train` split ({e})",
                        hint="prepare it again with `glmtune prepare`") from None
    return [{"prompt": s.prompt, "prompt_ids": s.prompt_ids, "reference": s.reference or None,
             "location": f"{dataset_dir.name}: {s.location}"}
            for s in samples_from_tokenized(tokenizer, stop_ids, split)]


def refuse_missing_references(rows: list[dict[str, Any]], reward: str) -> None:
    """A reward that compares with the reference needs one on every row.

    Raises:
        UserError: rows without a reference answer (up to 20 listed).
    """
    missing = [f"{row['location'] or 'a row'}: no reference answer" for row in rows if row["reference"] is None]
    if missing:
        raise UserError(f"--reward_funcs {reward}: {len(missing)} row(s) have no reference answer to compare with",
                        problems=missing[:20], hint="give every row its answer (the last assistant turn), or drop "
                                                    f"the {reward} reward")
