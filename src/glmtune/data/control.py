"""Text from users never becomes control tokens: a row's or a request's "<|user|>", "[gMASK]", "<think>" ... is
encoded as ordinary text; only the chat template's own markup gives control tokens (else a `serve` user could forge
turns, and a data row could teach the model turns that are not there).

The library's part: transformers' `apply_chat_template(sanitize_control_tokens=True)` wraps the control tokens of
every input string in private-use markers (`mark_control_tokens`), renders, and encodes the marked tokens as text
(`encode_marked_chat`). Its control tokens are the tokenizer's special tokens and the added tokens the template
writes: for every GLM tokenizer, all its added tokens. The gap this fills: training locates answers by character in
the rendered text and needs each token's character offset, which that path does not give. Here: the same marking
(on a whole Conversation, before glmtune adds markup of its own such as `<think>` blocks) and the same encoding, with
offsets; the ids equal apply_chat_template's with sanitize_control_tokens=True (tests/test_control_tokens.py).
"""

from __future__ import annotations

import dataclasses
import re
import weakref
from collections.abc import Sequence
from typing import Any, NamedTuple

from glmtune.data.conversation import Conversation, Message


def mark_conversation(tokenizer: Any, conversation: Conversation) -> Conversation:
    """The conversation with the control tokens in all its strings (system, messages, reasoning, calls, tool
    definitions) wrapped in markers, for `render` and then `encode_marked`; the conversation itself (not a copy) where
    there is nothing to mark. (A plain-text row has no template: its text is the user's own sequence, encoded as the
    tokenizer encodes any text.)"""
    from transformers.utils.chat_template_utils import mark_control_tokens

    if _plain_strings_only(tokenizer, conversation):
        return conversation  # (most rows: marking would copy each string unchanged, a tenth of prepare's time)
    control, _ = _control_patterns(tokenizer)[0]

    def mark(value: Any) -> Any:  # strings, and the strings inside lists and dicts (not their keys); None as it is
        return mark_control_tokens(value, control)

    messages = [Message(m.role, mark(m.content), m.train, mark(m.tool_call), mark(m.reasoning), mark(m.tool_call_id))
                for m in conversation.messages]
    return dataclasses.replace(conversation, messages=messages, system=mark(conversation.system),
                               tools=mark(conversation.tools))


def _plain_strings_only(tokenizer: Any, conversation: Conversation) -> bool:
    """Whether marking would leave the conversation as it is: no tool definitions or calls (nested values, marked
    the long way), and no string holding a control token or a marker (which marking drops, mark_control_tokens)."""
    if conversation.tools is not None or any(m.tool_call is not None for m in conversation.messages):
        return False
    first, unmarked = _patterns_of(tokenizer).unmarked
    strings = [conversation.system, *(s for m in conversation.messages for s in (m.content, m.reasoning,
                                                                                m.tool_call_id))]
    return not any(first.search(s) and unmarked.search(s) for s in strings if isinstance(s, str))


def _unmarked_patterns(control: tuple[str, ...]) -> tuple[Any, Any]:
    """(a character that starts one of the `control` tokens or is a marker, one of the tokens or a marker). The first
    is searched first: a class of characters is found several times faster than a choice of a hundred tokens, and
    most texts hold none of them (GLM-4's tokens start with "<" or "[")."""
    from transformers.utils.chat_template_utils import _CONTROL_TOKEN_END, _CONTROL_TOKEN_START

    markers = _CONTROL_TOKEN_START + _CONTROL_TOKEN_END
    starts = sorted({token[0] for token in control if token} | set(markers))
    return (re.compile("[" + "".join(re.escape(c) for c in starts) + "]"),
            re.compile(f"{_patterns(control)[0].pattern}|[{markers}]"))


