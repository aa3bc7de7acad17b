"""Command-line and YAML configuration on top of transformers' HfArgumentParser.

Precedence: dataclass default < the command's own defaults < YAML file (`--config`) < command line.
Unknown keys in the YAML file are errors, like unknown flags on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
from pathlib import Path
from typing import Any

import yaml

from glmtune.arguments.options import Options
from glmtune.errors import UserError
from glmtune.help import asks_for_help, command_help
from glmtune.logs import LOGGING_OPTIONS, add_logging_arguments, configure_logging


def parse_arguments(
    prog: str,
    dataclass_types: list[type],
    argv: list[str],
    defaults: dict[str, Any] | None = None,
    description: str | None = None,
) -> tuple[Any, ...]:
    """Parse argv (plus an optional `--config FILE.yaml`) into one instance of each dataclass, after applying
    --log_level / --quiet (every command takes them)."""
    if asks_for_help(argv):  # answered without importing transformers, as argparse would: print, exit 0
        print(command_help(prog, description, dataclass_types, defaults))
        raise SystemExit(0)
    from transformers import HfArgumentParser  # about 2 s to import; does not import torch

    # allow_abbrev=False: an unknown flag must be an error, never silently taken as a prefix of a known one.
    parser = HfArgumentParser(dataclass_types, prog=prog, description=description, allow_abbrev=False)
    parser.add_argument("--config", type=Path, default=None, help="YAML file of options; flags override it.")
    _leave_choices_to_the_dataclasses(parser, dataclass_types)
    known = {f.name for t in dataclass_types for f in dataclasses.fields(t)}
    add_logging_arguments(parser, known)

    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", type=Path, default=None)
    config_path = pre.parse_known_args(argv)[0].config

    # Our own invariant: a default for a field no dataclass has would be dropped silently by the parser.
    assert not set(defaults or {}) - known, f"defaults for unknown options: {set(defaults or {}) - known}"
    merged = dict(defaults or {})
    if config_path is not None:
        values = read_yaml_config(config_path, known | set(LOGGING_OPTIONS), option_aliases(dataclass_types))
        actions = {action.dest: action for action in parser._actions}
        merged.update({key: _coerce(actions[key], key, value, config_path) for key, value in values.items()})
    parser.set_defaults(**merged)
    _apply_logging_options(parser, argv, known, merged)
    try:
        *instances, namespace_rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ValueError as e:  # a library dataclass (TrainingArguments) rejecting a combination of values
        raise UserError(f"invalid options: {e}", hint=f"see {prog} --help") from None
    if namespace_rest:  # HfArgumentParser returns leftovers instead of failing; we fail like argparse
        parser.error(f"unrecognized arguments: {' '.join(namespace_rest)}")
    # The parser appends a Namespace of the options that belong to no dataclass (--config, --quiet): drop it.
    return tuple(i for i in instances if not isinstance(i, argparse.Namespace))


def _leave_choices_to_the_dataclasses(parser: argparse.ArgumentParser, dataclass_types: list[type]) -> None:
    """HfArgumentParser gives argparse the choices of a Literal-typed option; argparse would refuse a value with
    its usage dump, before glmtune's own check (Options) could say it in glmtune's error shape."""
    own = {f.name for t in dataclass_types if issubclass(t, Options) for f in dataclasses.fields(t)}
    for action in parser._actions:
        if action.dest in own:
            action.choices = None


def option_aliases(dataclass_types: list[type]) -> dict[str, str]:
    """Each option's other names (its `aliases` metadata, without the dashes) -> its field name."""
    return {alias.lstrip("-"): f.name for t in dataclass_types for f in dataclasses.fields(t)
            for alias in f.metadata.get("aliases", [])}


def _apply_logging_options(parser: argparse.ArgumentParser, argv: list[str], known: set[str],
                           defaults: dict[str, Any]) -> None:
    """Set up logging before the dataclasses are built, so that their own warnings follow --log_level too."""
    options = parser.parse_known_args(argv)[0]
    configure_logging(options.log_level, options.quiet)
    if options.quiet and "disable_tqdm" in known and "disable_tqdm" not in defaults:  # no Trainer progress bar
        parser.set_defaults(disable_tqdm=True)


def read_yaml_config(path: Path, known: set[str], aliases: dict[str, str] | None = None) -> dict[str, Any]:
    """The YAML file's options by field name; a key may be an option's alias (`jsonl_path` for `data`)."""
    if not path.is_file():
        raise UserError(f"config file {path} does not exist", hint="pass --config PATH to a YAML file")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must hold a mapping of option: value, found {type(values).__name__}")
    aliases = aliases or {}
    problems = []
    for key in [k for k in values if k in aliases]:
        if aliases[key] in values:
            problems.append(f"{path}: '{key}' and '{aliases[key]}' are the same option: keep one")
        values[aliases[key]] = values.pop(key)
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            problems.append(f"{path}: unknown key '{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    if problems:
        raise UserError(f"config file {path} has unknown keys", problems=problems,
                        hint="keys are the command's flags without the leading --; see --help")
    return values


def _coerce(action: argparse.Action, key: str, value: Any, path: Path) -> Any:
    """Convert a YAML value with the option's own argparse type (argparse only converts string defaults)."""
    def fail(expected: str) -> UserError:
        return UserError(f"{path}: key '{key}': expected {expected}, found {value!r}")

    convert = action.type or (lambda v: v)
    try:
        if value is None:
            if action.default is not None and not action.required:
                raise fail("a value (null is not allowed here)")
            return None
        if isinstance(value, dict):  # a few TrainingArguments options take mappings as they are
            return value
        if action.nargs in ("+", "*"):
            return [convert(str(v)) for v in (value if isinstance(value, list) else [value])]
        if isinstance(value, list):
            if action.type is not str:
                raise fail("a single value")
            value = ",".join(map(str, value))  # a list for a comma-separated option, e.g. target_modules
        return value if isinstance(value, bool) else convert(str(value))
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        raise fail(getattr(action.type, "__name__", "another type")) from None


def to_plain_dict(*instances: Any) -> dict[str, Any]:
    """The resolved configuration of a run, as JSON/YAML-safe values, for manifests and config files."""
    out: dict[str, Any] = {}
    for inst in instances:
        items = inst.to_dict() if hasattr(inst, "to_dict") else dataclasses.asdict(inst)
        for k, v in items.items():
            out[k] = v if isinstance(v, (str, int, float, bool, type(None), list, dict)) else str(v)
    return out
