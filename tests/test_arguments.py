"""The option dataclasses: each shared option declared once, allowed values declared with the option and refused in
glmtune's error shape (from flags and from YAML), and the library never importing a command."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
from typing import Any

import pytest
from conftest import ROOT

import glmtune.arguments as arguments
from glmtune.arguments.options import Options
from glmtune.cli import COMMANDS
from glmtune.config import parse_arguments
from glmtune.errors import UserError

SRC = ROOT / "src" / "glmtune"


def command_imports(source: str, module: str) -> list[str]:
    """The imports of `glmtune.commands` in a module's source (`module`: its dotted name, for relative imports)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[:2] == ["glmtune", "commands"]]
        elif isinstance(node, ast.ImportFrom):
            package = module.split(".")[: len(module.split(".")) - node.level] if node.level else []
            target = ".".join([*package, node.module or ""]).strip(".")
            names = [target] + [f"{target}.{a.name}" for a in node.names]
            found += [n for n in names if n.split(".")[:2] == ["glmtune", "commands"]][:1]
    return found


def test_the_import_rule_check_sees_every_way_of_importing_a_command():
    for source in ("import glmtune.commands.serve", "from glmtune.commands.prepare import run",
                   "from glmtune import commands", "from ..commands import serve", "from ..commands.serve import x"):
        assert command_imports(source, "glmtune.data.prepared"), source
    for source in ("import glmtune.config", "from glmtune.data import prepare", "from . import prepare"):
        assert not command_imports(source, "glmtune.data.prepared"), source


def test_no_module_outside_the_cli_and_the_commands_imports_a_command():
    modules = sorted(SRC.rglob("*.py"))
    assert len(modules) > 40  # the walk saw the package
    offenders = {}
    for path in modules:
        relative = path.relative_to(SRC.parent).with_suffix("")
        module = ".".join(relative.parts[:-1] if relative.name == "__init__" else relative.parts)
        if module == "glmtune.cli" or module.startswith("glmtune.commands"):
            continue
        if found := command_imports(path.read_text(encoding="utf-8"), module):
            offenders[module] = found
    assert offenders == {}


def option_classes() -> list[type]:
    return [c for c in vars(arguments).values() if isinstance(c, type) and issubclass(c, Options) and c is not Options]


def command_dataclasses(verb: str, monkeypatch: pytest.MonkeyPatch) -> list[type]:
    """The dataclasses `glmtune VERB` parses its options with, caught on the way to its help page (which every
    command renders from them, through parse_arguments or, for train and dpo, command_help directly)."""
    module = importlib.import_module(COMMANDS[verb][0])
    caught: list[type] = []

    def parse_arguments(prog: str, dataclass_types: list[type], *args: Any, **kwargs: Any) -> None:
        caught.extend(dataclass_types)
        raise SystemExit(0)

    def command_help(prog: str, description: str | None, dataclass_types: list[type], *args: Any,
                     **kwargs: Any) -> None:
        parse_arguments(prog, dataclass_types)

    from glmtune.commands import preference  # the help page of dpo, kto, orpo and simpo

    for catch in (parse_arguments, command_help):
        for holder in (module, preference):
            if hasattr(holder, catch.__name__):
                monkeypatch.setattr(holder, catch.__name__, catch)
    with pytest.raises(SystemExit):
        module.main(["--help"])
    assert caught, verb
    return caught


def declarations(classes: list[type], package: str = "glmtune") -> dict[str, set[str]]:
    """Each option (an init field of the package's dataclasses among `classes` and their bases) -> the classes that
    declare it themselves (a field in their own body, not one they inherit). transformers' and TRL's don't count."""
    found: dict[str, set[str]] = {}
    own = {c for cls in classes for c in cls.__mro__ if dataclasses.is_dataclass(c) and c.__module__.startswith(
        package)}
    for cls in own:
        options = {f.name for f in dataclasses.fields(cls) if f.init}
        for name in inspect.get_annotations(cls).keys() & options:
            found.setdefault(name, set()).add(f"{cls.__module__}.{cls.__qualname__}")
    return found


def test_the_declaration_check_sees_an_option_declared_twice():
    @dataclasses.dataclass
    class Sampling(Options):
        seed: int = 1

    @dataclasses.dataclass
    class Split(Options):
        seed: int = 2

    @dataclasses.dataclass
    class Command(Sampling):
        help_overrides = {"seed": "reworded, not redeclared"}

    assert [len(found) for found in declarations([Command, Split], __name__).values()] == [2]
    assert [len(found) for found in declarations([Command], __name__).values()] == [1]


def test_every_option_of_every_command_is_declared_by_one_dataclass(monkeypatch):
    classes = {verb: command_dataclasses(verb, monkeypatch) for verb in COMMANDS}
    assert {"PlanArguments", "ConvertArguments", "DemoArguments", "DpoArguments"} <= {
        c.__name__ for found in classes.values() for c in found}  # the walk reached every kind of command
    found = declarations([*option_classes(), *(c for found in classes.values() for c in found)])
    assert {"peft_path", "seed", "overwrite_output_dir", "output_dir", "batch_size", "dataset_path", "prompt",
            "model", "precision", "lora_rank", "max_seq_length"} <= set(found)
    assert {name: sorted(where) for name, where in found.items() if len(where) > 1} == {}