def encode_marked(tokenizer: Any, text: str) -> tuple[list[int], list[int]]:
    """(ids, the character in `text` where each token starts) of a text rendered from a marked conversation: the
    marked tokens as text, the rest (the template's markup and the users' other text) with the tokenizer's added
    tokens, as transformers' encode_marked_chat: the text before the first marker in one piece, each later piece
    encoded after a newline that is then dropped (so that SentencePiece adds no dummy prefix inside a text).
    The ids of a marked token all start where its marker does (no answer begins or ends inside one)."""
    pieces = _pieces(tokenizer, text)
    if not tokenizer.is_fast:  # slow tokenizers give no offsets: each piece's tokens start where it does
        ids, starts = [], []
        for i, (start, piece, as_text) in enumerate(pieces):
            piece_ids = _encode_slow(tokenizer, piece, as_text, after_newline=i > 0)
            ids, starts = ids + piece_ids, starts + [start] * len(piece_ids)
        return ids, starts
    backend = tokenizer.backend_tokenizer
    splitting = backend.encode_special_tokens
    backend.encode_special_tokens = False  # the markup's special tokens are parsed, whatever a last call left set
    try:
        # Only a text with markers has later pieces (most rows have none: one encode call then).
        newline = backend.encode("\n", add_special_tokens=False).ids if len(pieces) > 1 else None
        ids, starts = [], []
        for i, (start, piece, as_text) in enumerate(pieces):
            piece_ids, piece_starts = _encode_fast(tokenizer, piece, as_text, newline if i > 0 else None)
            ids += piece_ids
            starts += [start] * len(piece_ids) if as_text else [start + s for s in piece_starts]
        return ids, starts
    finally:
        backend.encode_special_tokens = splitting


def encode_marked_batch(tokenizer: Any, texts: list[str]) -> list[tuple[list[int], Sequence[int]]]:
    """`encode_marked` of each text. With a fast tokenizer the texts without markers (nearly all: users rarely write
    control tokens) are encoded in one call of the tokenizers library, and their tokens' starts are read from the
    encoding only where asked (bisect reads a few of them): converting every token's offset into a Python list cost
    more than the encoding itself (alpaca_9k with GLM-4's tokenizer: 8.5 s against 4 s)."""
    if not tokenizer.is_fast:
        return [encode_marked(tokenizer, text) for text in texts]
    _, markers_re = _control_patterns(tokenizer)[1]
    plain = [i for i, text in enumerate(texts) if markers_re.search(text) is None]  # one piece, encoded whole
    backend = tokenizer.backend_tokenizer
    splitting = backend.encode_special_tokens
    backend.encode_special_tokens = False  # as in encode_marked
    try:
        encodings = backend.encode_batch([texts[i] for i in plain], add_special_tokens=False) if plain else []
    finally:
        backend.encode_special_tokens = splitting
    results: list[tuple[list[int], Sequence[int]] | None] = [None] * len(texts)
    for i, encoding in zip(plain, encodings, strict=True):
        results[i] = (encoding.ids, _TokenStarts(encoding))
    return [result if result is not None else encode_marked(tokenizer, texts[i]) for i, result in enumerate(results)]


class _TokenStarts(Sequence[int]):
    """The character where each token of an encoding starts, read one token at a time (by bisect: indices from 0 to
    len - 1, no slices)."""

    def __init__(self, encoding: Any):
        self._encoding = encoding

    def __len__(self) -> int:
        return len(self._encoding)

    def __getitem__(self, k: Any) -> Any:
        if not 0 <= k < len(self._encoding):  # iteration and `in` stop at the IndexError
            raise IndexError(k)
        return self._encoding.token_to_chars(k)[0]


def markup_only(tokenizer: Any, text: str) -> str:
    """A marked rendering without the users' control-token text: what remains holds only the template's own."""
    return "".join(piece for _, piece, as_text in _pieces(tokenizer, text) if not as_text)


