"""Several LoRA adapters behind one server (serve's --adapter NAME=PATH): their specs checked, each loaded onto the
one base model with peft under its name, and each served model name mapped to the adapter that answers it.

A request picks its adapter through peft's `adapter_names` (glmtune.inference.engine.generation_kwargs_for), not
`set_adapter`: the choice travels with the call instead of living in the model, so it holds however requests are
batched. peft mixes adapters that way only for LoRA on linear, embedding and conv layers, unmerged, without DoRA;
an adapter it cannot mix (DoRA, LoRA on a MoE's fused experts) is refused at start, and can be served alone with
--peft_path, which answers as today.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glmtune.artifacts import read_json_object
from glmtune.errors import UserError
from glmtune.inference.engine import BASE_ADAPTER
from glmtune.models.loading import first_line
from glmtune.serve.errors import APIError

log = logging.getLogger("glmtune.serve")
FORM = "--adapter NAME=PATH, e.g. --adapter support=runs/support (PATH: an adapter `glmtune train` wrote)"
PEFT_PATH_ADAPTER = "default"  # the name peft gives the one adapter PeftModel.from_pretrained loads (--peft_path)
NAME_SHOWN_CHARS = 100  # how much of an unknown model name an error repeats


@dataclass(frozen=True)
class AdapterSpec:
    name: str  # the model name requests ask for, and the adapter's name in peft
    path: Path


def parse_adapter_specs(specs: list[str]) -> list[AdapterSpec]:
    """The --adapter values as (name, directory) pairs.

    Raises:
        UserError: every value not of the form NAME=PATH, a name given twice, a PATH that is not an adapter
            directory; all of them in one message.
    """
    problems, parsed, seen = [], [], set()
    for spec in specs:
        name, equals, path = spec.partition("=")
        name, path = name.strip(), path.strip()
        if not (equals and name and path) or any(c.isspace() for c in name):
            problems.append(f"'{spec}' is not of the form NAME=PATH")
            continue
        if name == BASE_ADAPTER:
            problems.append(f"'{spec}': the name {BASE_ADAPTER} is peft's for the base model alone; choose another")
        elif name in seen:
            problems.append(f"'{spec}': the name '{name}' is given twice; each adapter needs its own")
        elif not (Path(path) / "adapter_config.json").is_file():
            reason = "does not exist" if not Path(path).exists() else "has no adapter_config.json"
            problems.append(f"'{spec}': {path} {reason}, so it is not a LoRA adapter directory")
        seen.add(name)
        parsed.append(AdapterSpec(name, Path(path)))
    if problems:
        raise UserError("--adapter: " + "; ".join(problems), hint=f"write {FORM}")
    return parsed


def load_adapters(engine: Any, specs: list[AdapterSpec]) -> None:
    """Load each adapter onto `engine.model` under its name (the first wraps a bare base in a PeftModel), checking
    that it fits the base (tokenizer, LoRA, shapes) and that peft can pick it per request.

    Raises:
        UserError: an adapter trained with another tokenizer, not LoRA (a prefix: beside --peft_path's prefix
            either), for another base (peft's shape mismatch,
            or modules the base lacks), a name already loaded, or one peft cannot mix in a batch.
    """
    from peft import PeftModel

    from glmtune.inference.engine import check_adapter_tokenizer
    from glmtune.models.prefix import PEFT_TYPE as PREFIX_TUNING
    from glmtune.models.prefix import is_prefix_model

    for spec in specs:
        where = f"--adapter {spec.name}={spec.path}"
        config = read_json_object(spec.path / "adapter_config.json", "adapter config")
        trained_on = config.get("base_model_name_or_path")
        if config.get("peft_type") == PREFIX_TUNING or is_prefix_model(engine.model):
            raise UserError(f"{where}: a P-Tuning v2 prefix (peft's PREFIX_TUNING) can't be picked per request "
                            "beside other adapters: peft mixes only LoRA adapters row by row in one batch",
                            hint="serve the prefix alone: glmtune serve --peft_path PREFIX_DIR (no --adapter)")
        if config.get("peft_type") != "LORA":
            raise UserError(f"{where} is a {config.get('peft_type')} adapter; serve loads LoRA adapters only")
        if spec.name in getattr(engine.model, "peft_config", {}):
            raise UserError(f"{where}: the name '{spec.name}' is taken by the --peft_path adapter",
                            hint="give this adapter another name")
        check_adapter_tokenizer(spec.path, engine.tokenizer, engine.model_name)
        try:
            if isinstance(engine.model, PeftModel):
                engine.model.load_adapter(str(spec.path), adapter_name=spec.name)
            else:
                engine.model = PeftModel.from_pretrained(engine.model, str(spec.path), adapter_name=spec.name)
        except (RuntimeError, ValueError, KeyError) as e:  # peft: size mismatch, target modules not found, ...
            raise UserError(f"{where} does not fit the model '{engine.model_name}': it was trained on "
                            f"'{trained_on}' ({first_line(e)})",
                            hint=f"serve it with --model {trained_on}, or leave it out") from None
        if trained_on and Path(str(trained_on)).name != Path(engine.model_name).name:
            log.warning(f"{where} was trained on '{trained_on}' and is served on '{engine.model_name}' "
                        "(their shapes and tokenizers agree)")
    engine.model.eval()  # peft's adapter_names refuses a model in training mode
    for name in [*engine.model.peft_config] if specs else []:
        check_mixable(engine, name)


def check_mixable(engine: Any, name: str) -> None:
    """One token through the model with peft's adapter_names: peft refuses there what it cannot mix per row."""
    import torch

    from glmtune.inference.engine import generation_kwargs_for

    token = torch.tensor([[engine.tokenizer.pad_token_id or 0]], device=engine.model.device)  # (1, 1)
    try:
        with torch.no_grad():
            engine.model(input_ids=token, **generation_kwargs_for([name]))
    except (ValueError, TypeError) as e:
        shown = "the --peft_path adapter" if name == PEFT_PATH_ADAPTER else f"--adapter {name}"
        raise UserError(f"{shown} cannot be picked per request: {first_line(e)}",
                        hint="peft mixes adapters only for LoRA on linear layers without DoRA; serve this adapter "
                             "alone, with --peft_path and no --adapter") from None


