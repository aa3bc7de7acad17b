"""A memory-light causal-LM loss: never the whole [tokens x vocabulary] logits at once.

The gap this fills: a causal LM's forward builds fp32 logits for every position (GLM-4: 151,552 per token), and
the default loss keeps several copies of them for backward (bench/loss_memory.py: 7.9 GiB peak for 4 x 1,024 tokens on
a tiny model). Here the decoder runs without its output layer; then, over the supervised positions only, chunks
of tokens go through the output layer and cross-entropy, each chunk recomputed in backward (activation
checkpointing), so at most one chunk's logits exist at a time. Same value and gradients as the plain loss.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import Trainer
from transformers.integrations import is_deepspeed_zero3_enabled

IGNORE_INDEX = -100
CHUNK_TOKENS = 256  # at most CHUNK_TOKENS x vocabulary logits at once: GLM-4, 155 MB fp32 (bench/loss_memory.py)
# Below this many bytes of fp32 logits for the whole batch's supervised tokens, one pass without recomputation:
# small vocabularies gain nothing from chunks, and the recomputation would cost a second output-layer forward.
LOGITS_BUDGET_BYTES = 256 * 2**20


def chunked_causal_lm_loss(hidden: torch.Tensor, output_layer: torch.nn.Module, labels: torch.Tensor,
                           num_items_in_batch: torch.Tensor | int | None = None,
                           chunk_tokens: int = CHUNK_TOKENS,
                           logits_budget_bytes: float = LOGITS_BUDGET_BYTES) -> torch.Tensor:
    """Mean next-token cross-entropy over supervised positions (or sum / num_items_in_batch when given, the
    Trainer's normalisation across accumulated batches), as transformers' ForCausalLMLoss computes it.

    hidden: (batch, seq, hidden) final hidden states; labels: (batch, seq) with IGNORE_INDEX where no loss.
    """
    targets = labels[:, 1:].reshape(-1)  # position t predicts token t + 1
    states = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (tokens, hidden)
    keep = targets != IGNORE_INDEX
    states, targets = states[keep], targets[keep]  # only where a loss is taken
    # out_features, not weight.shape: under DeepSpeed ZeRO-3 the weight is partitioned (shape [0]) outside the
    # layer's own forward, which made this 0 and always chose the one-pass branch.
    vocabulary = getattr(output_layer, "out_features", None) or output_layer.weight.shape[0]
    if targets.numel() * vocabulary * 4 <= logits_budget_bytes:
        total = _chunk_loss_sum(states, targets, output_layer)
    else:
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, targets.numel(), chunk_tokens):
            end = start + chunk_tokens
            total = total + checkpoint(_chunk_loss_sum, states[start:end], targets[start:end], output_layer,
                                       use_reentrant=False)
    denominator = num_items_in_batch if num_items_in_batch is not None else targets.numel()
    if isinstance(denominator, torch.Tensor):
        denominator = denominator.to(total.device)
    return total / denominator


def _chunk_loss_sum(states: torch.Tensor, targets: torch.Tensor, output_layer: torch.nn.Module) -> torch.Tensor:
    # The loss runs outside the model's forward, so outside the Trainer's autocast (accelerate wraps the forward
    # only): match the output layer's dtype by hand (a bf16 base gives fp32 states out of its final norm).
    logits = output_layer(states.to(output_layer.weight.dtype)).float()  # (chunk, vocabulary), freed after the chunk
    return F.cross_entropy(logits, targets, reduction="sum")


class ChunkedLossTrainer(Trainer):
    """transformers' Trainer with the loss above: the model returns its final hidden states (and the logits of
    one position only), the loss is computed from the hidden states in chunks."""

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> Any:
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        outputs = model(**inputs, output_hidden_states=True, logits_to_keep=1)
        output_layer = self.accelerator.unwrap_model(model).get_output_embeddings()
        # DeepSpeed ZeRO-3 gathers the output layer's weight in that layer's forward hook and partitions it again
        # after: the recomputation in backward then sees shape [0] (torch.utils.checkpoint.CheckpointError), and
        # processes with different supervised-token counts would call the layer (an all-gather each) a different
        # number of times. So under ZeRO-3, one output-layer call per step (still supervised positions only).
        budget = math.inf if is_deepspeed_zero3_enabled() else LOGITS_BUDGET_BYTES
        loss = chunked_causal_lm_loss(outputs.hidden_states[-1], output_layer, labels, num_items_in_batch,
                                      chunk_tokens=CHUNK_TOKENS, logits_budget_bytes=budget)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # As Trainer.compute_loss: num_items_in_batch counts every process's tokens and DDP averages the
            # gradients over processes, so each process's share is scaled back up (else the loss and gradients of
            # a 2-process run are half a single process's).
            scale = self.accelerator.num_processes // self.get_tp_size()
            loss = loss * (scale if self.args.n_gpu <= 1 else self.args.n_gpu)
        # Normalised over the whole accumulated batch when the Trainer counted it: no further division.
        self.loss_is_scaled_for_ga = num_items_in_batch is not None
        return (loss, outputs) if return_outputs else loss
