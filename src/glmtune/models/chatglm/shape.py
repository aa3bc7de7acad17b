"""How `glmtune plan` reads a THUDM ChatGLM2/3 or GLM-4-9B-chat config.json: as the GlmForCausalLM config glmtune
converts it to (models/chatglm/convert.py), in transformers' standard field names."""

from __future__ import annotations

from typing import Any

from glmtune.plan.shape import require_positive

NATIVE_MODEL_TYPE = "glm"  # what the checkpoint loads as


def native_config(config: dict[str, Any], source: str) -> dict[str, Any]:
    """THUDM's field names -> GlmConfig's, with the dimensions plan reads (a UserError naming missing ones)."""
    hidden, layers, heads, ffn = require_positive(config, ["hidden_size", "num_layers", "num_attention_heads",
                                                           "ffn_hidden_size"], source)
    vocab = config.get("padded_vocab_size") or config.get("vocab_size")
    kv_heads = config["multi_query_group_num"] if config.get("multi_query_attention") else heads
    head_dim = config.get("kv_channels") or hidden // heads
    return {"model_type": NATIVE_MODEL_TYPE, "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
            "intermediate_size": ffn, "attention_bias": config.get("add_qkv_bias", True),
            "tie_word_embeddings": False}  # the official output_layer is its own matrix
