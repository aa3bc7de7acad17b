"""P-Tuning v2's options (--finetuning_type ptuning): the learned prefix of keys and values every layer attends to."""

from __future__ import annotations

from dataclasses import dataclass

from glmtune.arguments.options import Options, check_at_least_one, option


@dataclass
class PtuningArguments(Options):
    pre_seq_len: int = option("--finetuning_type ptuning: the prefix's length in virtual tokens, the keys and values "
                              "every layer attends to before the prompt (THUDM's recipe: 128).", default=128)
    prefix_projection: bool = option("--finetuning_type ptuning: compute the prefix through a two-layer MLP "
                                     "(hidden size -> hidden size -> every layer's keys and values) instead of "
                                     "learning it directly; THUDM's recipe leaves it off.", default=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_at_least_one(self, "pre_seq_len")
