"""Write a plain transformers model directory from a checkpoint glmtune loads natively (THUDM's ChatGLM-6B,
ChatGLM2/3 and GLM-4 layouts): AutoModelForCausalLM and AutoTokenizer load it without remote code (and, but for
ChatGLM-6B's own class, which needs `import glmtune.models`, without glmtune)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from glmtune.artifacts import atomic_directory, write_manifest
from glmtune.disk import tensor_bytes
from glmtune.errors import UserError
from glmtune.models.hub import resolve_model
from glmtune.models.loading import load_model, load_tokenizer, local_config, stop_token_ids, tokenizer_fingerprint

logger = logging.getLogger(__name__)


def export_model(source: str, destination: Path, tokenizer_source: str | None, overwrite: bool,
                 config: dict[str, Any]) -> Path:
    import torch
    from transformers import GenerationConfig

    tokenizer = load_tokenizer(tokenizer_source or source)
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"the tokenizer of {tokenizer_source or source} has no native fast implementation yet, "
                        "so the converted directory could not be loaded without remote code")
    model = load_model(source, dtype=_checkpoint_dtype(source, torch))  # keeps THUDM's fp16/bf16
    vocab = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:  # a real tokenizer beside a tiny test model, as in the fixtures
        logger.warning(f"the tokenizer has {len(tokenizer)} tokens, more than the model's {vocab} embeddings: "
                       "ids past the table will fail at run time")
    # Only ids the model can emit: a tokenizer's ids past a smaller test model's table are left out.
    stops = [i for i in stop_token_ids(source, tokenizer) if i < vocab]
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else tokenizer.pad_token_id
    model.generation_config = GenerationConfig(eos_token_id=stops, pad_token_id=pad)
    model.config.eos_token_id = stops
    with atomic_directory(destination, overwrite, what="the converted model",
                          needed=tensor_bytes(model.parameters())) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_manifest(tmp, "convert", config, source=source, tokenizer_source=tokenizer_source or source,
                       tokenizer_fingerprint=tokenizer_fingerprint(tokenizer), stop_ids=stops,
                       architecture=type(model).__name__)
    return destination


def _checkpoint_dtype(source: str, torch: Any) -> Any:
    """Keep the published precision (THUDM ships float16/bfloat16): a 6B model in fp32 needs twice the memory."""
    name = (local_config(resolve_model(source)) or {}).get("torch_dtype")
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(name, torch.float32)
