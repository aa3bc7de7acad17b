"""A decoder's dimensions from its config.json alone, and the parameter counts that follow from them.

The gap this fills: transformers can count parameters only by building the model (or its meta-device skeleton,
which needs torch and the model class); `glmtune plan` answers from the JSON in milliseconds, and also reads
THUDM's `model_type: chatglm` configs, which transformers has no class for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from glmtune.errors import UserError

# Decoders laid out like Llama (separate gate/up/down projections, pre-norm RMSNorm) that are read natively.
LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3", "gemma", "olmo", "granite"}
SUPPORTED = ["chatglm (THUDM ChatGLM-6B, ChatGLM2/3, GLM-4)", "glm", "glm4", "glm4_moe", *sorted(LLAMA_LIKE)]


@dataclass(frozen=True)
class Linear:
    """One linear layer of a decoder block. `feeds_from` names the tensor it reads: layers reading the same tensor
    share it (q/k/v read the normed input), which decides what backward has to keep."""

    name: str
    d_in: int
    d_out: int
    bias: bool
    feeds_from: str
    dense_layers_only: bool = False  # MoE models: the dense MLP, present in the first dense layers only


@dataclass(frozen=True)
class ModelShape:
    model_type: str  # the architecture glmtune trains: THUDM ChatGLM2/3/GLM-4 configs become "glm"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    gated_mlp: bool  # SwiGLU (gate and up) rather than a plain GELU MLP
    norms_per_layer: int  # GLM-4-0414 (glm4) has two more than the usual two
    norm_bias: bool  # LayerNorm (ChatGLM-6B) rather than RMSNorm
    tie_embeddings: bool
    linears: tuple[Linear, ...]
    extra_layer_params: int = 0  # MoE: routed experts, router and shared experts of one MoE layer
    moe_layers: int = 0
    moe_active_intermediate: int = 0  # MoE: intermediate width a token passes through (top-k + shared experts)
    notes: tuple[str, ...] = field(default=())

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim


def shape_from_config(config: dict[str, Any], source: str = "config.json") -> ModelShape:
    """Read a model's config.json; a UserError naming the missing fields when it isn't a decoder we know."""
    model_type = config.get("model_type")
    if model_type == "chatglm" and "position_encoding_2d" in config:
        return _chatglm6b(config, source)
    if model_type == "chatglm":
        return _chatglm2(config, source)
    if model_type in ("glm", "glm4", "glm4_moe", "chatglm6b") or model_type in LLAMA_LIKE:
        if model_type == "chatglm6b":  # a directory `glmtune convert` wrote: THUDM's field names kept
            return _chatglm6b(config, source)
        return _native(config, model_type, source)
    raise UserError(f"{source}: model_type {model_type!r} is not one `glmtune plan` can estimate",
                    hint=f"supported: {', '.join(SUPPORTED)}")


def _require(config: dict[str, Any], keys: list[str], source: str) -> list[Any]:
    missing = [k for k in keys if not isinstance(config.get(k), int) or config[k] <= 0]
    if missing:
        raise UserError(f"{source}: expected positive integers for {', '.join(missing)} "
                        f"(model_type {config.get('model_type')!r})", hint="is this the model's own config.json?")
    return [config[k] for k in keys]


def _chatglm2(config: dict[str, Any], source: str) -> ModelShape:
    """THUDM ChatGLM2/3 and GLM-4-9B-chat: GlmForCausalLM under other names (glmtune converts it on load)."""
    hidden, layers, heads, ffn = _require(config, ["hidden_size", "num_layers", "num_attention_heads",
                                                   "ffn_hidden_size"], source)
    vocab = config.get("padded_vocab_size") or config.get("vocab_size")
    kv_heads = config["multi_query_group_num"] if config.get("multi_query_attention") else heads
    head_dim = config.get("kv_channels") or hidden // heads
    native = {"model_type": "glm", "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
              "intermediate_size": ffn, "attention_bias": config.get("add_qkv_bias", True),
              "tie_word_embeddings": False}  # the official output_layer is its own matrix
    return _native(native, "glm", source)


def _chatglm6b(config: dict[str, Any], source: str) -> ModelShape:
    """The first ChatGLM-6B: LayerNorm, a fused query_key_value, a GELU MLP, every linear with a bias, and the
    output layer tied to the word embeddings (glmtune.models.chatglm6b.modeling)."""
    hidden, layers, heads = _require(config, ["hidden_size", "num_layers", "num_attention_heads"], source)
    inner = config.get("inner_hidden_size") or 4 * hidden
    vocab = _require(config, ["vocab_size"], source)[0]
    linears = (Linear("query_key_value", hidden, 3 * hidden, True, "attn_in"),
               Linear("dense", hidden, hidden, True, "attn_out"),
               Linear("dense_h_to_4h", hidden, inner, True, "mlp_in"),
               Linear("dense_4h_to_h", inner, hidden, True, "mlp_act"))
    return ModelShape("chatglm6b", vocab, hidden, layers, heads, heads, hidden // heads, inner, gated_mlp=False,
                      norms_per_layer=2, norm_bias=True, tie_embeddings=config.get("tie_word_embeddings", True),
                      linears=linears)


def _native(config: dict[str, Any], model_type: str, source: str) -> ModelShape:
    hidden, layers, heads, vocab = _require(config, ["hidden_size", "num_hidden_layers", "num_attention_heads",
                                                     "vocab_size"], source)
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    inter = _require(config, ["intermediate_size"], source)[0]
    glm = model_type in ("glm", "glm4", "glm4_moe")
    # glm/glm4 default to a q/k/v bias (GlmConfig.attention_bias=True); llama-likes to none, qwen2 always has one.
    qkv_bias = config.get("attention_bias", model_type in ("glm", "glm4")) or model_type == "qwen2"
    o_bias = not glm and model_type != "qwen2" and bool(config.get("attention_bias"))  # llama: one flag for all
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    attention = [Linear("q_proj", hidden, q_dim, qkv_bias, "attn_in"),
                 Linear("k_proj", hidden, kv_dim, qkv_bias, "attn_in"),
                 Linear("v_proj", hidden, kv_dim, qkv_bias, "attn_in"),
                 Linear("o_proj", q_dim, hidden, o_bias, "attn_out")]
    if model_type in ("glm", "glm4"):
        mlp = [Linear("gate_up_proj", hidden, 2 * inter, False, "mlp_in"),
               Linear("down_proj", inter, hidden, False, "mlp_act")]
    else:
        only_dense = model_type == "glm4_moe"
        mlp = [Linear("gate_proj", hidden, inter, False, "mlp_in", only_dense),
               Linear("up_proj", hidden, inter, False, "mlp_in", only_dense),
               Linear("down_proj", inter, hidden, False, "mlp_act", only_dense)]
    notes: list[str] = []
    moe_layers = extra = active = 0
    if model_type == "glm4_moe":
        experts, top_k, moe_inter = _require(config, ["n_routed_experts", "num_experts_per_tok",
                                                      "moe_intermediate_size"], source)
        shared = config.get("n_shared_experts") or 0
        moe_layers = layers - min(layers, config.get("first_k_dense_replace") or 0)
        # Fused routed experts (gate_up and down per expert), the router's weight (its correction bias is a buffer),
        # and the shared experts' gate/up/down MLP (transformers' Glm4MoeMoE).
        extra = experts * 3 * hidden * moe_inter + experts * hidden + 3 * hidden * moe_inter * shared
        active = (top_k + shared) * moe_inter
        notes.append("MoE: activations assume each token's top-k experts (dense matmuls per expert); "
                     "the next-token-prediction layers of the checkpoint are not loaded by transformers")
    if model_type in LLAMA_LIKE and model_type not in ("llama", "qwen2", "mistral"):
        notes.append(f"{model_type} is estimated as a Llama-like decoder: its extra norms or biases are ignored")
    return ModelShape(model_type, vocab, hidden, layers, heads, kv_heads, head_dim, inter, gated_mlp=True,
                      norms_per_layer=4 if model_type == "glm4" else 2, norm_bias=False,
                      tie_embeddings=bool(config.get("tie_word_embeddings", False)),
                      linears=tuple(attention + mlp), extra_layer_params=extra, moe_layers=moe_layers,
                      moe_active_intermediate=active, notes=tuple(notes))


def layer_linears(shape: ModelShape, moe: bool) -> list[Linear]:
    """The linear layers of one decoder layer (an MoE layer has no dense MLP: its experts are counted apart)."""
    return [lin for lin in shape.linears if not (moe and lin.dense_layers_only)]


def parameter_count(shape: ModelShape) -> int:
    """Every parameter of the causal LM, as `sum(p.numel() for p in model.parameters())` counts them."""
    norm = shape.hidden_size * (2 if shape.norm_bias else 1)
    total = 0
    for layer in range(shape.num_layers):
        moe = layer >= shape.num_layers - shape.moe_layers
        total += sum(lin.d_in * lin.d_out + (lin.d_out if lin.bias else 0) for lin in layer_linears(shape, moe))
        total += shape.norms_per_layer * norm + (shape.extra_layer_params if moe else 0)
    embeddings = shape.vocab_size * shape.hidden_size
    return total + embeddings * (1 if shape.tie_embeddings else 2) + norm  # + the final norm


def resolve_targets(shape: ModelShape, requested: str | None) -> list[Linear]:
    """The linear layers LoRA adapts, with glmtune train's per-architecture defaults (glmtune.models.lora)."""
    from glmtune.models.lora import resolve_target_modules

    targets = resolve_target_modules(shape.model_type, requested)
    if targets == "all-linear":  # peft: every linear layer of the decoder, never the output layer
        return list(shape.linears)
    names = {lin.name for lin in shape.linears}
    unknown = [t for t in targets if t.rsplit(".", 1)[-1] not in names]
    if unknown:
        raise UserError(f"--target_modules {','.join(unknown)}: no such linear layer in a {shape.model_type} decoder",
                        hint=f"choose from {', '.join(sorted(names))} or all-linear")
    wanted = {t.rsplit(".", 1)[-1] for t in targets}
    return [lin for lin in shape.linears if lin.name in wanted]


def lora_parameter_count(shape: ModelShape, targets: list[Linear], rank: int) -> int:
    """LoRA's A (rank x d_in) and B (d_out x rank) on every adapted linear of every layer."""
    total = 0
    for layer in range(shape.num_layers):
        moe = layer >= shape.num_layers - shape.moe_layers
        total += sum(rank * (lin.d_in + lin.d_out) for lin in targets if not (moe and lin.dense_layers_only))
    return total
