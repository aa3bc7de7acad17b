"""Prefixes (P-Tuning v2, peft's PREFIX_TUNING) on a model: which models can take one, telling a prefix adapter
apart, and generation that starts from the prefix (used by train/ptuning.py and by the inference engine).

The prefix reaches the model as a pre-filled cache, so it works for a model whose cache is transformers' plain
DynamicCache (one DynamicLayer per layer): transformers' own classes, the converted ChatGLM2/3 and GLM-4 among
them, and glmtune's ChatGLM-6B (`accepts_prefix_cache`: its two-dimensional positions come from the ids and ignore
the prefix, as in THUDM's ptuning). Remote code, and models with sliding-window or otherwise special cache layers,
are refused, by name.

Positions: transformers' classes number the prompt from the prefix's length on (the cache's length, peft's
convention, in training and in generation alike); ChatGLM-6B numbers it from 0, as THUDM's code does. Either way
training and generation agree. THUDM's prefix (`transformer.prefix_encoder.embedding.weight`, (pre_seq_len,
2 * layers * hidden), keys then values per layer) has the layout of peft's `prompt_encoder.default.embedding.weight`.

The gap filled (enable_prefix_generation): peft 0.21 hands the prefix to generate() as `past_key_values`, and
transformers 5.24's generate() passes the model its own, empty `cache` instead, which wins: the answers would be
the base model's, silently (measured: generated scores equal the base's to 1e-6).
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import TYPE_CHECKING, Any

from glmtune.artifacts import read_json_object
from glmtune.errors import UserError
from glmtune.models.lora import base_model

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

PEFT_TYPE = "PREFIX_TUNING"


def prefix_problem(model: PreTrainedModel) -> str | None:
    """Why a prefix can't be fed to this model as a cache, or None when it can."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    base = base_model(model)
    own_class = getattr(base, "accepts_prefix_cache", False)  # glmtune's ChatGLM-6B: a DynamicCache, own positions
    if not (own_class or type(base).__module__.startswith("transformers.models.")):
        return "its class is not one of transformers' (its cache format is its own)"
    try:
        cache = DynamicCache(config=base.config)
    except Exception as e:  # a config the cache can't read: no prefix layout to rely on
        return f"transformers can't build its cache ({type(e).__name__})"
    if not all(type(layer) is DynamicLayer for layer in cache.layers):
        return "its cache has sliding-window or other special layers, which a prefix can't be written into"
    return None


def check_prefix_support(model: PreTrainedModel, model_name: str) -> None:
    """Raises UserError, naming the family, for a model P-Tuning v2 can't train or answer with here."""
    from glmtune.models.families import family_of_model

    problem = prefix_problem(model)
    if problem is not None:
        family = family_of_model(base_model(model)).name
        raise UserError(f"--finetuning_type ptuning can't be used with '{model_name}' ({family}): {problem}",
                        hint="use --finetuning_type lora; P-Tuning v2 works with transformers' own classes "
                             "(GLM-4, ChatGLM2/3 and GLM-4-9B-chat converted, Llama-style models) and ChatGLM-6B")


def is_prefix_model(model: Any) -> bool:
    """A peft model whose active adapter is a prefix (prompt learning): no LoRA layers, a cache to start from."""
    config = getattr(model, "active_peft_config", None)
    return config is not None and getattr(config, "is_prompt_learning", False)


def is_prefix_adapter(path: Path) -> bool:
    """An adapter directory holding a prefix (peft's PREFIX_TUNING) rather than LoRA weights."""
    config = path / "adapter_config.json"
    return config.is_file() and read_json_object(config, "adapter config").get("peft_type") == PEFT_TYPE


def enable_prefix_generation(model: PeftModel) -> None:
    """Make `model.generate` start from the prefix: the base model's generate() with the prefix as its pre-filled
    cache and the attention mask widened over it. The prompt's positions then start after the prefix, as in
    training (peft's forward passes the prefix as the cache too). A model without a prefix is left as it is."""
    if not is_prefix_model(model):
        return
    check_prefix_support(model, str(getattr(model.active_peft_config, "base_model_name_or_path", "the model")))
    model.generate = types.MethodType(_generate_from_prefix, model)


def _generate_from_prefix(self: PeftModel, input_ids: Any = None, attention_mask: Any = None, **kwargs: Any) -> Any:
    import torch

    kwargs.pop("adapter_names", None)  # one prefix per model: nothing to choose per row
    batch = input_ids.shape[0]
    virtual = self.active_peft_config.num_virtual_tokens
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    prefix_mask = attention_mask.new_ones(batch, virtual)
    with torch.no_grad():
        cache = self.get_prompt(batch)  # DynamicCache, each layer (batch, kv_heads, virtual, head_dim)
    return self.get_base_model().generate(input_ids=input_ids,
                                          attention_mask=torch.cat([prefix_mask, attention_mask], dim=1),
                                          cache=cache, **kwargs)


def refuse_prefix_merge(peft_path: Path) -> None:
    """`merge` folds LoRA's BA into the weights; a prefix is extra keys and values, nothing a weight can absorb.

    Raises:
        UserError: `peft_path` holds a P-Tuning v2 prefix.
    """
    if is_prefix_adapter(peft_path):
        raise UserError(f"{peft_path} is a P-Tuning v2 prefix (peft's PREFIX_TUNING): a prefix is extra keys and "
                        "values every layer attends to, not a change of weights, so it cannot be folded into the "
                        "model", hint=f"use it as it is: glmtune infer --peft_path {peft_path} (or chat, eval, serve)")
