"""ChatGLM-6B/2/3 tokenizers whose plain encode is the official one, while their chat templates' markup stays
control tokens.

The official tokenizers (remote code) keep special-token text in a text as text: ChatGLM2/3 all of it ("[gMASK]",
"<|user|>", "</s>"), ChatGLM-6B all but the tokens transformers 4 registered as its special tokens ([MASK], <sop>,
<eop>, <pad>, <unk>, with the whitespace around them dropped). Their chat prompts are built as ids, never parsed.
A transformers tokenizer encodes the text a chat template renders with the same encode as any text, so one
tokenizer cannot do both (`split_special_tokens=True` gives the official plain encode but turns the template's
"[gMASK]<sop><|user|>" into text too). The gap this fills: plain encode (`encode`, `__call__`, `tokenize`) runs a
copy of the backend in which only the official tokens are parsed; `apply_chat_template` and glmtune's own encoding
(data/control.py, which reads `backend_tokenizer`) parse the template's markup with the backend itself, unchanged.

Saved with save_pretrained, the class name and `text_parsed_tokens` go to tokenizer_config.json and
glmtune's load_tokenizer restores them (`load_saved`). transformers alone does not know the class and loads the
same tokenizer.json as its generic tokenizer: the same ids for chat templates and ordinary text, with special-token
text in a plain encode parsed as those tokens, as serving stacks that render a template and then encode it need.
"""

from __future__ import annotations

import json
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from transformers import TokenizersBackend

from glmtune.artifacts import read_json_object

# The tokenizer (if any) that is inside apply_chat_template, or encoding a plain text, in this thread or task:
# context variables rather than attributes, so that one thread's chat encode does not change another's plain one.
_CHAT: ContextVar[Any] = ContextVar("glmtune_chat_encode", default=None)
_PLAIN: ContextVar[Any] = ContextVar("glmtune_plain_encode", default=None)


class ChatGLMOfficialTokenizer(TokenizersBackend):
    """A fast tokenizer with the official ChatGLM plain encode. Init kwarg `text_parsed_tokens`: the special tokens
    that a plain encode still parses (ChatGLM-6B's five; none for ChatGLM2/3)."""

    @property
    def _tokenizer(self) -> Any:
        return self._plain_backend() if _PLAIN.get() is self else self.__dict__["_markup_backend"]

    @_tokenizer.setter
    def _tokenizer(self, backend: Any) -> None:
        self.__dict__["_markup_backend"] = backend
        self.__dict__.pop("_plain", None)

    def _plain_backend(self) -> Any:
        """The backend with only `text_parsed_tokens` parsed: every other added token is made special and
        `encode_special_tokens` set, so that its text goes through the model as ordinary text. Rebuilt when tokens
        were added since."""
        backend = self.__dict__["_markup_backend"]
        size = backend.get_vocab_size(with_added_tokens=True)
        cached = self.__dict__.get("_plain")
        if cached is None or cached[0] != size:
            from tokenizers import Tokenizer

            parsed = set(self.init_kwargs.get("text_parsed_tokens") or ())
            state = json.loads(backend.to_str())
            for token in state["added_tokens"]:
                token["special"] = token["content"] not in parsed
                if token["content"] in parsed:  # transformers 4 stripped the whitespace around special tokens
                    token["lstrip"] = token["rstrip"] = True
            plain = Tokenizer.from_str(json.dumps(state))
            cached = self.__dict__["_plain"] = (size, plain)
        return cached[1]

    def _encode_plus(self, *args: Any, split_special_tokens: bool = False, **kwargs: Any) -> Any:
        if split_special_tokens or _CHAT.get() is self or kwargs.get("sanitize_control_tokens"):
            return super()._encode_plus(*args, split_special_tokens=split_special_tokens, **kwargs)
        context = _PLAIN.set(self)
        try:  # the plain backend, its special tokens (all but the parsed ones) as text
            return super()._encode_plus(*args, split_special_tokens=True, **kwargs)
        finally:
            _PLAIN.reset(context)

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        context = _CHAT.set(self)
        try:  # the template's markup, and only it (sanitize_control_tokens marks the users'), as control tokens
            return super().apply_chat_template(*args, **kwargs)
        finally:
            _CHAT.reset(context)


def load_saved(directory: Path) -> Any | None:
    """The tokenizer glmtune saved in `directory` (save_pretrained, as merge and convert do), else None."""
    config = directory / "tokenizer_config.json"
    if not (config.is_file() and (directory / "tokenizer.json").is_file()):
        return None
    if read_json_object(config, "tokenizer config").get("tokenizer_class") != ChatGLMOfficialTokenizer.__name__:
        return None
    return ChatGLMOfficialTokenizer.from_pretrained(str(directory))
