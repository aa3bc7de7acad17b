"""Which layers LoRA adapts: the user's choice, or the model family's default (glmtune.models.families)."""

from __future__ import annotations

from typing import Any

from glmtune.models.families import family_of


def resolve_target_modules(model_type: str, requested: str | None) -> Any:
    """The `target_modules` to give peft's LoraConfig.

    Args:
        model_type: the loaded model's config.model_type, whose family gives the default.
        requested: --lora_target: a comma-separated list of module names, "all-linear", or None for the default.
    Returns:
        "all-linear", or a list of module names.
    """
    if requested:
        if requested == "all-linear":
            return requested
        return [name.strip() for name in requested.split(",") if name.strip()]
    targets = family_of({"model_type": model_type}).lora_targets
    return targets if isinstance(targets, str) else list(targets)


def base_model(model: Any) -> Any:
    """The model under a PEFT wrapper (the model itself when there is none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def resolve_target_parameters(model_type: str, requested_modules: str | None) -> list[str]:
    """The `target_parameters` to give peft's LoraConfig: the family's (a mixture of experts' fused expert tensors
    and its MLP weights), or none when the user named the modules (--target_modules wins)."""
    if requested_modules:
        return []
    return list(family_of({"model_type": model_type}).lora_parameters)


def router_module(model_type: str) -> str | None:
    """The name (suffix) of a mixture of experts' router module, None for a model glmtune knows no router of."""
    return family_of({"model_type": model_type}).router
