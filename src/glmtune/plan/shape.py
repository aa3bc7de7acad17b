"""A decoder's dimensions from its config.json alone, and the parameter counts that follow from them.

The gap this fills: transformers can count parameters only by building the model (or its meta-device skeleton,
which needs torch and the model class); `glmtune plan` answers from the JSON in milliseconds, and also reads
THUDM's ChatGLM configs, which transformers has no class for. Which reader a config gets is its family's
(glmtune.models.families); the readers of transformers' own decoders are `Decoder`s.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from glmtune.errors import UserError


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
    moe_layers_only: bool = False  # MoE models: the routed and shared experts, present in the MoE layers only
    copies: int = 1  # the routed experts: one fused tensor holding this layer once per expert
    # Adapted as a parameter (peft's target_parameters, lora.ParamWrapper): each forward materialises the adapted
    # weight W + BA, rather than running A and B on the layer's input.
    as_parameter: bool = False

    @property
    def weights(self) -> int:
        return self.d_in * self.d_out * self.copies


@dataclass(frozen=True)
class ModelShape:
    model_type: str  # the architecture glmtune trains: THUDM ChatGLM2/3/GLM-4 configs read as the GLM they load as
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
    extra_layer_params: int = 0  # MoE: the router of one MoE layer (its experts are linears)
    moe_layers: int = 0
    moe_top_k: int = 0  # MoE: routed experts a token passes through
    moe_active_intermediate: int = 0  # MoE: intermediate width a token passes through (top-k + shared experts)
    notes: tuple[str, ...] = field(default=())

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim


def shape_from_config(config: dict[str, Any], source: str = "config.json") -> ModelShape:
    """Read a model's config.json with its family's reader (glmtune.models.families).

    Args:
        config: the parsed config.json.
        source: where it came from, for error messages.
    Raises:
        UserError: a config that is not a decoder glmtune knows, or one missing the fields its reader needs
            (named in the message).
    """
    from glmtune.models.families import family_of

    reader = family_of(config).shape
    if reader is None:
        raise unsupported(config, source)
    return reader(config, source)


def unsupported(config: dict[str, Any], source: str) -> UserError:
    from glmtune.models.families import FAMILIES

    glm = [family.name for family in FAMILIES if family.shape not in (None, llama_like)]
    return UserError(f"{source}: model_type {config.get('model_type')!r} is not one `glmtune plan` can estimate",
                     hint=f"supported: {', '.join(glm)}, and Llama-like decoders ({', '.join(sorted(LLAMA_LIKE))})")


def require_positive(config: dict[str, Any], keys: list[str], source: str) -> list[Any]:
    missing = [k for k in keys if not isinstance(config.get(k), int) or config[k] <= 0]
    if missing:
        raise UserError(f"{source}: expected positive integers for {', '.join(missing)} "
                        f"(model_type {config.get('model_type')!r})", hint="is this the model's own config.json?")
    return [config[k] for k in keys]


@dataclass(frozen=True)
class Decoder:
    """How the config.json of a decoder in transformers' standard names (num_hidden_layers, intermediate_size,
    attention_bias, ...) maps to its layers. Called as a reader: `Decoder(...)(config, source)`."""

    fused_gate_up: bool = False  # GLM: one gate_up_proj of 2 x intermediate, rather than gate_proj and up_proj
    norms_per_layer: int = 2  # GLM-4-0414 (glm4) has two more than the usual two
    qkv_bias: bool = False  # the q/k/v bias when the config has no attention_bias (GlmConfig's default is True)
    always_qkv_bias: bool = False  # Qwen2: a q/k/v bias whatever the config says
    o_bias: bool = True  # o_proj follows attention_bias (Llama: one flag for all); GLM and Qwen2: never
    moe: bool = False  # GLM-4.5 style: routed and shared experts after first_k_dense_replace dense layers
    estimated: bool = False  # read as a Llama-like decoder: its extra norms or biases are ignored

    def __call__(self, config: dict[str, Any], source: str = "config.json") -> ModelShape:
        model_type = config.get("model_type")
        hidden, layers, heads, vocab = require_positive(config, ["hidden_size", "num_hidden_layers",
                                                                 "num_attention_heads", "vocab_size"], source)
        kv_heads = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or hidden // heads
        inter = require_positive(config, ["intermediate_size"], source)[0]
        qkv_bias = config.get("attention_bias", self.qkv_bias) or self.always_qkv_bias
        o_bias = self.o_bias and bool(config.get("attention_bias"))
        q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
        attention = [Linear("q_proj", hidden, q_dim, qkv_bias, "attn_in"),
                     Linear("k_proj", hidden, kv_dim, qkv_bias, "attn_in"),
                     Linear("v_proj", hidden, kv_dim, qkv_bias, "attn_in"),
                     Linear("o_proj", q_dim, hidden, o_bias, "attn_out")]
        if self.fused_gate_up:
            mlp = [Linear("gate_up_proj", hidden, 2 * inter, False, "mlp_in"),
                   Linear("down_proj", inter, hidden, False, "mlp_act")]
        else:
            mlp = [Linear("gate_proj", hidden, inter, False, "mlp_in", self.moe),
                   Linear("up_proj", hidden, inter, False, "mlp_in", self.moe),
                   Linear("down_proj", inter, hidden, False, "mlp_act", self.moe)]
        notes: list[str] = []
        moe_layers = extra = active = top_k = 0
        if self.moe:
            experts, top_k, moe_inter = require_positive(config, ["n_routed_experts", "num_experts_per_tok",
                                                                  "moe_intermediate_size"], source)
            shared = config.get("n_shared_experts") or 0
            moe_layers = layers - min(layers, config.get("first_k_dense_replace") or 0)
            # transformers' Glm4MoeMoE: the routed experts fused (gate_up and down, one tensor each for all
            # experts), the shared experts' gate/up/down MLP, and the router's weight (its correction bias is a
            # buffer).
            shared_inter = moe_inter * shared
            mlp += [Linear("experts.gate_up_proj", hidden, 2 * moe_inter, False, "experts", moe_layers_only=True,
                           copies=experts),
                    Linear("experts.down_proj", moe_inter, hidden, False, "experts", moe_layers_only=True,
                           copies=experts)]
            if shared:
                mlp += [Linear("shared_experts.gate_proj", hidden, shared_inter, False, "mlp_in", moe_layers_only=True),
                        Linear("shared_experts.up_proj", hidden, shared_inter, False, "mlp_in", moe_layers_only=True),
                        Linear("shared_experts.down_proj", shared_inter, hidden, False, "shared_act",
                               moe_layers_only=True)]
            extra = experts * hidden
            active = (top_k + shared) * moe_inter
            notes.append("MoE: activations assume each token's top-k experts (dense matmuls per expert); "
                         "the next-token-prediction layers of the checkpoint are not loaded by transformers")
        if self.estimated:
            notes.append(f"{model_type} is estimated as a Llama-like decoder: its extra norms or biases are ignored")
        return ModelShape(model_type, vocab, hidden, layers, heads, kv_heads, head_dim, inter, gated_mlp=True,
                          norms_per_layer=self.norms_per_layer, norm_bias=False,
                          tie_embeddings=bool(config.get("tie_word_embeddings", False)),
                          linears=tuple(attention + mlp), extra_layer_params=extra, moe_layers=moe_layers,
                          moe_top_k=top_k if self.moe else 0, moe_active_intermediate=active, notes=tuple(notes))


# Decoders of other families laid out like Llama (separate gate/up/down projections, pre-norm RMSNorm).
LLAMA = Decoder()
LLAMA_LIKE = {"llama": LLAMA, "mistral": LLAMA, "qwen2": Decoder(always_qkv_bias=True, o_bias=False),
              **{name: Decoder(estimated=True) for name in ("qwen3", "gemma", "olmo", "granite")}}


def llama_like(config: dict[str, Any], source: str = "config.json") -> ModelShape:
    """The reader of decoders outside the GLM families: those in LLAMA_LIKE, by their model_type."""
    decoder = LLAMA_LIKE.get(config.get("model_type"))
    if decoder is None:
        raise unsupported(config, source)
    return decoder(config, source)


def layer_linears(shape: ModelShape, moe: bool) -> list[Linear]:
    """The linear layers of one decoder layer: an MoE layer has experts and no dense MLP, a dense one the reverse."""
    return [lin for lin in shape.linears if not (lin.dense_layers_only if moe else lin.moe_layers_only)]


def is_moe_layer(shape: ModelShape, layer: int) -> bool:
    return layer >= shape.num_layers - shape.moe_layers


def parameter_count(shape: ModelShape) -> int:
    """Every parameter of the causal LM, as `sum(p.numel() for p in model.parameters())` counts them."""
    norm = shape.hidden_size * (2 if shape.norm_bias else 1)
    total = sum(layer_parameter_count(shape, layer) for layer in range(shape.num_layers))
    embeddings = shape.vocab_size * shape.hidden_size
    return total + embeddings * (1 if shape.tie_embeddings else 2) + norm  # + the final norm


def layer_parameter_count(shape: ModelShape, layer: int) -> int:
    """The parameters of decoder block `layer` (0-based): its linears, biases, norms and, in an MoE block, router."""
    norm = shape.hidden_size * (2 if shape.norm_bias else 1)
    moe = is_moe_layer(shape, layer)
    linears = sum(lin.weights + (lin.d_out if lin.bias else 0) for lin in layer_linears(shape, moe))
    return linears + shape.norms_per_layer * norm + (shape.extra_layer_params if moe else 0)


def active_parameter_count(shape: ModelShape) -> int:
    """The parameters one token's forward pass uses: all of them but the routed experts it is not sent to."""
    idle = sum(lin.weights // lin.copies * (lin.copies - shape.moe_top_k)
               for lin in shape.linears if lin.copies > 1)
    return parameter_count(shape) - shape.moe_layers * idle


