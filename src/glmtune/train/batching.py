"""How a batch of prepared samples reaches the model: packed end to end without padding, or padded.

- One row (OneRowCollator): models with plain causal attention (packed_attention.can_use_packed_sdpa: the GLM
  family, Llama, Qwen) get the whole batch in one row and an attention that computes each sample on its own: no
  padding, no mask, no attention across samples computed and thrown away.
- Rows (PackedRowsCollator): other models that keep samples apart by their position ids get the samples laid end
  to end (first-fit, longest first) in rows no longer than the longest sample, or up to twice that when the model's
  width says the padding saved outweighs the wider attention (choose_rows). Position ids restart at each sample and
  the first label of each sample is ignored (no loss crosses a boundary); transformers turns restarting positions
  into a block-diagonal causal mask (masking_utils: sdpa, eager, flex) or variable-length kernels (flash attention),
  so the result is exactly that of the samples run one by one. Several rows rather than transformers' single-row
  DataCollatorWithFlattening: with a mask, one row costs (total tokens)^2 in attention instead of the sum of
  (row tokens)^2 (measured: 13.9 s/step in one masked row, 9.2 s in rows; docs/benchmarks.md).
- Padded: models that derive their own masks from the ids (the first ChatGLM-6B, remote code) would let packed
  samples see each other; length grouping keeps their batches short. Which models keep samples apart is their
  family's `packing` (glmtune.models.families), checked against the loaded class.
"""

from __future__ import annotations

from typing import Any

from glmtune.models.families import family_of_model
from glmtune.models.lora import base_model

IGNORE_INDEX = -100


def supports_packing(model: Any) -> bool:
    """Whether the model keeps packed samples apart given only restarting position ids: its family says so, and
    its class is built on transformers' attention interface (remote code of a known family may not be). Not under a
    prefix (P-Tuning v2): every packed sample would have to see the one prefix, which restarting positions don't say."""
    from glmtune.models.prefix import is_prefix_model

    base = base_model(model)
    return (not is_prefix_model(model) and family_of_model(base).packing
            and bool(getattr(base, "_supports_attention_backend", False)))


def make_collator(tokenizer: Any, packing: bool, hidden_size: int | None = None, one_row: bool = False) -> Any:
    """one_row: the model's attention splits a row by the collator's cu_seq_lens (packed_attention.PACKED_SDPA)."""
    from transformers import DataCollatorForSeq2Seq

    if packing and one_row:
        return OneRowCollator()
    if packing:
        return PackedRowsCollator(pad_token_id=tokenizer.pad_token_id if tokenizer is not None else 0,
                                  hidden_size=hidden_size)
    # Pads input_ids with the pad id and labels with -100 (no loss on padding).
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)


class OneRowCollator:
    """The whole batch in one row, without padding: position ids restart at each sample, the first label of each
    sample is ignored (the previous sample's last token would predict it), and cu_seq_lens_q/k and max_length_q/k
    (transformers' variable-length attention keywords) say where samples start, for an attention that computes each
    sample on its own (packed_attention.PACKED_SDPA; flash attention's variable-length kernel reads the same)."""

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        lengths = [len(f["input_ids"]) for f in features]
        input_ids = torch.cat([torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features])
        labels = torch.cat([torch.as_tensor(f["labels"], dtype=torch.long) for f in features])
        position_ids = torch.cat([torch.arange(n) for n in lengths])
        starts = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        starts[1:] = torch.as_tensor(lengths).cumsum(0)
        labels[starts[:-1].long()] = IGNORE_INDEX  # no loss across a boundary
        longest = max(lengths)
        return {"input_ids": input_ids[None], "labels": labels[None], "position_ids": position_ids[None],
                "cu_seq_lens_q": starts, "cu_seq_lens_k": starts, "max_length_q": longest, "max_length_k": longest}


# A token's attention work grows with its row's width W, the rest of its work does not: per layer the scores and
# the weighted sum cost ~4 x hidden x W FLOPs against ~24 x hidden^2 for the linear layers (q, k, v, o and the MLP),
# so relative to the linear work W costs W / (6 x hidden) with a block-diagonal mask (every block computed) and half
# that in the causal kernel (one-sample rows, no mask).
ATTENTION_PER_WIDTH_AND_HIDDEN = 1 / 6


class PackedRowsCollator:
    def __init__(self, pad_token_id: int, hidden_size: int | None = None):
        self.pad_token_id = pad_token_id
        self.hidden_size = hidden_size

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        lengths = [len(f["input_ids"]) for f in features]
        rows = self.choose_rows(lengths)
        width = max(sum(lengths[i] for i in row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)  # (rows, width)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                n = lengths[i]
                input_ids[r, at:at + n] = torch.as_tensor(features[i]["input_ids"])
                labels[r, at + 1:at + n] = torch.as_tensor(features[i]["labels"][1:])  # [at]: crosses a boundary
                # The padding tail continues the row's last sample: causality keeps every real token from seeing
                # it, and it carries no loss. A row of one sample then has plain 0..width-1 positions, and a batch
                # of such rows gets no mask at all (transformers detects no packing): attention takes the causal
                # kernel path, which skips the blocks above the diagonal that a materialised mask computes.
                end = width if i == row[-1] else at + n
                position_ids[r, at:end] = torch.arange(end - at)
                at += n
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


    def choose_rows(self, lengths: list[int]) -> list[list[int]]:
        """Rows of at most the longest sample; or, knowing the model's width, the row capacity (up to twice the
        longest sample) that computes the least: fewer padded tokens against wider attention. The sampler's length
        groups are loose on small datasets (transformers groups 4 x batch samples when there are few), so a batch's
        samples can differ by 2x and one sample per row pads heavily (measured on bench/train_speed.py's data: 23%
        of the computed tokens were padding)."""
        longest = max(lengths)
        if self.hidden_size is None:
            return pack_rows(lengths, capacity=longest)
        candidates = sorted({longest, *(min(longest + n, 2 * longest) for n in lengths)})
        return min((pack_rows(lengths, capacity) for capacity in candidates),
                   key=lambda rows: self._cost(rows, lengths))

    def _cost(self, rows: list[list[int]], lengths: list[int]) -> float:
        """Tokens computed, weighted by their attention width (see ATTENTION_PER_WIDTH_AND_HIDDEN)."""
        width = max(sum(lengths[i] for i in row) for row in rows)
        masked = any(len(row) > 1 for row in rows)  # one-sample rows only: no mask, the causal kernel skips half
        per_width = ATTENTION_PER_WIDTH_AND_HIDDEN * (1.0 if masked else 0.5) / self.hidden_size
        return len(rows) * width * (1 + width * per_width)


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of the samples in each row: first-fit, longest first, rows of at most `capacity` tokens."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fit = next((r for r, free in enumerate(room) if lengths[i] <= free), None)
        if fit is None:
            rows.append([i])
            room.append(capacity - lengths[i])
        else:
            rows[fit].append(i)
            room[fit] -= lengths[i]
    return rows
