"""ChatGLM2-6B, ChatGLM3-6B and GLM-4-9B-chat (THUDM's `model_type: chatglm` checkpoints) as transformers'
own GlmForCausalLM: the config mapped, the fused query/key/value split, the rest renamed.

The three share one architecture: pre-norm RMSNorm blocks, grouped-query ("multi-query") attention with a
q/k/v bias, SwiGLU, rotary embeddings on the first half of each head with interleaved pairs, an untied output
layer. GlmForCausalLM is that architecture; only the names and the fused layout differ.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from glmtune.errors import UserError

# Official name (after "transformer.") -> GlmForCausalLM name.
TOP_LEVEL = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "encoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}
PER_LAYER = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",  # [gate; up], the order GlmMLP chunks it in
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
}
LAYER = re.compile(r"transformer\.encoder\.layers\.(\d+)\.(.+)")


def is_chatglm2_config(config: dict[str, Any]) -> bool:
    """ChatGLM2/3 and GLM-4 (not the first ChatGLM-6B, whose config has position_encoding_2d)."""
    return config.get("model_type") == "chatglm" and "multi_query_attention" in config


def rope_parameters(config: dict[str, Any], directory: Path | None = None) -> dict[str, Any]:
    """Rotary settings. Rotary on half of each head (the official RotaryEmbedding(head_dim // 2)).
    `rope_ratio` means two things: ChatGLM3-32K/128K and GLM-4 scale the base (10000 * rope_ratio), ChatGLM2-6B-32K
    interpolates positions (position / rope_ratio). The checkpoint's own modeling code tells which; without it, the
    name does."""
    ratio = config.get("rope_ratio", 1)
    base = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    if ratio == 1:
        return base
    code = directory / "modeling_chatglm.py" if directory is not None else None
    if code is not None and code.is_file():
        interpolates = re.search(r"arange\([^)]*\)\s*/\s*self\.rope_ratio", code.read_text(encoding="utf-8"))
    else:
        interpolates = "chatglm2" in str(config.get("_name_or_path", "")).lower()
    if interpolates:
        return {**base, "rope_type": "linear", "factor": float(ratio)}
    return {**base, "rope_theta": 10000.0 * ratio}


def glm_config(config: dict[str, Any], directory: Path | None = None) -> Any:
    from transformers import GlmConfig

    unsupported = {
        "rmsnorm": (True, "LayerNorm instead of RMSNorm"),
        "apply_residual_connection_post_layernorm": (False, "residuals taken after the norm"),
        "post_layer_norm": (True, "no final norm"),
        "add_bias_linear": (False, "biases on the dense layers"),
        "original_rope": (True, "the non-original rotary layout"),
    }
    for key, (expected, what) in unsupported.items():
        if config.get(key, expected) != expected:
            raise UserError(f"this ChatGLM variant ({key}={config[key]}: {what}) has no native conversion yet",
                            hint="pass --trust_remote_code to use its own code")
    heads = config["num_attention_heads"]
    head_dim = config.get("kv_channels") or config["hidden_size"] // heads
    kv_heads = config["multi_query_group_num"] if config.get("multi_query_attention") else heads
    return GlmConfig(
        vocab_size=config.get("padded_vocab_size") or config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["ffn_hidden_size"],
        num_hidden_layers=config["num_layers"],
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=config["layernorm_epsilon"],
        max_position_embeddings=config.get("seq_length", 2048),
        attention_bias=config.get("add_qkv_bias", False),
        tie_word_embeddings=config.get("tie_word_embeddings", False),
        rope_parameters=rope_parameters(config, directory),
        pad_token_id=config.get("pad_token_id"),
        eos_token_id=config.get("eos_token_id"),
        bos_token_id=None,
    )


def convert_state_dict(state: dict[str, Any], config: Any, grouped: bool) -> dict[str, Any]:
    """Official tensors -> GlmForCausalLM tensors. `grouped`: multi_query_attention (q, then k, then v);
    otherwise the fused rows are per head [q_h; k_h; v_h]."""
    out: dict[str, Any] = {}
    unknown = []
    for name, tensor in state.items():
        if name.endswith("rotary_pos_emb.inv_freq"):
            continue  # recomputed by the model from the config
        match = LAYER.fullmatch(name)
        if match:
            index, rest = match.groups()
            prefix = f"model.layers.{index}."
            if rest.startswith("self_attention.query_key_value."):
                kind = rest.rsplit(".", 1)[1]  # weight or bias
                for part, value in zip(("q_proj", "k_proj", "v_proj"), _split_qkv(tensor, config, grouped),
                                       strict=True):
                    out[f"{prefix}self_attn.{part}.{kind}"] = value
            elif rest in PER_LAYER:
                out[prefix + PER_LAYER[rest]] = tensor
            else:
                unknown.append(name)
        elif name.removeprefix("transformer.") in TOP_LEVEL:
            out[TOP_LEVEL[name.removeprefix("transformer.")]] = tensor
        else:
            unknown.append(name)
    if unknown:
        raise UserError("the checkpoint has parameters a ChatGLM2/3 or GLM-4 model doesn't", problems=unknown[:20],
                        hint="is it a P-Tuning (prefix encoder) or quantized checkpoint? pass --trust_remote_code")
    return out


def _split_qkv(tensor: Any, config: Any, grouped: bool) -> tuple[Any, Any, Any]:
    d, heads, kv_heads = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    if grouped:
        return tuple(tensor.split([heads * d, kv_heads * d, kv_heads * d], dim=0))
    per_head = tensor.reshape(heads, 3, d, *tensor.shape[1:])  # (heads, [q k v], head_dim, ...)
    return tuple(per_head[:, i].reshape(heads * d, *tensor.shape[1:]) for i in range(3))


def load_chatglm2(directory: Path, config: dict[str, Any], dtype: Any) -> Any:
    """A GlmForCausalLM with the checkpoint's weights, built without a second copy of them in memory."""
    import torch
    from transformers import GenerationConfig, GlmForCausalLM

    from glmtune.models.checkpoint import read_state_dict

    glm = glm_config(config, directory)
    state = convert_state_dict(read_state_dict(directory), glm, grouped=bool(config.get("multi_query_attention")))
    with torch.device("meta"):
        model = GlmForCausalLM(glm)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise UserError(f"{directory}: the weights don't fit the config ({str(e).splitlines()[0]})") from None
    model.tie_weights()
    model = model.to(dtype).eval()
    # Non-persistent buffers (the rotary frequencies) were left on the meta device: compute them for real, after
    # the cast, in fp32 as from_pretrained keeps them (in bf16 they would move the logits by up to 0.2).
    model.model.rotary_emb = type(model.model.rotary_emb)(config=glm)
    model.config._name_or_path = str(directory)
    model.name_or_path = str(directory)
    model.generation_config = GenerationConfig(eos_token_id=glm.eos_token_id, pad_token_id=glm.pad_token_id)
    return model