def resolve_targets(shape: ModelShape, requested: str | None) -> list[Linear]:
    """The linear layers LoRA adapts, with glmtune train's per-architecture defaults (glmtune.models.lora): the
    target modules, then the target parameters (marked as_parameter)."""
    from glmtune.models.lora import resolve_target_modules, resolve_target_parameters

    targets = resolve_target_modules(shape.model_type, requested)
    parameters = {_linear_name(p) for p in resolve_target_parameters(shape.model_type, requested)}
    by_parameter = [replace(lin, as_parameter=True) for lin in shape.linears if lin.name in parameters]
    if targets == "all-linear":  # peft: every nn.Linear of the decoder, never the output layer
        return [lin for lin in shape.linears if lin.copies == 1]
    names = {lin.name for lin in shape.linears}
    unknown = [t for t in targets if t.rsplit(".", 1)[-1] not in names]
    if unknown:
        raise UserError(f"--target_modules {','.join(unknown)}: no such linear layer in a {shape.model_type} decoder",
                        hint=f"choose from {', '.join(sorted(names))} or all-linear")
    wanted = {t.rsplit(".", 1)[-1] for t in targets}
    return [lin for lin in shape.linears if lin.name in wanted] + by_parameter


def _linear_name(parameter: str) -> str:
    """A target parameter's layer as plan names it: "mlp.experts.gate_up_proj" -> "experts.gate_up_proj"."""
    return parameter.removesuffix(".weight").removeprefix("mlp.")


def lora_parameter_count(shape: ModelShape, targets: list[Linear], rank: int) -> int:
    """LoRA's A (rank x d_in) and B (d_out x rank) on every adapted linear of every layer; a fused experts tensor
    gets a rank-r pair per expert (peft's ParamWrapper: A of rank x n_experts rows)."""
    total = 0
    for layer in range(shape.num_layers):
        present = {lin.name for lin in layer_linears(shape, is_moe_layer(shape, layer))}
        total += sum(rank * (lin.d_in + lin.d_out) * lin.copies for lin in targets if lin.name in present)
    return total
