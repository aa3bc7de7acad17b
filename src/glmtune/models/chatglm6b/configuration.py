"""ChatGLM-6B's configuration, with the field names of THUDM's config.json so that its checkpoints need no renaming."""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import PretrainedConfig


@strict
class ChatGlm6bConfig(PretrainedConfig):
    """THUDM/chatglm-6b; the defaults are the real model's.

    `position_encoding_2d=False` is the 1-D variant of the official code: rotary over the whole head on the token
    positions only. The bidirectional prefix mask is the same in both variants.
    """

    # "chatglm" is taken by ChatGLM2/3 checkpoints, whose config.json say "chatglm" too.
    model_type = "chatglm6b"
    # Generic code (peft, DynamicCache, glmtune) reads the standard names.
    attribute_map = {
        "num_hidden_layers": "num_layers",
        "intermediate_size": "inner_hidden_size",
        "layer_norm_eps": "layernorm_epsilon",
        "max_position_embeddings": "max_sequence_length",
    }

    vocab_size: int = 130528
    hidden_size: int = 4096
    num_layers: int = 28
    num_attention_heads: int = 32
    inner_hidden_size: int = 16384
    layernorm_epsilon: float = 1e-5
    position_encoding_2d: bool = True
    max_sequence_length: int = 2048
    bos_token_id: int = 130004  # <sop>: the context (bidirectional) ends just before it
    eos_token_id: int | list[int] = 130005  # <eop>
    mask_token_id: int = 130000  # [MASK]
    gmask_token_id: int = 130001  # [gMASK]
    pad_token_id: int | None = 3
    use_cache: bool = True
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02

    def validate_architecture(self) -> None:
        """Run by @strict on construction: the head must split evenly for the rotary halves."""
        super().validate_architecture()
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})"
            )
        head_dim = self.hidden_size // self.num_attention_heads
        rotary_dim = head_dim // 2 if self.position_encoding_2d else head_dim
        if rotary_dim % 2:
            raise ValueError(
                f"the head size {head_dim} (hidden_size / num_attention_heads) must be a multiple of "
                f"{4 if self.position_encoding_2d else 2} for {'2-D ' if self.position_encoding_2d else ''}rotary"
            )


# Keys of THUDM's config.json that say nothing about the architecture, or that say "off".
_IGNORED = {"auto_map", "architectures", "model_type", "transformers_version", "_name_or_path", "prefix_projection"}


def config_from_official(d: dict[str, Any]) -> ChatGlm6bConfig:
    """Build the config from a THUDM/chatglm-6b config.json dict; refuses what the native model cannot run."""
    if d.get("quantization_bit"):
        raise ValueError(
            f"quantization_bit={d['quantization_bit']}: the checkpoint holds THUDM's own int4/int8 weights, which the "
            "native ChatGLM-6B cannot load; use the unquantized checkpoint (THUDM/chatglm-6b) and quantize on load"
        )
    if d.get("pre_seq_len") is not None:
        raise ValueError(
            f"pre_seq_len={d['pre_seq_len']}: THUDM's P-Tuning v2 layout keeps the prefix inside the model; glmtune "
            "keeps it beside the model in peft's format: use the base checkpoint (pre_seq_len null) and train with "
            "--finetuning_type ptuning"
        )
    kwargs = {k: v for k, v in d.items() if k not in _IGNORED and k not in ("quantization_bit", "pre_seq_len")}
    if "torch_dtype" in kwargs:
        kwargs["dtype"] = kwargs.pop("torch_dtype")
    return ChatGlm6bConfig(**kwargs)
