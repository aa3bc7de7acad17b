"""How `glmtune plan` reads the first ChatGLM-6B's config.json (THUDM's, or the one `glmtune convert` writes)."""

from __future__ import annotations

from typing import Any

from glmtune.plan.shape import Linear, ModelShape, require_positive

MODEL_TYPE = "chatglm6b"  # glmtune's own class (models/chatglm6b/configuration.py), what both load as


def chatglm6b_shape(config: dict[str, Any], source: str = "config.json") -> ModelShape:
    """LayerNorm, a fused query_key_value, a GELU MLP, every linear with a bias, and the output layer tied to the
    word embeddings (glmtune.models.chatglm6b.modeling)."""
    hidden, layers, heads = require_positive(config, ["hidden_size", "num_layers", "num_attention_heads"], source)
    inner = config.get("inner_hidden_size") or 4 * hidden
    vocab = require_positive(config, ["vocab_size"], source)[0]
    linears = (Linear("query_key_value", hidden, 3 * hidden, True, "attn_in"),
               Linear("dense", hidden, hidden, True, "attn_out"),
               Linear("dense_h_to_4h", hidden, inner, True, "mlp_in"),
               Linear("dense_4h_to_h", inner, hidden, True, "mlp_act"))
    return ModelShape(MODEL_TYPE, vocab, hidden, layers, heads, heads, hidden // heads, inner, gated_mlp=False,
                      norms_per_layer=2, norm_bias=True, tie_embeddings=config.get("tie_word_embeddings", True),
                      linears=linears)
