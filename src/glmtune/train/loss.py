"""A memory-light causal-LM loss: never the whole [tokens x vocabulary] logits at once.

The gap this fills: a causal LM's forward builds fp32 logits for every position (GLM-4: 151,552 per token), and
the default loss keeps several copies of them for backward (bench/loss_memory.py: 7.9 GiB peak for 4 x 1,024 tokens on
a tiny model). Here the decoder runs without its output layer; then, over the supervised positions only, chunks
of tokens go through the output layer and cross-entropy, so at most one chunk's logits exist at a time. A frozen
output layer (LoRA's) gets the states' gradient computed in the same pass (frozen_output_layer_loss_sum); a trained
one gets each chunk recomputed in backward (activation checkpointing). Same value and gradients as the plain loss.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import Trainer
from transformers.integrations import is_deepspeed_zero3_enabled

IGNORE_INDEX = -100
CHUNK_TOKENS = 256  # at most CHUNK_TOKENS x vocabulary logits at once: GLM-4, 155 MB fp32 (bench/loss_memory.py)
# Below this many bytes of fp32 logits for the whole batch's supervised tokens, a trained output layer's loss is one
# pass without recomputation: the recomputation of chunks would cost a second output-layer forward.
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
    # layer's own forward.
    vocabulary = getattr(output_layer, "out_features", None) or output_layer.weight.shape[0]
    if _is_frozen_linear(output_layer):
        # Chunked whatever the logits' size, as nothing is recomputed: one pass over all the tokens allocates
        # (tokens x vocabulary) fp32 temporaries (36 MB for 1,100 tokens of an 8,000 vocabulary, above glibc's
        # largest mmap threshold: fresh pages every step, whose copies and zero-fill profiled at ~1.4 GB/s) and
        # runs log-softmax, its backward and the cast back as separate passes. 1.04x (fp32) and 1.09x (bf16) a step
        # on the speed scenario, one thread (docs/benchmarks.md).
        total = frozen_output_layer_loss_sum(states, targets, output_layer.weight, chunk_tokens)
    elif targets.numel() * vocabulary * 4 <= logits_budget_bytes:
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


def frozen_output_layer_loss_sum(states: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor,
                                 chunk_tokens: int = CHUNK_TOKENS) -> torch.Tensor:
    """Summed cross-entropy of (tokens, hidden) states through a frozen bias-free output layer, chunk by chunk, the
    states' gradient computed in the same pass: each chunk's logits exist once and are never recomputed (two
    output-layer products a chunk instead of checkpointing's three), and the weight is read only here, so DeepSpeed
    ZeRO-3 gathers it once per step (see ChunkedLossTrainer.compute_loss)."""
    if torch.is_grad_enabled() and states.requires_grad:
        return _FrozenOutputLayerCrossEntropy.apply(states, weight, targets, chunk_tokens)
    with torch.no_grad():
        return _loss_sum_and_gradient(states, weight, targets, chunk_tokens, gradient=None)


class _FrozenOutputLayerCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, states: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk_tokens: int) -> torch.Tensor:
        gradient = torch.empty_like(states)
        total = _loss_sum_and_gradient(states, weight, targets, chunk_tokens, gradient)
        ctx.save_for_backward(gradient)
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (gradient,) = ctx.saved_tensors
        return gradient * grad_total.to(gradient.dtype), None, None, None


def _loss_sum_and_gradient(states: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int,
                           gradient: torch.Tensor | None) -> torch.Tensor:
    """The summed cross-entropy; d(sum)/d(states) written into `gradient` unless it is None."""
    total = torch.zeros((), dtype=torch.float32, device=states.device)
    for start in range(0, targets.numel(), chunk_tokens):
        chunk, target = states[start:start + chunk_tokens], targets[start:start + chunk_tokens]
        # As _chunk_loss_sum: the product in the weight's dtype, the softmax in fp32.
        logits = F.linear(chunk.to(weight.dtype), weight).float()  # (chunk, vocabulary)
        log_normaliser = logits.logsumexp(dim=-1)
        total += (log_normaliser - logits.gather(1, target[:, None]).squeeze(1)).sum()
        if gradient is not None:  # d(sum of cross-entropy)/d(logits) = softmax - one-hot(target)
            probabilities = logits.sub_(log_normaliser[:, None]).exp_()
            probabilities[torch.arange(target.numel(), device=target.device), target] -= 1
            gradient[start:start + chunk_tokens] = probabilities.to(weight.dtype) @ weight
    return total


def _gathered(parameter: torch.nn.Parameter) -> Any:
    """DeepSpeed ZeRO-3's whole-parameter gather, as a context."""
    import deepspeed  # deepspeed.zero is an attribute, not an importable module

    return deepspeed.zero.GatheredParameters([parameter])


def _is_frozen_linear(layer: torch.nn.Module) -> bool:
    """A plain nn.Linear without bias whose weight takes no gradient (LoRA's output layer; not a quantized layer, not
    an adapted or trained one)."""
    return type(layer) is torch.nn.Linear and layer.bias is None and not layer.weight.requires_grad


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
        budget, gather = LOGITS_BUDGET_BYTES, contextlib.nullcontext()
        if is_deepspeed_zero3_enabled() and _is_frozen_linear(output_layer):
            # ZeRO-3 keeps the weight partitioned outside the layer's own forward: gather it once for all the chunks
            # of the frozen-layer loss, which reads the weight directly (never through the module's hooks). Every
            # process gathers once per step, whatever its number of supervised tokens (a collective all must join).
            budget, gather = 0, _gathered(output_layer.weight)
        elif is_deepspeed_zero3_enabled():
            # A trained or quantized output layer: one call per step, which ZeRO-3 gathers (a chunk recomputed in
            # backward would find the weight partitioned again: CheckpointError). Its logits are not bounded.
            budget = math.inf
        with gather:
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
