"""How answers are generated: the options infer, chat and eval share."""

from __future__ import annotations

from dataclasses import dataclass

from glmtune.arguments.options import Options, check_at_least_one, option
from glmtune.arguments.run import SeedArguments
from glmtune.errors import UserError


@dataclass
class GenerationArguments(Options):
    """How long an answer may be (eval sets its own default through its command defaults)."""

    max_new_tokens: int | None = option("Longest answer in tokens (when not given: 256, or what infer's "
                                        "prompt + answer limit leaves).")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_at_least_one(self, "max_new_tokens")


@dataclass
class SamplingArguments(SeedArguments):
    """How each answer's tokens are picked: greedy by default."""

    help_overrides = {"seed": "Random seed for sampling."}

    temperature: float = option("Sampling temperature; 0 means greedy decoding.", default=0.0)
    top_p: float = option("Nucleus sampling probability mass (with temperature > 0).", default=1.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.temperature < 0:
            raise UserError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top_p must be in (0, 1], got {self.top_p}")


@dataclass
class ThinkingArguments(Options):
    """The chat template's thinking switch (GLM-4.5/4.6/4.7, GLM-Z1): one option for prepare and the commands that
    generate."""

    enable_thinking: bool | None = option("Think before answering (true) or answer at once (false: the template "
                                          "writes /nothink and an empty think block), for models whose chat "
                                          "template has this switch; others refuse it. Default: the template's own.")
