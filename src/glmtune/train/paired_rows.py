"""glmtune's tokenized pairs in the form TRL's older pair trainers (ORPO, CPO/SimPO) take. Those trainers tokenize
every row themselves (`tokenize_row`, from prompt/chosen/rejected text) and have no switch to skip it; ours were
rendered by glmtune's templates (the ChatGLM family's included) and cut by prepare's truncation rules, so only their
layout changes: each answer after the prompt, the prompt masked out of the labels."""

from __future__ import annotations

from typing import Any

from glmtune.data.preference import PREFERENCE_COLUMNS
from glmtune.data.templates import IGNORE_INDEX


class PretokenizedPairs:
    """Mixed into a TRL pair trainer before it: its tokenize_row, over prompt_ids / chosen_ids / rejected_ids."""

    def tokenize_row(self, feature: dict[str, Any], model: Any = None) -> dict[str, list[int]]:
        assert set(PREFERENCE_COLUMNS) <= set(feature), list(feature)  # prepare wrote them
        prompt = feature["prompt_ids"]
        row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
        for name in ("chosen", "rejected"):
            answer = feature[f"{name}_ids"]
            row[f"{name}_input_ids"] = prompt + answer
            row[f"{name}_attention_mask"] = [1] * (len(prompt) + len(answer))
            row[f"{name}_labels"] = [IGNORE_INDEX] * len(prompt) + answer
        return row
