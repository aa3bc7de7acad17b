"""The arithmetic a LoRA training step needs, for model FLOPs utilisation (MFU): achieved FLOP/s over the machine's
matmul rate in the run's precision.

Counted is the work the step cannot avoid, whatever computes it, so runs that pad, or compute logits nobody takes a
loss on, do not look busier for it:
- every linear layer of the decoder, forward (2 x parameters per token) and the input's gradient through the frozen
  weight in backward (2 x parameters per token; a frozen weight needs no weight gradient);
- each LoRA adapter (rank r over a layer of in x out): forward x A^T then (.) B^T, 2r(in + out); backward the input's
  gradient through it, 2r(in + out), and the gradients of A and B, 2r(in + out): 6r(in + out) per token in all;
- causal attention of each sample on its own: the scores and the weighted sum over the positions before each token,
  4 x heads x head_dim x (n^2 / 2) per sample of n tokens and layer forward, twice that backward;
- the output layer on supervised tokens only (the only logits a loss needs), forward and the states' gradient,
  4 x hidden x vocabulary per supervised token.
Embedding lookups, norms, activations and the optimizer are not matmuls and are left out, as MFU usually does.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelShape:
    """What the count needs of a decoder: its linear layers per block (name: (in, out)), depth, attention width,
    output layer."""

    linears: dict[str, tuple[int, int]]
    num_layers: int
    num_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """From a transformers config of a Llama-like decoder (GLM, Llama, Qwen): q/k/v/o, a gated MLP.
        `config`: a PretrainedConfig or a dict of its fields. GLM's gate_up_proj is the gate and up fused;
        gate_proj + up_proj name them apart, as Llama's do, with the same total."""
        get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
        hidden, heads = get("hidden_size"), get("num_attention_heads")
        head_dim = get("head_dim") or hidden // heads
        kv_heads = get("num_key_value_heads") or heads
        inter = get("intermediate_size")
        linears = {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv_heads * head_dim),
                   "v_proj": (hidden, kv_heads * head_dim), "o_proj": (heads * head_dim, hidden),
                   "gate_up_proj": (hidden, 2 * inter), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
                   "down_proj": (inter, hidden)}
        if _fused_gate_up(config if isinstance(config, dict) else config.to_dict()):
            del linears["gate_proj"], linears["up_proj"]
        else:
            del linears["gate_up_proj"]
        return cls(linears, get("num_hidden_layers"), heads, head_dim, hidden, get("vocab_size"))


def lora_step_flops(shape: ModelShape, tokens: int, supervised_tokens: int, sum_squared_lengths: int,
                    lora_rank: int, adapted: Iterable[str]) -> float:
    """FLOPs a LoRA training pass over these samples needs (see the module docstring for what counts).

    Args:
        shape: the decoder's shape (ModelShape.from_config).
        tokens: real (non-pad) tokens of the samples.
        supervised_tokens: tokens a loss is taken on.
        sum_squared_lengths: the sum over samples of (sample tokens)^2, for causal attention.
        lora_rank: r; adapted: the names of the adapted linear layers (q_proj, ...), in every block.
    """
    frozen = sum(i * o for i, o in shape.linears.values())
    adapters = sum(i + o for name, (i, o) in shape.linears.items() if name in set(adapted))
    per_token = shape.num_layers * (4 * frozen + 6 * lora_rank * adapters)
    attention = shape.num_layers * 3 * 4 * shape.num_heads * shape.head_dim * sum_squared_lengths / 2
    output_layer = 4 * shape.hidden_size * shape.vocab_size * supervised_tokens
    return per_token * tokens + attention + output_layer


def mfu(flops: float, seconds: float, peak_flops_per_second: float) -> float:
    """Model FLOPs utilisation: the share of the machine's matmul rate the run reached."""
    return flops / seconds / peak_flops_per_second


def _fused_gate_up(config: dict[str, Any]) -> bool:
    """Whether the model's family fuses the MLP's gate and up projections (GLM, GLM-4): the registry says."""
    from glmtune.models.families import family_of

    return bool(getattr(family_of(config).shape, "fused_gate_up", False))
