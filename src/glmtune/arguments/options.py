"""What every glmtune option dataclass shares: the field helper, and the one check of allowed values.

An option's allowed values are declared with it, as a `Literal[...]` type. HfArgumentParser would turn that into
argparse `choices`, whose refusal is argparse's usage dump; `glmtune.config` leaves the check to `Options` instead,
so a value from the command line, a YAML file or Python code is refused the same way, with glmtune's error shape.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, ClassVar, Literal, get_args, get_origin

from glmtune.errors import UserError


def option(text: str, default: Any = None, **metadata: Any) -> Any:
    """A dataclass field with its help text. `metadata` goes to argparse as it is (`aliases`, `action`)."""
    return dataclasses.field(default=default, metadata={"help": text, **metadata})


def allowed_values(annotation: Any) -> tuple[Any, ...] | None:
    """The values a `Literal[...]` or `Literal[...] | None` type allows; None for any other type."""
    if get_origin(annotation) in (typing.Union, types.UnionType):
        literals = [arg for arg in get_args(annotation) if get_origin(arg) is Literal]
        return get_args(literals[0]) if literals else None
    return get_args(annotation) if get_origin(annotation) is Literal else None


def check_at_least_one(args: object, *names: str) -> None:
    """Counts (lengths, batch sizes, samples) must be at least 1 where given."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be at least 1, got {value}")


@functools.cache
def declared_choices(cls: type) -> dict[str, tuple[Any, ...]]:
    """Each Literal-typed field of an option dataclass -> its allowed values."""
    hints = typing.get_type_hints(cls)
    choices = {f.name: allowed_values(hints[f.name]) for f in dataclasses.fields(cls)}
    return {name: values for name, values in choices.items() if values is not None}


class Options:
    """The base of glmtune's option dataclasses. Subclasses that validate more call `super().__post_init__()`.

    `help_overrides` lets a command word an option it shares in its own terms (dpo's --peft_path is the adapter it
    goes on training); the option itself stays declared once.
    """

    help_overrides: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A composed class keeps the wordings of the classes it is made of; its own and its nearer bases' win."""
        super().__init_subclass__(**kwargs)
        merged: dict[str, str] = {}
        for base in reversed(cls.__mro__):
            merged.update(base.__dict__.get("help_overrides", {}))
        cls.help_overrides = merged

    def __post_init__(self) -> None:
        for name, allowed in declared_choices(type(self)).items():
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise _refusal(name, value, allowed)


def _refusal(name: str, value: Any, allowed: tuple[Any, ...]) -> UserError:
    hint = f"choose one of {', '.join(map(str, allowed))}"
    if all(isinstance(a, str) for a in allowed):
        return UserError(f"--{name} {value} is unknown", hint=hint)
    return UserError(f"--{name} must be {' or '.join(map(str, allowed))}, got {value}", hint=hint)