def _patterns(tokens: tuple[str, ...]) -> tuple[Any, Any]:
    """(a regex of the tokens, a regex of a marked one or a lone marker): transformers' own, a private helper of its
    sanitize_control_tokens, whose behaviour the tests pin by comparing with apply_chat_template."""
    from transformers.utils.chat_template_utils import _get_control_token_patterns

    return _get_control_token_patterns(tokens)


class _Patterns(NamedTuple):
    built_from: tuple[Any, ...]  # the template, control list and vocabulary size they were built for
    control: tuple[Any, Any]  # _patterns of the tokens marked in users' strings
    added: tuple[Any, Any]  # _patterns of every added token
    unmarked: tuple[Any, Any]  # _unmarked_patterns of the control tokens


# Per tokenizer. Listing the control tokens costs about 0.2-0.4 ms (transformers reads the template's literal text
# each time), more than rendering a short row; a tokenizer whose template, control list or added tokens change gets
# new patterns.
_PATTERNS: weakref.WeakKeyDictionary[Any, _Patterns] = weakref.WeakKeyDictionary()


def _patterns_of(tokenizer: Any) -> _Patterns:
    control_list = getattr(tokenizer, "chat_control_tokens", None)
    # __len__ called as an attribute: a wrapper that forwards attributes (tests' slow view) has no len().
    built_from = (tokenizer.chat_template, tuple(control_list) if control_list is not None else None,
                  tokenizer.__len__())
    kept = _PATTERNS.get(tokenizer)
    if kept is None or kept.built_from != built_from:
        control = tuple(tokenizer._get_control_tokens(tokenizer.chat_template))
        kept = _Patterns(built_from, _patterns(control), _patterns(tuple(tokenizer.added_tokens_encoder)),
                         _unmarked_patterns(control))
        _PATTERNS[tokenizer] = kept
    return kept


def _control_patterns(tokenizer: Any) -> tuple[tuple[Any, Any], tuple[Any, Any]]:
    """(the patterns of the tokens marked in users' strings, the patterns of every added token) of this tokenizer."""
    kept = _patterns_of(tokenizer)
    return kept.control, kept.added


def _pieces(tokenizer: Any, text: str) -> list[tuple[int, str, bool]]:
    """(start, text, whether it is a marked token) of each piece between markers; a lone marker (a template's string
    method split a marked token) is dropped but still separates the text on either side, as in transformers."""
    _, markers_re = _control_patterns(tokenizer)[1]
    pieces, position = [], 0
    for match in markers_re.finditer(text):
        if position == 0 or match.start() > position:
            pieces.append((position, text[position: match.start()], False))
        if match.group(1):
            pieces.append((match.start(), match.group(1), True))
        position = match.end()
    if position == 0 or position < len(text):
        pieces.append((position, text[position:], False))
    return pieces


def _encode_fast(tokenizer: Any, piece: str, as_text: bool, newline: list[int] | None) -> tuple[list[int], list[int]]:
    """A piece's ids and their start offsets in the piece; after a newline that is dropped when `newline` is given."""
    if as_text:
        if newline is not None:
            ids = tokenizer._encode_without_added_tokens("\n" + piece)
            if ids[: len(newline)] == newline:
                return ids[len(newline):], []
        return tokenizer._encode_without_added_tokens(piece), []
    backend = tokenizer.backend_tokenizer
    if newline is not None:
        encoding = backend.encode("\n" + piece, add_special_tokens=False)
        if encoding.ids[: len(newline)] == newline:
            return encoding.ids[len(newline):], [max(0, a - 1) for a, _ in encoding.offsets[len(newline):]]
    encoding = backend.encode(piece, add_special_tokens=False)
    return encoding.ids, [a for a, _ in encoding.offsets]


def _encode_slow(tokenizer: Any, piece: str, as_text: bool, after_newline: bool) -> list[int]:
    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False, split_special_tokens=as_text)

    if after_newline:
        newline, ids = encode("\n"), encode("\n" + piece)
        if ids[: len(newline)] == newline:
            return ids[len(newline):]
    return encode(piece)
