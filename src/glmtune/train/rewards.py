"""GRPO's reward functions: the built-in ones (accuracy, format, length) and the user's own, loaded from
`path/to/file.py:function`, each guarded so that a bad one stops the run with a message, never a bare traceback.

A reward function takes the batch as TRL's GRPOTrainer passes it, keyword arguments only: `prompts` and
`completions` (the prompts as glmtune rendered them, and the generated texts), `completion_ids`, and every other
column of the prompts dataset (`reference`: the row's reference answer or None; `location`: the row's file:line).
It returns one float (or None: no opinion) per completion.
"""

from __future__ import annotations

import importlib.util
import numbers
import re
import sys
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from glmtune.errors import UserError

RewardFunction = Callable[..., list[float | None]]
BUILT_IN = ("accuracy", "format", "length")
THINK_END = "</think>"
_THINK = re.compile(r"\s*<think>(.*?)</think>\s*(\S.*)?", re.DOTALL)
_NUMBER = re.compile(r"[+-]?(\d{1,3}(,\d{3})+|\d+)(\.\d+)?|[+-]?\.\d+")


def answer_part(completion: str) -> str:
    """The answer of a completion: the text after its last </think> (all of it when it has none), stripped."""
    return completion.rsplit(THINK_END, 1)[-1].strip()


def normalise(text: str) -> str:
    """Text compared as an answer: whitespace runs as one space, case folded, a final full stop dropped, and numbers
    in one form (1,000.50 and 1000.5 alike; +3 and 3.0 as 3)."""
    text = " ".join(text.split()).casefold().rstrip(".。")

    def number(match: re.Match[str]) -> str:
        try:
            value = Decimal(match.group(0).replace(",", ""))
        except InvalidOperation:  # not reachable through _NUMBER, kept as text if it were
            return match.group(0)
        value = value.normalize()
        return format(value.quantize(Decimal(1)) if value == value.to_integral_value() else value, "f")

    return _NUMBER.sub(number, text)


def accuracy(completions: list[str], reference: list[str | None], **_: Any) -> list[float | None]:
    """1 when the answer (after any </think>) equals the row's reference once both are normalised, else 0; None for
    a row without a reference (grpo refuses such rows with this reward before training)."""
    return [None if ref is None else float(normalise(answer_part(c)) == normalise(ref))
            for c, ref in zip(completions, reference, strict=True)]


def format_reward(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
    """1 for reasoning in <think>...</think> followed by a non-empty answer, else 0. A template whose generation
    prompt opens the think block itself (the prompt ends with <think>) has the completion start inside it."""
    rewards = []
    for prompt, completion in zip(prompts, completions, strict=True):
        text = "<think>" + completion if prompt.rstrip().endswith("<think>") else completion
        match = _THINK.fullmatch(text)
        rewards.append(float(bool(match and match.group(1).strip() and match.group(2))))
    return rewards


def length_reward(target: int) -> RewardFunction:
    """A reward for completions near `target` tokens: 1 at the target, falling linearly to 0 at 0 tokens and at
    twice the target."""

    def length(completion_ids: list[list[int]], **_: Any) -> list[float]:
        return [max(0.0, 1.0 - abs(len(ids) - target) / target) for ids in completion_ids]

    return length


def load_user_reward(spec: str) -> RewardFunction:
    """The function `name` of the Python file in `spec` ("path/to/file.py:name"), imported as a module.

    Raises:
        UserError: no ':name', a file that does not exist or fails to import, or no callable of that name in it.
    """
    path_text, sep, name = spec.rpartition(":")
    if not sep or not path_text or not name.isidentifier():
        raise UserError(f"--reward_funcs: '{spec}' is neither a built-in reward ({', '.join(BUILT_IN)}) nor "
                        "path/to/file.py:function", hint="e.g. --reward_funcs accuracy,rewards.py:my_reward")
    path = Path(path_text)
    if not path.is_file():
        raise UserError(f"--reward_funcs {spec}: the file {path} does not exist")
    module_name = f"glmtune_user_rewards_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise UserError(f"--reward_funcs {spec}: {path} can't be imported as Python", hint="name a .py file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up by name
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # the user's code: any error it raises on import
        del sys.modules[module_name]
        raise UserError(f"--reward_funcs {spec}: importing {path} failed: {type(e).__name__}: {e}") from None
    function = getattr(module, name, None)
    if not callable(function):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                       and getattr(v, "__module__", None) == module_name)
        raise UserError(f"--reward_funcs {spec}: {path} has no function '{name}'",
                        hint=f"its functions: {', '.join(found)}" if found else "define it in that file")
    return function


