"""What a command's work takes whatever it works on: the random seed, and how many rows go together."""

from __future__ import annotations

from dataclasses import dataclass

from glmtune.arguments.options import Options, check_at_least_one, option


@dataclass
class SeedArguments(Options):
    """Each command words it for what it draws (sampling, the validation split) through `help_overrides`."""

    seed: int = option("Random seed.", default=42)


@dataclass
class BatchArguments(Options):
    batch_size: int = option("Rows processed together.", default=8)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_at_least_one(self, "batch_size")
