"""The model family registry: every family is recognised from a checkpoint as published, the rest falls back to "any
other causal LM", a new family is one entry, and no module outside the registry branches on model types."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest

from glmtune.models import families
from glmtune.models.families import (
    ANY_CAUSAL_LM,
    CHATGLM2,
    CHATGLM3,
    CHATGLM6B,
    CHATGLM6B_CONVERTED,
    FAMILIES,
    GLM,
    GLM4,
    GLM4_9B_CHAT,
    GLM4_MOE,
    LLAMA_STYLE,
    THUDM_GLM,
    Converter,
    Family,
    family_of,
    family_of_model,
    family_of_source,
)

SRC = Path(__file__).resolve().parents[1] / "src" / "glmtune"
# The registry and the families' own modules are where model types may be named.
FAMILY_MODULES = [SRC / "models" / "families.py", SRC / "models" / "chatglm", SRC / "models" / "chatglm6b"]
GLM_MODEL_TYPES = {"chatglm", "chatglm6b", "glm", "glm4", "glm4_moe"}


@pytest.mark.parametrize("tokenizer_dir, family", [
    ("chatglm-6b", CHATGLM6B), ("chatglm2-6b", CHATGLM2), ("chatglm3-6b", CHATGLM3), ("glm-4-9b-chat", GLM4_9B_CHAT),
])
def test_thudm_checkpoints_are_told_apart_by_their_config_and_tokenizer_files(shared_dir, tokenizer_dir, family):
    assert family_of_source(str(shared_dir / "tokenizers" / tokenizer_dir)) is family


@pytest.mark.parametrize("tokenizer_dir, family", [
    ("chatglm-6b", CHATGLM6B), ("chatglm2-6b", CHATGLM2), ("chatglm3-6b", CHATGLM3), ("glm-4-9b-chat", GLM4_9B_CHAT),
])
def test_a_tokenizer_directory_without_config_is_its_family(shared_dir, tmp_path, tokenizer_dir, family):
    for file in (shared_dir / "tokenizers" / tokenizer_dir).iterdir():
        if file.name != "config.json":
            shutil.copy(file, tmp_path / file.name)
    assert family_of_source(str(tmp_path)) is family


@pytest.mark.parametrize("fixture", ["v2", "v3", "glm4"])
def test_a_thudm_glm_config_without_its_tokenizer_still_loads_converted(shared_dir, fixture):
    family = family_of_source(str(shared_dir / "fixtures" / "chatglm" / fixture))
    assert family.converter is THUDM_GLM and family.quantization_bits == ()


def test_the_first_chatglm_is_recognised_as_published_and_as_glmtune_writes_it(shared_dir):
    official = json.loads((shared_dir / "fixtures" / "chatglm" / "v1" / "config.json").read_text())
    assert family_of(official) is CHATGLM6B and CHATGLM6B.converter is not None
    assert family_of({**official, "model_type": "chatglm6b"}) is CHATGLM6B_CONVERTED
    assert CHATGLM6B_CONVERTED.converter is None  # glmtune's class, registered with the Auto classes


def test_transformers_glm_classes_are_their_own_families(tiny_model):
    from transformers import Glm4Config, Glm4MoeConfig

    assert family_of_source(str(tiny_model)) is GLM
    assert family_of(Glm4Config().to_dict()) is GLM4
    assert family_of(Glm4MoeConfig().to_dict()) is GLM4_MOE


def test_any_other_causal_lm_is_the_fallback():
    from transformers import LlamaConfig

    assert family_of(LlamaConfig().to_dict()) is LLAMA_STYLE
    assert family_of({"model_type": "t5"}) is family_of(None) is ANY_CAUSAL_LM
    assert FAMILIES[-1] is ANY_CAUSAL_LM
    assert (ANY_CAUSAL_LM.converter, ANY_CAUSAL_LM.tokenizer, ANY_CAUSAL_LM.lora_targets) == (None, None, "all-linear")
    assert not ANY_CAUSAL_LM.plain_causal
    # As for every family, the role tokens end a turn where the vocabulary has them (Phi-3 marks turns with <|user|>).
    assert ANY_CAUSAL_LM.end_of_turn == LLAMA_STYLE.end_of_turn == ("<|user|>", "<|observation|>")


def test_only_converted_layouts_refuse_quantization():
    for family in FAMILIES:
        assert (family.quantization_bits == ()) == (family.converter is not None), family.name


@pytest.mark.parametrize("fixture, family", [("v3", CHATGLM3), ("v1", CHATGLM6B)])
def test_a_converted_checkpoint_once_loaded_is_what_its_family_says(shared_dir, fixture, family):
    """The entry of a converted layout describes the model it becomes: the loaded model's family agrees on
    everything training reads."""
    from glmtune.models.loading import load_model

    model = load_model(str(shared_dir / "fixtures" / "chatglm" / fixture))
    loaded = family_of_model(model)
    assert loaded is not family and loaded.converter is None
    for field in ("lora_targets", "packing", "plain_causal", "end_of_turn"):
        assert getattr(loaded, field) == getattr(family, field), field


def test_a_new_family_is_one_entry(tmp_path, monkeypatch):
    from glmtune.errors import UserError
    from glmtune.models.loading import load_model
    from glmtune.models.lora import resolve_target_modules
    from glmtune.plan.shape import shape_from_config

    toy = Family("Toy", lambda config, directory: config.get("model_type") == "toy",
                 converter=Converter("Toy", lambda directory, config, dtype: ("built", config["width"])),
                 lora_targets=("mix",), shape=GLM.shape)
    monkeypatch.setattr(families, "FAMILIES", (toy, *FAMILIES))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "toy", "width": 3}))

    assert load_model(str(tmp_path)) == ("built", 3)
    assert resolve_target_modules("toy", None) == ["mix"]
    with pytest.raises(UserError, match="Toy checkpoint"):
        load_model(str(tmp_path), quantization_bit=4)
    glm = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
           "vocab_size": 512}
    assert shape_from_config({"model_type": "toy", **glm}).linears == shape_from_config(
        {"model_type": "glm", **glm}).linears


def family_branches(source: str) -> list[str]:
    """Where code decides by model type: a comparison or match on a model_type, or a GLM model type named."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare) and "model_type" in ast.unparse(node):
            found.append(ast.unparse(node))
        elif isinstance(node, ast.Match) and "model_type" in ast.unparse(node.subject):
            found.append(f"match {ast.unparse(node.subject)}")
        elif isinstance(node, ast.Constant) and node.value in GLM_MODEL_TYPES:
            found.append(repr(node.value))
    return found


def test_the_guard_sees_an_if_chain_on_model_types():
    assert family_branches("if config.model_type == 'llama':\n    pass")
    assert family_branches("if config.get('model_type') in TYPES:\n    pass")
    assert family_branches("TARGETS = {'glm4': ['q_proj']}")
    assert not family_branches("targets = family_of(config).lora_targets")


def test_no_module_outside_the_registry_branches_on_model_types():
    outside = [path for path in SRC.rglob("*.py")
               if not any(path == module or module in path.parents for module in FAMILY_MODULES)]
    assert len(outside) > 30  # the scan sees the package
    branches = {str(path.relative_to(SRC)): found for path in outside
                if (found := family_branches(path.read_text(encoding="utf-8")))}
    assert branches == {}, "ask glmtune.models.families instead"
