"""Load a tokenizer or a model the way its family says (glmtune.models.families), turning library failures into
UserErrors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from glmtune.artifacts import read_json_object, sha256_text
from glmtune.errors import UserError
from glmtune.models.families import family_of_source, native_tokenizer
from glmtune.models.hub import HINT, local_config, resolve_model


def load_tokenizer(name: str, trust_remote_code: bool = False) -> Any:
    """The tokenizer of `name`, with its chat template: glmtune's rebuild for THUDM's remote-code tokenizers
    (unless `trust_remote_code`), else transformers' AutoTokenizer, given a pad token when it has none.

    Args:
        name: --model: a local directory or a hub name (glmtune.models.hub.resolve_model).
        trust_remote_code: run the checkpoint's own tokenizer code instead of glmtune's rebuild.
    Raises:
        UserError: the model can't be found, or transformers can't load its tokenizer.
    """
    from transformers import AutoTokenizer

    source = resolve_model(name)
    native = None if trust_remote_code else native_tokenizer(Path(source))
    if native is not None:
        return native.build(Path(source))  # THUDM's remote-code tokenizers, rebuilt natively
    from glmtune.models.chatglm.official_encode import load_saved

    saved = load_saved(Path(source))  # one of those, saved by glmtune: a class AutoTokenizer does not know
    if saved is not None:
        return saved
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot load the tokenizer of '{name}': {first_line(e)}", hint=HINT) from None
    if tokenizer.pad_token_id is None:  # batching needs one; eos is the usual stand-in for causal LMs
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str, trust_remote_code: bool = False, dtype: Any = None,
               quantization_bit: int | None = None) -> Any:
    """The causal LM `name`, the way its family loads it: a glmtune converter for THUDM's layouts (unless
    `trust_remote_code`), else transformers' AutoModelForCausalLM.

    Args:
        name: --model: a local directory or a hub name (glmtune.models.hub.resolve_model).
        trust_remote_code: run the checkpoint's own modeling code instead of glmtune's converter.
        dtype: torch dtype of the weights (and, with `quantization_bit` 4, of the 4-bit layers' compute);
            None for fp32.
        quantization_bit: 8 or 4 to quantize the linear layers with bitsandbytes (glmtune.models.quantization).
    Raises:
        UserError: the model can't be found or loaded, bitsandbytes has no backend here, or the family's
            layout does not take that quantization.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from glmtune.models import quantization
    from glmtune.models.chatglm6b import register
    from glmtune.models.output_layer import read_contiguous_hidden_states

    register()  # a directory glmtune wrote for its own architecture, even where plan imported this package first
    if quantization_bit:  # before anything is read: no backend, one clear error
        quantization.check_backend(quantization_bit)
    source = resolve_model(name)
    config = local_config(source)
    family = family_of_source(source)
    if not trust_remote_code and config is not None and family.converter is not None:  # glmtune builds the model
        if quantization_bit and quantization_bit not in family.quantization_bits:
            raise quantization.refuse_converted_layout(quantization_bit, source, family.converter.layout)
        return read_contiguous_hidden_states(family.converter.load(Path(source), config, dtype or torch.float32))
    quantized = {}
    if quantization_bit:
        quantized = {"quantization_config": quantization.bnb_config(quantization_bit, source, dtype,
                                                                    trust_remote_code),
                     "device_map": quantization.device_map()}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=trust_remote_code,
                                                     dtype=dtype or torch.float32, **quantized)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot load the model '{name}': {first_line(e)}", hint=HINT) from None
    return read_contiguous_hidden_states(model)


def stop_token_ids(name: str, tokenizer: Any) -> list[int]:
    """The ids generation stops on: the generation config's eos ids (GLM-4 lists its end-of-turn tokens
    there), the model config's, the tokenizer's eos, and the tokens that end a turn in the model's family.

    Args:
        name: --model, as given to load_tokenizer.
        tokenizer: the model's tokenizer (its eos and vocabulary).
    Returns:
        The ids, without duplicates, in that order.
    Raises:
        UserError: the model can't be found, or none of those sources names a stop token.
    """
    from transformers import GenerationConfig

    source = resolve_model(name)
    ids: list[int] = []
    try:
        ids += _as_list(GenerationConfig.from_pretrained(source).eos_token_id)
    except OSError:  # no generation_config.json: fall back to config.json
        config_file = Path(source) / "config.json"
        if config_file.is_file():
            ids += _as_list(read_json_object(config_file, "model config").get("eos_token_id"))
    ids += _as_list(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ids += [vocab[token] for token in family_of_source(source).end_of_turn if token in vocab]
    stops = list(dict.fromkeys(i for i in ids if i is not None))
    if not stops:
        raise UserError(f"'{name}' defines no end-of-sequence token, so a tuned model would never stop",
                        hint="set eos_token_id in its generation_config.json or tokenizer")
    return stops


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything that decides the ids a tokenizer and its chat template produce: what manifests record,
    so that a dataset or an adapter is refused with another tokenizer.

    Returns:
        The sha256 hex digest of the backend's state (call-time truncation and padding left out), or of the
        vocabulary for a slow tokenizer, and the chat template.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        # Truncation and padding are call-time settings that transformers changes on the first encode().
        state.pop("truncation", None)
        state.pop("padding", None)
        body = json.dumps(state, sort_keys=True)
    else:
        body = json.dumps(sorted(tokenizer.get_vocab().items()))
    return sha256_text(body + "\n" + str(getattr(tokenizer, "chat_template", "") or ""))


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def first_line(error: BaseException) -> str:
    """The first line of an error's message (the whole message can be a page of library detail)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
