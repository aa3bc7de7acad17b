"""The output layer reads a contiguous block of hidden states.

Callers that want one position's logits (training's chunked loss, generation's prefill: `logits_to_keep=1`) hand
the output layer the slice `hidden[:, -1:]` of a batch of several rows, which is not contiguous. torch's linear then
multiplies it as a batch against the weight broadcast to (rows, hidden, vocabulary), and on CPU in bf16 that
broadcast weight is copied whole: 8 rows x 1,024 hidden x 151,552 vocabulary took 31 s and 1.8 GB against 0.1 s for
the same rows made contiguous first (ChatGLM-6B's 130k vocabulary, 4 padded rows, bf16: 0.7 s of a 0.8 s training
step). A forward pre-hook makes the rows contiguous first: a copy of rows x hidden values, nothing when they already
are.
"""

from __future__ import annotations

from typing import Any


def _contiguous_input(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    hidden, *rest = args
    return (hidden.contiguous(), *rest)


def read_contiguous_hidden_states(model: Any) -> Any:
    """Give `model`'s output layer (get_output_embeddings) contiguous inputs; returns the model."""
    get_output = getattr(model, "get_output_embeddings", None)
    layer = get_output() if callable(get_output) else None
    if layer is not None:
        layer.register_forward_pre_hook(_contiguous_input)
    return model