def test_infer_chat_eval_serve_merge_and_dpo_take_the_one_adapter_option():
    for command in (arguments.InferenceArguments, arguments.ChatArguments, arguments.EvalArguments,
                    arguments.ServeArguments, arguments.MergeArguments, arguments.DpoArguments):
        assert issubclass(command, arguments.AdapterArguments), command


def test_allowed_values_match_what_the_library_dispatches_on():
    from typing import get_args

    from glmtune.data.formats import FORMATS
    from glmtune.evaluation.metrics import TEXT_METRICS

    assert get_args(arguments.DataFormat) == tuple(FORMATS)
    assert tuple(arguments.MERGE_DTYPES) == arguments.PRECISIONS
    assert arguments.EVAL_METRICS == (*TEXT_METRICS, "perplexity")


def parse(types: list[type], *argv: str) -> tuple:
    return parse_arguments("glmtune test", types, [str(a) for a in argv])


@pytest.mark.parametrize("types, argv, message, hint", [
    ([arguments.ModelArguments, arguments.MergeArguments], ["--dtype", "fp64"], "--dtype fp64 is unknown",
     "choose one of auto, fp32, bf16, fp16"),
    ([arguments.ModelArguments, arguments.PrepareArguments], ["--truncation", "middle"],
     "--truncation middle is unknown", "choose one of right, left, drop"),
    ([arguments.ModelArguments, arguments.InferenceArguments], ["--quantization_bit", "3"],
     "--quantization_bit must be 4 or 8, got 3", "choose one of 4, 8"),
    ([arguments.DpoArguments], ["--reference", "policy"], "--reference policy is unknown", "choose one of start, base"),
    ([arguments.PrecisionArguments], ["--precision", "xyz"], "--precision xyz is unknown", "fp16"),
])
def test_a_value_outside_the_declared_ones_is_a_user_error(types, argv, message, hint, tmp_path):
    with pytest.raises(UserError) as flag:
        parse(types, *argv)
    assert flag.value.message == message and hint in flag.value.hint
    config = tmp_path / "options.yaml"
    config.write_text(f"{argv[0][2:]}: {argv[1]}\n", encoding="utf-8")
    with pytest.raises(UserError) as yaml_value:
        parse(types, "--config", config)
    assert yaml_value.value.message == message


def test_declared_values_parse_to_their_type(tmp_path):
    (model_args,) = parse([arguments.ModelArguments], "--quantization_bit", "4")
    assert model_args.quantization_bit == 4
    config = tmp_path / "options.yaml"
    config.write_text("quantization_bit: 8\n", encoding="utf-8")
    assert parse([arguments.ModelArguments], "--config", config)[0].quantization_bit == 8


def test_an_invalid_choice_on_the_command_line_ends_in_glmtunes_error_shape(cli, tmp_path):
    result = cli("merge", "--peft_path", tmp_path, "--output_dir", tmp_path / "out", "--dtype", "fp64")
    assert result.code == 2
    assert result.err.splitlines() == ["error: --dtype fp64 is unknown", "hint: choose one of auto, fp32, bf16, fp16"]


def test_help_lists_each_options_allowed_values(cli):
    page = cli("merge", "--help").out
    assert "one of: auto, fp32, bf16, fp16; default: auto" in " ".join(page.split())
    assert "one of: right, left, drop" in " ".join(cli("prepare", "--help").out.split())


def test_a_command_words_a_shared_option_in_its_own_terms(cli):
    assert "to fold into the base model" in cli("merge", "--help").out
    assert "go on training" in " ".join(cli("dpo", "--help").out.split())
    assert "checkpoint-*" in cli("infer", "--help").out
    # A wording given by a base (SamplingArguments' --seed) survives a command's own (chat's --prompt).
    chat = " ".join(cli("chat", "--help").out.split())
    assert "Random seed for sampling." in chat and "answer several in turn, as one conversation" in chat
    assert "--seed SEED Seed of the validation split's shuffle." in " ".join(cli("prepare", "--help").out.split())
    assert "Start afresh in a non-empty --output_dir." in " ".join(cli("dpo", "--help").out.split())


def test_data_and_its_seed_name_jsonl_path_are_one_option(tmp_path):
    types = [arguments.ModelArguments, arguments.PrepareArguments]
    assert parse(types, "--data", "a.json", "b.json")[1].data == ["a.json", "b.json"]
    assert parse(types, "--jsonl_path", "a.json")[1].data == ["a.json"]
    for key in ("data", "jsonl_path"):
        config = tmp_path / f"{key}.yaml"
        config.write_text(f"{key}: a.json\n", encoding="utf-8")
        assert parse(types, "--config", config)[1].data == ["a.json"], key
    both = tmp_path / "both.yaml"
    both.write_text("data: a.json\njsonl_path: b.json\n", encoding="utf-8")
    with pytest.raises(UserError) as error:
        parse(types, "--config", both)
    assert "'jsonl_path' and 'data' are the same option" in "\n".join(error.value.problems)


def test_prepare_help_leads_with_data_and_names_jsonl_path_as_its_former_name(cli):
    page = cli("prepare", "--help").out
    section = page[page.index("PrepareArguments:"):]
    assert section.split()[1] == "--data"
    assert "--jsonl_path JSONL_PATH" in section and "The same as --data" in section


def test_every_option_dataclass_is_a_dataclass_with_help_on_every_field():
    for cls in option_classes():
        for field in dataclasses.fields(cls):
            assert field.metadata.get("help"), f"{cls.__name__}.{field.name}"
