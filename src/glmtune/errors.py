"""The one error type for user mistakes: the CLI prints it without a traceback and exits with code 2."""

from __future__ import annotations

MAX_PROBLEMS = 20  # how many problems of one input are collected before stopping


class UserError(Exception):
    """A mistake in the user's input or command line, with what was wrong and how to fix it.

    `problems` lists individual findings (e.g. one per bad row), each already naming where it is. `exit_code` is
    what the command exits with (2, a usage error, unless a subclass says otherwise).
    """

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None, problems: list[str] | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.problems = problems or []

    def render(self) -> str:
        lines = [f"error: {self.message}"]
        lines += [f"  {p}" for p in self.problems]
        if self.hint:
            lines.append(f"hint: {self.hint}")
        return "\n".join(lines)
