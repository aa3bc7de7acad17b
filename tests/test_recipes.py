"""The training recipes in examples/ (every YAML there but accelerate's launch configs, which
test_launch_configs.py reads): each opens with the command that runs it, and parses with that command's real option
parser (unknown keys and bad values fail here as they would at run time); the other commands its header shows
parse too and fit together (the dataset it trains on is the one its prepare step writes, with the same model; DPO
starts from the LoRA run's adapter; a quantized THUDM-layout model is the converted directory); the peak memory
its header (and examples/README.md's table) quotes is what `glmtune plan` prints now, for the run the recipe
describes; and the ChatGLM3 headers' commands run, in order, on a small checkpoint of that layout."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT, SHARED

from glmtune.errors import UserError

EXAMPLES = ROOT / "examples"
CONFIGS = ROOT / "tests" / "data" / "configs"
RECIPES = sorted(p for p in EXAMPLES.rglob("*.yaml") if p.parent.name != "accelerate")
METHODS = ["dpo.yaml", "lora.yaml", "qlora.yaml"]
# GLM-4.5-Air has LoRA only: bitsandbytes can't quantize its fused experts (its lora.yaml's header says why)
FAMILY_METHODS = {"chatglm3-6b": METHODS, "glm-4-9b-0414": METHODS, "glm-4-9b-chat": METHODS,
                  "glm-4.5-air": ["lora.yaml"]}
FAMILIES = sorted(FAMILY_METHODS)
FAMILY_RECIPES = [EXAMPLES / family / method for family in FAMILIES for method in FAMILY_METHODS[family]]
RECIPE_VERBS = ("train", "dpo")
# "#   24 GB GPU: 46.39 GiB, does not fit (plan suggests --gradient_checkpointing true: 15.13 GiB, fits)"
MEMORY_LINE = re.compile(r"#\s+(?P<gib>24|80) GB GPU[^:]*: (?P<total>[\d.]+) GiB, (?P<verdict>fits|does not fit)"
                         r"(?: \(plan suggests (?P<change>.+): (?P<changed>[\d.]+) GiB, fits\))?$")


def _name(recipe: Path) -> str:
    return recipe.relative_to(ROOT).as_posix()


def header(recipe: Path) -> list[str]:
    """The comment lines the file opens with."""
    lines = recipe.read_text(encoding="utf-8").splitlines()
    return lines[:next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))]


def header_items(recipe: Path) -> list[tuple[str, Any]]:
    """In order: ("command", argv) for each `glmtune ...` line the header shows (indented, continued by a trailing
    backslash, split as a shell would), and ("memory", match) for each GPU memory line."""
    items: list[tuple[str, Any]] = []
    pending: str | None = None
    for line in header(recipe):
        if pending is None and not line.startswith("#   glmtune "):
            memory = MEMORY_LINE.match(line)
            if memory:
                items.append(("memory", memory))
            continue
        pending = line[1:] if pending is None else f"{pending} {line[1:]}"
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        items.append(("command", shlex.split(pending, comments=True)))
        pending = None
    assert pending is None, f"{_name(recipe)}: a command line ends with a backslash and nothing follows"
    return items


def commands(recipe: Path, verb: str | None = None) -> list[list[str]]:
    return [argv for kind, argv in header_items(recipe) if kind == "command" and verb in (None, argv[1])]


def parse_command(argv: list[str]) -> tuple[Any, ...]:
    """argv ("glmtune", VERB, ...) through VERB's own dataclasses and defaults, as its main() parses them, from the
    repository root (where the headers' relative paths start); nothing runs."""
    from glmtune.config import parse_arguments

    verb, args = argv[1], argv[2:]
    with contextlib.chdir(ROOT):
        if verb == "train":
            from transformers import TrainingArguments

            from glmtune.commands.train import OWN_ARGUMENTS, TRAIN_DEFAULTS

            return parse_arguments("glmtune train", [*OWN_ARGUMENTS, TrainingArguments], args,
                                   {**TRAIN_DEFAULTS, "dataloader_pin_memory": False})
        if verb == "dpo":
            from glmtune.commands.dpo import DPO_DEFAULTS, OWN_ARGUMENTS
            from glmtune.train.dpo import GlmtuneDPOConfig

            return parse_arguments("glmtune dpo", [*OWN_ARGUMENTS, GlmtuneDPOConfig], args,
                                   {**DPO_DEFAULTS, "dataloader_pin_memory": False})
        if verb == "prepare":
            from glmtune.arguments import ModelArguments, PrepareArguments

            return parse_arguments("glmtune prepare", [ModelArguments, PrepareArguments], args)
        if verb == "plan":
            from glmtune.commands.plan import PLAN_DEFAULTS, PlanArguments

            return parse_arguments("glmtune plan", [PlanArguments], args, PLAN_DEFAULTS)
    raise AssertionError(f"no parser here for `glmtune {verb}`")


def values(instances: tuple[Any, ...]) -> dict[str, Any]:
    """Every option's value, over all the command's dataclasses."""
    out: dict[str, Any] = {}
    for instance in instances:
        out.update({f.name: getattr(instance, f.name) for f in dataclasses.fields(instance)})
    return out


def run_command(recipe: Path) -> list[str]:
    """The header's `glmtune train|dpo --config RECIPE` line."""
    found = [argv for argv in commands(recipe) if argv[1] in RECIPE_VERBS and argv[2:4] == ["--config", _name(recipe)]]
    assert len(found) == 1, f"{_name(recipe)}: the header shows no single `glmtune train|dpo --config {_name(recipe)}`"
    return found[0]


@functools.cache
def resolved(recipe: Path) -> dict[str, Any]:
    """The options the recipe's run command runs with (parsed once per session: DPO's parser imports TRL)."""
    argv = run_command(recipe)
    return values(parse_command(argv)) | {"verb": argv[1]}


def prepare_step(recipe: Path) -> dict[str, Any]:
    """The header's prepare command that writes the dataset the recipe trains on."""
    dataset = resolved(recipe)["dataset_path"]
    found = [values(parse_command(argv)) for argv in commands(recipe, "prepare")]
    found = [step for step in found if step["save_path"] == dataset]
    assert len(found) == 1, f"{_name(recipe)}: no prepare command in the header writes {dataset}"
    return found[0]


def test_every_family_has_its_recipes():
    families = sorted(d.name for d in EXAMPLES.iterdir() if d.is_dir() and d.name not in ("accelerate", "deepspeed"))
    assert families == FAMILIES
    for family in FAMILIES:
        assert sorted(p.name for p in (EXAMPLES / family).glob("*.yaml")) == FAMILY_METHODS[family]


@pytest.mark.parametrize("recipe", RECIPES, ids=_name)
def test_recipe_opens_with_the_command_that_runs_it(recipe):
    from glmtune.cli import COMMANDS

    run_command(recipe)
    for argv in commands(recipe):
        assert argv[1] in COMMANDS, f"{_name(recipe)}: `glmtune {argv[1]}` is no command"


@pytest.mark.parametrize("recipe", RECIPES, ids=_name)
def test_recipe_parses_with_its_commands_options_and_every_key_takes_effect(recipe):
    options = resolved(recipe)
    written = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    assert {key: options[key] for key in written} == written


@pytest.mark.parametrize("recipe", RECIPES, ids=_name)
def test_every_command_in_the_header_parses(recipe):
    for argv in commands(recipe):
        if argv[1] in ("prepare", "plan", *RECIPE_VERBS):
            parse_command(argv)  # raises on an unknown flag or a bad value


@pytest.mark.parametrize("text, complaint", [
    ("lora_rnak: 16\n", "unknown key 'lora_rnak' (did you mean 'lora_rank'?)"),
    ("lora_rank: many\n", "key 'lora_rank': expected int, found 'many'"),
    ("precision: fp8\n", "--precision fp8 is unknown"),
    ("learning_rate: fast\n", "key 'learning_rate': expected float"),
])
def test_the_recipe_parser_refuses_unknown_keys_and_bad_values(tmp_path, text, complaint):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text((EXAMPLES / "chatglm3-6b" / "lora.yaml").read_text(encoding="utf-8") + text, encoding="utf-8")
    with pytest.raises(UserError) as caught:
        parse_command(["glmtune", "train", "--config", str(recipe)])
    assert complaint in caught.value.render()


@pytest.mark.parametrize("recipe", FAMILY_RECIPES, ids=_name)
def test_recipe_trains_on_the_dataset_its_prepare_step_writes_with_the_same_model(recipe):
    # train and dpo refuse a dataset tokenized with another model's tokenizer.
    assert prepare_step(recipe)["model"] == resolved(recipe)["model"]


@pytest.mark.parametrize("recipe", RECIPES, ids=_name)
def test_the_data_files_the_header_prepares_exist(recipe):
    for argv in commands(recipe, "prepare"):
        for path in values(parse_command(argv))["data"]:
            if path.startswith("../shared/") and not SHARED.is_dir():
                pytest.skip(f"the shared folder {SHARED} is absent")
            assert (ROOT / path).is_file(), f"{_name(recipe)}: {path} does not exist"


@pytest.mark.parametrize("family", [family for family in FAMILIES if "dpo.yaml" in FAMILY_METHODS[family]])
def test_dpo_recipe_trains_the_lora_recipes_adapter_further(family):
    lora, dpo = resolved(EXAMPLES / family / "lora.yaml"), resolved(EXAMPLES / family / "dpo.yaml")
    assert dpo["peft_path"] == lora["output_dir"]
    assert dpo["model"] == lora["model"]
    assert dpo["reference"] == "start"


@pytest.mark.parametrize("family", [family for family in FAMILIES if "qlora.yaml" in FAMILY_METHODS[family]])
def test_qlora_recipe_quantizes_a_model_glmtune_can_quantize(family):
    lora, qlora = resolved(EXAMPLES / family / "lora.yaml"), resolved(EXAMPLES / family / "qlora.yaml")
    assert qlora["quantization_bit"] == 4 and lora["quantization_bit"] is None
    converts = commands(EXAMPLES / family / "qlora.yaml", "convert")
    config = json.loads((CONFIGS / family / "config.json").read_text(encoding="utf-8"))
    if config["model_type"] != "chatglm":  # a native transformers checkpoint: quantized as it is
        assert qlora["model"] == lora["model"] and not converts
        return
    # THUDM's layout: glmtune refuses to quantize it and names `glmtune convert`; the recipe trains the converted
    # directory that its header's convert command writes from the LoRA recipe's model.
    from glmtune.models.loading import load_model

    with pytest.raises(UserError) as caught:
        load_model(str(CONFIGS / family), quantization_bit=4)
    assert "THUDM's layout" in caught.value.message and "glmtune convert" in caught.value.hint
    assert [argv[2:] for argv in converts] == [[lora["model"], qlora["model"]]]


def plan_runs(recipe: Path) -> list[tuple[list[str], list[re.Match]]]:
    """Each plan command of the header with the memory lines that follow it."""
    runs: list[tuple[list[str], list[re.Match]]] = []
    for kind, item in header_items(recipe):
        if kind == "command" and item[1] == "plan":
            runs.append((item, []))
        elif kind == "memory":
            assert runs, f"{_name(recipe)}: a memory line before any plan command"
            runs[-1][1].append(item)
    return runs


def _without_budget(args: list[str]) -> list[str]:
    """The plan flags but --device_memory_gib and its value (each memory line sets its own)."""
    if "--device_memory_gib" not in args:
        return args
    at = args.index("--device_memory_gib")
    return args[:at] + args[at + 2:]


@pytest.mark.parametrize("recipe", FAMILY_RECIPES, ids=_name)
def test_header_quotes_the_peak_memory_plan_prints_on_24_and_80_gb(recipe, cli):
    runs = plan_runs(recipe)
    assert runs and sorted(m["gib"] for m in runs[0][1]) == ["24", "80"], f"{_name(recipe)}: no 24 / 80 GB lines"
    for argv, lines in runs:
        assert lines, f"{_name(recipe)}: `{shlex.join(argv)}` quotes no result"
        flags = _without_budget(argv[2:])
        for line in lines:
            with contextlib.chdir(ROOT):
                result = cli("plan", *flags, "--device_memory_gib", line["gib"])
            assert result.code == 0, result.err
            assert re.search(r"total \(peak\)\s+([\d.]+) GiB", result.out)[1] == line["total"], shlex.join(argv)
            assert f"\n{line['verdict']}: {line['total']} GiB of {line['gib']}.00 GiB" in result.out
            if line["change"]:
                assert f"  {line['change']}: {line['changed']} GiB  <- fits" in result.out


@pytest.mark.parametrize("recipe", FAMILY_RECIPES, ids=_name)
def test_headers_first_plan_command_estimates_the_recipes_own_run(recipe):
    options = resolved(recipe)
    plan = values(parse_command(plan_runs(recipe)[0][0]))
    if options["verb"] == "dpo":
        # No DPO mode in plan: the same rows (chosen and rejected: two per pair; TRL computes their log-probabilities
        # in tiles, as a chunked loss), with the LoRA settings of the adapter it starts from (lora.yaml's, see
        # test_dpo_recipe_trains_the_lora_recipes_adapter_further).
        lora = resolved(recipe.parent / "lora.yaml")
        run = {"per_device_train_batch_size": 2 * options["per_device_train_batch_size"], "chunked_loss": True}
    else:
        lora = options
        run = {"per_device_train_batch_size": options["per_device_train_batch_size"],
               "chunked_loss": options["chunked_loss"]}
    expected = {"model": f"tests/data/configs/{recipe.parent.name}", "device": "cuda",
                "max_seq_length": prepare_step(recipe)["max_seq_length"], "precision": options["precision"],
                "quantization_bit": options["quantization_bit"],
                "gradient_checkpointing": bool(options["gradient_checkpointing"]),
                **run, **{key: lora[key] for key in ("lora_rank", "lora_dropout", "target_modules")}}
    assert {key: plan[key] for key in expected} == expected


# "| ChatGLM3-6B | [lora.yaml](chatglm3-6b/lora.yaml) | ... | 46.39 GiB | 15.13 GiB with `--gradient_...` | fits |"
TABLE_ROW = re.compile(r"\| \[\w+\.yaml\]\((?P<recipe>[^)]+)\) \|[^|]+\| (?P<total>[\d.]+) GiB \| (?P<on24>[^|]+) \| "
                       r"(?P<on80>[^|]+) \|$")


def test_examples_readme_table_quotes_each_recipes_header():
    rows = {m["recipe"]: m for line in (EXAMPLES / "README.md").read_text(encoding="utf-8").splitlines()
            if (m := TABLE_ROW.search(line))}
    assert sorted(rows) == sorted(p.relative_to(EXAMPLES).as_posix() for p in FAMILY_RECIPES)
    for name, row in rows.items():
        on24, on80 = sorted(plan_runs(EXAMPLES / name)[0][1], key=lambda m: m["gib"])
        cell24 = on24["verdict"] if on24["verdict"] == "fits" or not on24["change"] else \
            f"{on24['changed']} GiB with `{on24['change']}`"
        assert (row["total"], row["on24"].strip(), row["on80"].strip()) == (on24["total"], cell24, on80["verdict"])


@pytest.mark.parametrize("family", ["chatglm3-6b", "glm-4-9b-chat"])
def test_stored_model_shapes_are_the_published_configs_values(family):
    published = SHARED / "tokenizers" / family / "config.json"
    if not published.is_file():
        pytest.skip(f"{published} is absent")
    stored = json.loads((CONFIGS / family / "config.json").read_text(encoding="utf-8"))
    official = json.loads(published.read_text(encoding="utf-8"))
    assert {key: official.get(key) for key in stored} == stored


def test_chatglm3_recipes_run_as_their_headers_say(cli, tmp_path, monkeypatch, shared_dir):
    """lora.yaml, qlora.yaml (convert first), then dpo.yaml from lora's adapter: every glmtune command of the three
    headers as written, in order, from a directory of its own, on a small random checkpoint in THUDM's layout (the
    real tokenizer) standing in for THUDM/chatglm3-6b; one step a run."""
    from test_chatglm_pipeline import thudm_checkpoint

    hub_name = "THUDM/chatglm3-6b"
    model = thudm_checkpoint(tmp_path / "chatglm3-6b", shared_dir, "chatglm3", hidden=64)
    inputs = {"examples/": ROOT / "examples", "src/": ROOT / "src", "tests/": ROOT / "tests", "../shared/": SHARED}

    def here(arg: str) -> str:
        if arg == hub_name:
            return str(model)
        prefix = next((p for p in inputs if arg.startswith(p)), None)
        return str(inputs[prefix] / arg[len(prefix):]) if prefix else arg

    monkeypatch.chdir(tmp_path)  # the recipes' outputs (data/, models/, runs/) land here
    for method in ("lora", "qlora", "dpo"):
        recipe = EXAMPLES / "chatglm3-6b" / f"{method}.yaml"
        for argv in commands(recipe):
            args = [here(arg) for arg in argv[2:]]
            if argv[1] in RECIPE_VERBS:
                args += ["--max_steps", "1", "--gradient_accumulation_steps", "1"]
                # bf16 is emulated on CPUs without bf16 units: DPO's long pairs take a minute in it (bf16 does run
                # here: train's two recipes keep it).
                args += ["--precision", "fp32"] if argv[1] == "dpo" else []
                args += ["--model", str(model)] if resolved(recipe)["model"] == hub_name else []
            result = cli(argv[1], *args)
            assert result.code == 0, f"{shlex.join(argv)}\n{result.err[-3000:]}"
        run = tmp_path / resolved(recipe)["output_dir"]
        manifest = json.loads((run / "manifest.json").read_text(encoding="utf-8"))
        assert manifest["global_step"] == 1 and (run / "adapter_model.safetensors").is_file()
    assert manifest["start_adapter"] == "runs/chatglm3-6b/lora"
