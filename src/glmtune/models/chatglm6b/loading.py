"""Load a THUDM/chatglm-6b checkpoint directory as published (config.json with `model_type: chatglm`, eight
`.bin` shards with an index, remote-code .py files that are ignored) into glmtune's native class."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from glmtune.errors import UserError


def is_chatglm6b_config(config: dict[str, Any]) -> bool:
    """The first ChatGLM-6B as THUDM publishes it: the `chatglm` model type with its 2-D position flag (ChatGLM2/3
    and GLM-4 have multi_query_attention instead). A directory glmtune wrote says `chatglm6b` and loads through
    the Auto classes."""
    return config.get("model_type") == "chatglm" and "position_encoding_2d" in config


def load_chatglm6b(directory: Path, config: dict[str, Any], dtype: Any) -> Any:
    from glmtune.models.chatglm6b.configuration import config_from_official
    from glmtune.models.chatglm6b.modeling import ChatGlm6bForCausalLM

    try:
        native = config_from_official(config)
    except ValueError as e:  # quantized or P-Tuning checkpoints, impossible shapes
        raise UserError(f"{directory}: {e}") from None
    try:
        # from_pretrained reads .bin shards with weights_only=True, safetensors as they are, with or without index.
        model = ChatGlm6bForCausalLM.from_pretrained(str(directory), config=native, dtype=dtype)
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{directory}: the weights don't load into ChatGLM-6B ({str(e).splitlines()[0]})") from None
    return model.eval()
