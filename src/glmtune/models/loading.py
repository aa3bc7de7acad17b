"""Load a tokenizer or a model (with an optional LoRA adapter), turning library failures into UserErrors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from glmtune.artifacts import read_json_object, sha256_text
from glmtune.errors import UserError
from glmtune.models.chatglm.convert import is_chatglm2_config, load_chatglm2
from glmtune.models.chatglm.glm4_tokenizer import build_glm4_tokenizer, is_glm4_tokenizer_dir
from glmtune.models.chatglm.ice_tokenizer import build_ice_tokenizer, is_ice_tokenizer_dir
from glmtune.models.chatglm.sp_tokenizer import build_chatglm_sp_tokenizer, chatglm_sp_family
from glmtune.models.chatglm6b.loading import is_chatglm6b_config, load_chatglm6b
from glmtune.models.hub import HINT, resolve_model

END_OF_TURN = ["<|user|>", "<|observation|>"]


def load_tokenizer(name: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    source = resolve_model(name)
    if not trust_remote_code and is_glm4_tokenizer_dir(Path(source)):
        return build_glm4_tokenizer(Path(source))  # THUDM's remote-code tokenizers, rebuilt natively
    if not trust_remote_code and is_ice_tokenizer_dir(Path(source)):
        return build_ice_tokenizer(Path(source))  # the first ChatGLM-6B's, rebuilt natively
    family = None if trust_remote_code else chatglm_sp_family(Path(source))
    if family:
        return build_chatglm_sp_tokenizer(Path(source), family)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot load the tokenizer of '{name}': {_first_line(e)}", hint=HINT) from None
    if tokenizer.pad_token_id is None:  # batching needs one; eos is the usual stand-in for causal LMs
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str, trust_remote_code: bool = False, dtype: Any = None,
               quantization_bit: int | None = None) -> Any:
    """`dtype`: of the weights (and, with `quantization_bit` 4, of the 4-bit layers' compute); `quantization_bit`:
    8 or 4 to quantize the linear layers with bitsandbytes (see glmtune.models.quantization)."""
    import torch
    from transformers import AutoModelForCausalLM

    from glmtune.models import quantization

    if quantization_bit:  # before anything is read: no backend, one clear error
        quantization.check_backend(quantization_bit)
    source = resolve_model(name)
    config = local_config(source)
    if not trust_remote_code and config is not None and is_chatglm2_config(config):
        if quantization_bit:
            raise quantization.refuse_converted_layout(quantization_bit, source, "ChatGLM2/3 or GLM-4")
        return load_chatglm2(Path(source), config, dtype or torch.float32)  # THUDM's layout, converted natively
    if not trust_remote_code and config is not None and is_chatglm6b_config(config):
        if quantization_bit:
            raise quantization.refuse_converted_layout(quantization_bit, source, "ChatGLM-6B")
        return load_chatglm6b(Path(source), config, dtype or torch.float32)  # glmtune's own ChatGLM-6B class
    quantized = {}
    if quantization_bit:
        quantized = {"quantization_config": quantization.bnb_config(quantization_bit, source, dtype,
                                                                    trust_remote_code),
                     "device_map": quantization.device_map()}
    try:
        return AutoModelForCausalLM.from_pretrained(source, trust_remote_code=trust_remote_code,
                                                    dtype=dtype or torch.float32, **quantized)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot load the model '{name}': {_first_line(e)}", hint=HINT) from None


def local_config(source: str) -> dict[str, Any] | None:
    """config.json of a local model directory, or None (a hub name, or no config)."""
    path = Path(source) / "config.json"
    return read_json_object(path, "model config") if path.is_file() else None


def stop_token_ids(name: str, tokenizer: Any) -> list[int]:
    """The ids generation stops on: the generation config's eos ids (GLM-4 lists its end-of-turn tokens
    there), the model config's, and the tokenizer's eos."""
    from transformers import GenerationConfig

    ids: list[int] = []
    try:
        ids += _as_list(GenerationConfig.from_pretrained(resolve_model(name)).eos_token_id)
    except OSError:  # no generation_config.json: fall back to config.json
        config_file = Path(resolve_model(name)) / "config.json"
        if config_file.is_file():
            ids += _as_list(read_json_object(config_file, "model config").get("eos_token_id"))
    ids += _as_list(tokenizer.eos_token_id)
    # Chats with role tokens (ChatGLM3, GLM-4) end a turn where the next one begins; their official chat() stops
    # there too, though ChatGLM3's config lists only the eos.
    vocab = tokenizer.get_vocab()
    ids += [vocab[token] for token in END_OF_TURN if token in vocab]
    stops = list(dict.fromkeys(i for i in ids if i is not None))
    if not stops:
        raise UserError(f"'{name}' defines no end-of-sequence token, so a tuned model would never stop",
                        hint="set eos_token_id in its generation_config.json or tokenizer")
    return stops


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything that decides the ids a tokenizer and its chat template produce."""
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


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
