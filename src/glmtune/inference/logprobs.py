"""The log-probabilities of generated tokens, as OpenAI's `logprobs` / `top_logprobs` report them.

They are the model's own: the log-softmax of the raw logits at each step, before temperature, top-p or any other
logits processor (vLLM's default too), so that a sampled answer reports the same numbers as a greedy one for the same
tokens, and a client can check them against a forward pass. The sums are done in float32 whatever the model's dtype.

`LogprobRecorder` takes them while `generate` runs: a forward hook keeps the last step's logits, and the streamer
calls `record` with the token chosen from them, so each token's entry exists before its text is handed on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat; completions' legacy `logprobs` takes at most 5


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # the most likely tokens at this step, best first


def token_logprob(logits: Any, token_id: int, top: int = 0) -> TokenLogprob:
    """One step: `logits` (vocab,) -> the chosen token's log-probability and the `top` most likely tokens'."""
    import torch

    logprobs = torch.log_softmax(logits.float(), dim=-1)
    best: list[tuple[int, float]] = []
    if top:
        values, ids = torch.topk(logprobs, min(top, logprobs.shape[-1]))
        best = list(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token_id, float(logprobs[token_id]), best)


class LogprobRecorder:
    """Each generated token's TokenLogprob, in order (`entries`), for a batch of one."""

    def __init__(self, top: int):
        self.top = top
        self.entries: list[TokenLogprob] = []
        self._last: Any = None  # the logits of the latest forward pass, (vocab,)

    @contextlib.contextmanager
    def hooked(self, model: Any) -> Iterator[None]:
        """Keep each forward pass's last-position logits while the block runs. The hook sits on the innermost
        model (under a peft wrapper), whose forward `generate` calls once per new token."""
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model

        def keep(module: Any, inputs: Any, output: Any) -> None:
            self._last = output.logits[0, -1].detach()

        handle = inner.register_forward_hook(keep)
        try:
            yield
        finally:
            handle.remove()

    def record(self, token_id: int) -> None:
        """The token just chosen from the latest logits."""
        self.entries.append(token_logprob(self._last, token_id, self.top))


def token_bytes(tokenizer: Any, token_id: int) -> bytes:
    """A token's own bytes: exact for byte-level BPE (GLM-4's, Qwen's, the tiny model's) and SentencePiece byte
    tokens (`<0xE4>`), where a token may hold part of a character; otherwise its decoded text's UTF-8."""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if isinstance(piece, str):
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            with contextlib.suppress(ValueError):
                return bytes([int(piece[3:5], 16)])
        decoder = _byte_decoder()
        if piece and all(c in decoder for c in piece) and _is_byte_level(tokenizer):
            return bytes(decoder[c] for c in piece)
    return tokenizer.decode([token_id]).encode("utf-8")


def token_text(tokenizer: Any, token_id: int) -> str:
    """A token as text: its bytes read as UTF-8, a partial character as OpenAI shows it (the bytes escaped)."""
    data = token_bytes(tokenizer, token_id)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "".join(f"\\x{b:02x}" if b >= 0x80 else chr(b) for b in data)


def _is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and "ByteLevel" in type(backend.decoder).__name__ + repr(backend.decoder)


_BYTE_DECODER: dict[str, int] = {}


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte."""
    if not _BYTE_DECODER:
        visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
        chars, extra = list(visible), 0
        for b in range(256):
            if b not in visible:
                visible.append(b)
                chars.append(256 + extra)
                extra += 1
        _BYTE_DECODER.update({chr(c): b for b, c in zip(visible, chars, strict=True)})
    return _BYTE_DECODER
