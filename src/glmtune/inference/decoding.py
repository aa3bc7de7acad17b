"""Generated ids -> the answer's text, keeping the markers that the answer splitter reads.

GLM-4.5's `<think>`, `<tool_call>`, `<arg_key>`... are special tokens, so decoding with skip_special_tokens (as
generation output usually is) would erase the structure of the answer. Here every other special token (stop
tokens, role tokens, padding) is still left out, and an answer that holds no marker decodes exactly as before.
`<|assistant|>` is kept too: ChatGLM3 and GLM-4 begin each further segment of one answer (a second call, a call
after text) with it.
"""

from __future__ import annotations

from typing import Any

MARKERS = frozenset({"<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>",
                     "</arg_value>", "<|assistant|>"})


class AnswerDecoder:
    """`decode(ids)` as the tokenizer's, with the markers kept; a stand-in for the tokenizer where only decode is
    called (transformers' streamers)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        special = {i for i, token in added.items() if getattr(token, "special", False)}
        special |= set(getattr(tokenizer, "all_special_ids", None) or [])
        self.marker_ids = {i for i, token in added.items() if getattr(token, "content", str(token)) in MARKERS}
        self.dropped_ids = special - self.marker_ids

    def decode(self, ids: Any, **_: Any) -> str:
        ids = [ids] if isinstance(ids, int) else list(ids)
        if not self.marker_ids.intersection(ids):
            return self.tokenizer.decode(ids, skip_special_tokens=True)
        return self.tokenizer.decode([i for i in ids if i not in self.dropped_ids], skip_special_tokens=False)
