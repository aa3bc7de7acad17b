"""Which layers LoRA adapts by default, per architecture."""

from __future__ import annotations

from typing import Any

# peft knows no default targets for glm/glm4 (LoraConfig(r=8) raises), so we name them. Every linear layer
# of the decoder: attention q/k/v/o and the fused MLP. Other architectures get peft's "all-linear".
DEFAULT_TARGETS: dict[str, list[str]] = {
    "glm": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"],
    "glm4": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"],
    # Attention only. peft 0.21 rewrites any gate_proj/up_proj/down_proj target of a transformers-5 MoE model into
    # an adapter on the fused routed experts and then adapts neither the dense layers' nor the shared experts' MLP
    # (peft issue #3711), so naming them would silently adapt something else than asked.
    "glm4_moe": ["q_proj", "k_proj", "v_proj", "o_proj"],
    # ChatGLM-6B: the fused attention projection, as THUDM's own LoRA recipes and the seed did.
    "chatglm6b": ["query_key_value"],
}


def resolve_target_modules(model_type: str, requested: str | None) -> Any:
    """`requested` is a comma-separated list of module names, "all-linear", or None for the default."""
    if requested:
        if requested == "all-linear":
            return requested
        return [name.strip() for name in requested.split(",") if name.strip()]
    return DEFAULT_TARGETS.get(model_type, "all-linear")


def base_model(model: Any) -> Any:
    """The model under a PEFT wrapper (the model itself when there is none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