def reward_functions(names: str | list[str], length_target: int) -> list[RewardFunction]:
    """The reward functions --reward_funcs names (comma-separated, or a YAML list), each guarded (`guarded`).

    Raises:
        UserError: none named, or one that can't be loaded (load_user_reward).
    """
    specs = [s.strip() for s in (names.split(",") if isinstance(names, str) else names) if str(s).strip()]
    if not specs:
        raise UserError("--reward_funcs is required: the rewards the completions are scored with",
                        hint=f"built-in: {', '.join(BUILT_IN)}; your own: path/to/file.py:function")
    functions = []
    for spec in specs:
        if spec == "accuracy":
            function, label = accuracy, "accuracy"
        elif spec == "format":
            function, label = format_reward, "format"
        elif spec == "length":
            function, label = length_reward(length_target), "length"
        else:
            function, label = load_user_reward(spec), spec
        functions.append(guarded(function, spec.rpartition(":")[2] if ":" in spec else label, label))
    return functions


def guarded(function: RewardFunction, name: str, label: str) -> RewardFunction:
    """`function` checked on every call: an exception it raises, or a result that is not one number (or None) per
    completion, stops the run with a UserError naming the function and, for an exception, the first row it fails
    on (found by calling it again row by row). `name` becomes its __name__, which TRL logs (rewards/<name>/mean)."""

    def call(**batch: Any) -> list[float | None]:
        try:
            values = function(**batch)
        except Exception as e:  # the user's code: whatever it raises
            raise _failure(function, label, batch, e) from None
        return _checked(values, label, len(batch["completions"]))

    call.__name__ = name
    call.__doc__ = function.__doc__
    return call


def _checked(values: Any, label: str, count: int) -> list[float | None]:
    try:
        values = list(values)
    except TypeError:
        raise UserError(f"the reward function {label} returned {type(values).__name__}, not a list of {count} "
                        "numbers (one per completion)") from None
    if len(values) != count:
        raise UserError(f"the reward function {label} returned {len(values)} values for {count} completions",
                        hint="return one number (or None) per completion, in order")
    bad = next((v for v in values if v is not None and not _is_number(v)), None)
    if bad is not None:
        raise UserError(f"the reward function {label} returned {bad!r} ({type(bad).__name__}) among its rewards",
                        hint="return one number (or None) per completion")
    return [None if v is None else float(v) for v in values]


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real)  # int, float, bool and numpy's scalars


def _failure(function: RewardFunction, label: str, batch: dict[str, Any], error: Exception) -> UserError:
    """The error for a reward function that raised: the first row it raises on alone, else the batch's."""
    count = len(batch["completions"])
    for i in range(count):
        row = {k: v[i:i + 1] if isinstance(v, list) and len(v) == count else v for k, v in batch.items()}
        try:
            function(**row)
        except Exception as e:  # the user's code
            return _raised(label, e, batch, i)
    return _raised(label, error, batch, None)


def _raised(label: str, error: Exception, batch: dict[str, Any], row: int | None) -> UserError:
    problems = []
    if row is not None:
        where = (batch.get("location") or [None] * (row + 1))[row]
        problems = [f"row: {where or f'{row} of the batch'}",
                    f"prompt: {_short(batch['prompts'][row])}", f"completion: {_short(batch['completions'][row])}"]
    return UserError(f"the reward function {label} raised {type(error).__name__}: {error}", problems=problems,
                     hint="fix the function (it must take prompts, completions and **kwargs, and return one number "
                          "per completion)")


def _short(text: Any, limit: int = 200) -> str:
    text = repr(text)
    return text if len(text) <= limit else text[:limit] + "...'"
