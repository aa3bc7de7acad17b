"""How a batch of prepared samples reaches the model: packed end to end without padding, or padded.

Packing is transformers' padding-free path: DataCollatorWithFlattening concatenates the batch's samples into one
row, with position ids restarting at each sample and the first label of each sample ignored (so no loss crosses
a boundary). Models built on transformers' attention interface turn those restarting positions into a
block-diagonal causal mask (sdpa, eager) or variable-length kernels (flash attention), so the result is exactly
that of the samples run one by one. Models that derive their own masks from the ids (the first ChatGLM-6B, remote
code) would let samples see each other: they get padded batches, which length grouping keeps short.
"""

from __future__ import annotations

from typing import Any

IGNORE_INDEX = -100


def supports_packing(model: Any) -> bool:
    """Whether the model keeps packed samples apart given only restarting position ids."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "_supports_attention_backend", False))


def make_collator(tokenizer: Any, packing: bool) -> Any:
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if packing:
        return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
    # Pads input_ids with the pad id and labels with -100 (no loss on padding).
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
