"""What `glmtune plan` printed, read back for the Plan page's chart: each part of the peak memory, the total and the
device's memory, in GiB (the board runs plan as its command, and the library never imports a command)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# "  LoRA weights             0.01 GiB", "  device memory  1.00 GiB  (given)"
_ROW = re.compile(r"^  (\S.*?)\s+(\d+(?:\.\d+)?) GiB(?:\s+\(.*\))?$")


@dataclass
class PlanFigures:
    parts: dict[str, float] = field(default_factory=dict)  # GiB, in plan's order
    total: float | None = None
    device: float | None = None


def read_plan(text: str) -> PlanFigures:
    """The figures of plan's table (the lines after "peak memory estimate:"; suggestions below it are left out)."""
    figures = PlanFigures()
    lines = text.splitlines()
    start = next((i + 1 for i, line in enumerate(lines) if line.startswith("peak memory estimate:")), len(lines))
    for line in lines[start:]:
        match = _ROW.match(line)
        if match is None:
            if line.strip().startswith("-"):
                continue
            break
        name, value = match.group(1), float(match.group(2))
        if name == "total (peak)":
            figures.total = value
        elif name == "device memory":
            figures.device = value
        else:
            figures.parts[name] = value
    return figures