@dataclass(frozen=True)
class ServedModels:
    """The names /v1/models lists, each with the adapter that answers it: its peft name, BASE_ADAPTER for the base
    alone, or None for the model as loaded (a server without --adapter, as before)."""

    adapters: dict[str, str | None]

    @property
    def names(self) -> list[str]:
        return list(self.adapters)

    def adapter_for(self, name: str) -> str | None:
        """The adapter that answers `name`; an unknown name is a 404 in OpenAI's shape."""
        if name not in self.adapters:
            shown = name if len(name) <= NAME_SHOWN_CHARS else f"{name[:NAME_SHOWN_CHARS]}..."
            served = ", ".join(f"'{n}'" for n in self.adapters)
            raise APIError(404, f"the model '{shown}' does not exist: this server serves {served}", param="model",
                           code="model_not_found")
        return self.adapters[name]


def served_models(name: str, base_name: str, peft_path: bool, specs: list[AdapterSpec]) -> ServedModels:
    """What each served name answers with.

    Without --adapter, `name` answers with the model as loaded (base, or base + --peft_path): serve as before. With
    --adapter, every name answers with exactly one adapter or none: `name` with the --peft_path adapter if there is
    one, else with the base; the base alone is then served under `base_name`; each --adapter under its NAME.

    Raises:
        UserError: two served models would share a name.
    """
    if not specs:
        return ServedModels({name: None})
    models: dict[str, str | None] = {name: PEFT_PATH_ADAPTER if peft_path else BASE_ADAPTER}
    if peft_path:
        if base_name == name:
            raise UserError(f"--served_model_name '{name}' is the base model's name, which serves the base alone "
                            "when --adapter is given", hint="name the --peft_path adapter otherwise")
        models[base_name] = BASE_ADAPTER
    for spec in specs:
        if spec.name in models:
            raise UserError(f"--adapter {spec.name}={spec.path}: the name '{spec.name}' is already served (the base "
                            "model, or the --peft_path adapter)", hint="give this adapter another name")
        models[spec.name] = spec.name
    return ServedModels(models)
