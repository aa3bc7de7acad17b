"""Packed samples' attention computed sample by sample: padding-free packing with no mask and no wasted blocks.

With packing through restarting position ids alone, transformers turns the positions into a block-diagonal causal
mask and sdpa computes every block of each row, the masked ones included; rows are kept short to bound that waste,
and the batch pads to its widest row. Flash attention's variable-length kernel (CUDA, flash-attn) avoids both; this
is the same idea for any device through plain sdpa: the whole batch lies in ONE row without padding, the collator
gives each sample's start (`cu_seq_lens_q`, the keyword transformers' flash-attention path already carries to the
attention function), and attention runs once per sample with the causal kernel, which skips the blocks above the
diagonal. Linear layers then compute real tokens only, and attention costs the sum of squared sample lengths / 2.

Registered as the attention implementation PACKED_SDPA. Every call that is not a packed training forward (padding
masks, generation with a cache, a query shorter than its keys) goes to transformers' own sdpa path unchanged, with
transformers' own sdpa mask. Only for models whose attention is plain full causal attention (their family's
`plain_causal`, glmtune.models.families): no sliding window, no soft-capping, no attention sinks, no bias terms,
which per-sample sdpa would ignore.
"""

from __future__ import annotations

from typing import Any

from glmtune.models.families import family_of_model
from glmtune.models.lora import base_model

PACKED_SDPA = "glmtune_packed_sdpa"
# On CPU, torch's bf16 flash-attention kernel runs each block's products as oneDNN matmuls (a primitive looked up per
# block, and created for each new sample length) where fp32's calls MKL: for short samples it costs more than the
# same sample computed in fp32 (q, k, v cast up, the output cast back), for long ones less. Measured with torch 2.13
# on an AVX512-BF16 CPU, one thread, forward + backward of one sample, 4 heads of 96 and 32 heads of 128 alike,
# bf16 over fp32 time: 2.0x at 64 tokens, 1.5-1.9x at 128, 1.0x at 256-384, 0.7-0.9x from 512 (bench/step_ab.py's
# fused-bf16+attn16 variant measures it in a step). So samples shorter than this are computed in fp32, which is
# also more exact.
CPU_FP32_ATTENTION_BELOW = 256


def can_use_packed_sdpa(model: Any) -> bool:
    """Whether per-sample sdpa computes exactly what the model's own sdpa attention computes."""
    base = base_model(model)
    config = base.config
    if not family_of_model(base).plain_causal or config._attn_implementation not in ("sdpa", PACKED_SDPA):
        return False
    if not type(base).__module__.startswith("transformers.models."):  # remote code naming itself "llama"
        return False
    windowed = getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)
    layer_types = getattr(config, "layer_types", None)
    return not windowed and (not layer_types or set(layer_types) == {"full_attention"})


def use_packed_sdpa(model: Any) -> None:
    """Switch the model's attention to PACKED_SDPA (same results for unpacked inputs; see the module docstring)."""
    register()
    base = base_model(model)
    base.set_attn_implementation(PACKED_SDPA)


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_SDPA, _mask_unless_plain_causal)


def _mask_unless_plain_causal(*, q_length: int, kv_length: int, q_offset: Any = 0, attention_mask: Any = None,
                              **kwargs: Any) -> Any:
    """No mask for a forward without padding or cache (a training forward: the attention function keeps packed samples
    apart); transformers' sdpa mask otherwise. Without this, transformers would build the block-diagonal mask of
    packed positions (tokens^2 booleans for the one-row batch) only for it to be ignored."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and q_length == kv_length and isinstance(q_offset, int) and q_offset == 0:
        return None
    return sdpa_mask(q_length=q_length, kv_length=kv_length, q_offset=q_offset, attention_mask=attention_mask,
                     **kwargs)


def packed_sdpa_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
                          scaling: float | None = None, is_causal: bool | None = None,
                          **kwargs: Any) -> tuple[Any, None]:
    """transformers' attention-function signature. query (batch, heads, tokens, dim); key/value (batch, kv heads,
    tokens, dim). Returns (batch, tokens, heads, dim) as transformers' sdpa_attention_forward does."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    starts = None
    if attention_mask is None and query.shape[2] == key.shape[2] > 1:
        starts = _sample_starts(kwargs.get("cu_seq_lens_q"), kwargs.get("position_ids"), query.shape[0])
    if starts is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    batch, heads, tokens, dim = query.shape
    if starts[0] != 0 or starts[-1] != batch * tokens:
        raise ValueError(f"cu_seq_lens_q covers tokens {starts[0]}..{starts[-1]} of a batch of {batch} x {tokens}: "
                         "the batch was split without its sample boundaries (torch.nn.DataParallel?)")
    # Rows laid end to end (the one-row batch: a view), as the flash-attention convention counts cu_seq_lens.
    query, key, value = (t.transpose(0, 1).reshape(1, t.shape[1], batch * tokens, dim) for t in (query, key, value))
    gqa = heads != key.shape[1]
    # split, not slices: a slice's backward writes a zero gradient of the whole row for each sample (measured, 64
    # samples of 32 tokens: 266 ms backward against 25 ms).
    lengths = [end - start for start, end in zip(starts[:-1], starts[1:], strict=True)]
    dtype, below = _fp32_below(query)
    outputs = []
    for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2), strict=True):
        if q.shape[2] < below:  # autocast off: it would cast the fp32 operands back to bf16
            with torch.autocast(query.device.type, enabled=False):
                out = torch.nn.functional.scaled_dot_product_attention(
                    q.float(), k.float(), v.float(), dropout_p=dropout, scale=scaling, is_causal=True,
                    enable_gqa=gqa).to(dtype)
        else:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling,
                                                                   is_causal=True, enable_gqa=gqa)
        outputs.append(out)
    output = torch.cat(outputs, dim=2).reshape(heads, batch, tokens, dim)
    return output.permute(1, 2, 0, 3).contiguous(), None


def _fp32_below(query: Any) -> tuple[Any, int]:
    """The dtype sdpa computes the queries in (autocast's, which casts them, else their own) and the sample length
    below which they are computed in fp32 instead (CPU_FP32_ATTENTION_BELOW; bf16 on CPU only, else 0)."""
    import torch

    device = query.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype
    return dtype, CPU_FP32_ATTENTION_BELOW if device == "cpu" and dtype == torch.bfloat16 else 0


_last_cu_seq_lens: list[Any] = [None, None]  # (tensor, its starts): one conversion per forward, not per layer


def _sample_starts(cu_seq_lens: Any, position_ids: Any, batch: int) -> list[int] | None:
    """Token offsets where each sample starts, and the total at the end, over the rows laid end to end: from the
    collator's cu_seq_lens, else from where position ids restart or a row ends; None when there is nothing to split."""
    if cu_seq_lens is not None:
        if _last_cu_seq_lens[0] is not cu_seq_lens:  # .tolist() waits for the device: once per batch, not per layer
            _last_cu_seq_lens[:] = [cu_seq_lens, [int(i) for i in cu_seq_lens.tolist()]]
        return _last_cu_seq_lens[1]
    if position_ids is None:
        return None
    import torch

    position_ids = position_ids.expand(batch, -1)
    restarts = position_ids[:, 1:] != position_ids[:, :-1] + 1  # (batch, tokens - 1)
    if not restarts.any():
        return None
    row_starts = torch.ones(batch, 1, dtype=torch.bool, device=restarts.device)  # rows never run into each other
    starts = torch.cat([row_starts, restarts], dim=1).reshape(-1).nonzero().flatten().tolist()
    return [*starts, position_ids.numel()]
