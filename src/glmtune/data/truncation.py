"""--truncation left on one conversation: cut from its start and keep the trained answer whole.

First the untrained turns after the last trained answer go, then whole exchanges from the start (oldest first),
then the start of the prompt that remains is cut: the text of its messages, oldest first, the system prompt last.
The cut is made in the messages' text and the conversation rendered again, so the chat template still writes all
its own markup (GLM-4's `[gMASK]<sop>` stays first, the generation prompt stays before the answer) and the answer
is located and supervised as in any other row. A row whose answer does not fit even with its prompt's text all cut
is dropped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from glmtune.data.conversation import Conversation, Message
from glmtune.data.templates import RowNotRenderable

ANSWER_TOO_LONG = "answer alone longer than --max_seq_length (--truncation left)"

Encode = Callable[[Conversation], tuple[list[int], list[int]]]


def cut_left(tokenizer: Any, encode: Encode, conversation: Conversation, limit: int, ids: list[int],
             labels: list[int]) -> tuple[list[int], list[int], str]:
    """(input_ids, labels, why the row is dropped or "") of a conversation encoded as (ids, labels), cut to `limit`
    tokens from its start."""
    _, ids, labels, dropped = shorten_left(tokenizer, encode, conversation, limit, ids, labels)
    return ids, labels, dropped


def shorten_left(tokenizer: Any, encode: Encode, conversation: Conversation, limit: int, ids: list[int],
                 labels: list[int]) -> tuple[Conversation, list[int], list[int], str]:
    """cut_left's result with the shortened conversation it encoded, for callers that render it again in another
    way (a preference pair: its two answers, `encode` giving the longer one's sequence)."""
    if conversation.text is not None:  # plain text: keep its end
        return conversation, ids[-limit:], labels[-limit:], ""
    messages = conversation.messages
    trained = [i for i, m in enumerate(messages) if m.role == "assistant" and m.train]
    last = trained[-1] if trained else len(messages) - 1
    starts = [0] + [i for i, m in enumerate(messages) if m.role == "user" and 0 < i < last]
    for start in starts:
        window = dataclasses.replace(conversation, messages=messages[start: last + 1])
        if window.messages != messages:
            ids, labels = encode(window)
        if len(ids) <= limit:
            return window, ids, labels, ""
    return _cut_prompt_start(tokenizer, encode, window, limit, ids, labels)


def _cut_prompt_start(tokenizer: Any, encode: Encode, conversation: Conversation, limit: int, ids: list[int],
                      labels: list[int]) -> tuple[Conversation, list[int], list[int], str]:
    """The conversation with the start of its prompt's text cut until it fits: each message before the answer in
    turn, oldest first (calls stay whole: their text is the call), then the system prompt."""
    pieces: list[int | None] = [i for i, m in enumerate(conversation.messages[:-1]) if not m.calls()]
    for piece in [*pieces, None]:  # None: the system prompt
        while len(ids) > limit:
            text = conversation.system if piece is None else conversation.messages[piece].content
            if not text:
                break
            rest = text[_chars_of_first_tokens(tokenizer, text, len(ids) - limit):]
            conversation = _with_text(conversation, piece, rest)
            try:
                ids, labels = encode(conversation)
            except RowNotRenderable as problem:  # e.g. a template that refuses a message emptied by the cut
                return conversation, [], [], problem.reason
        if len(ids) <= limit:
            return conversation, ids, labels, ""
    return conversation, [], [], ANSWER_TOO_LONG


def _with_text(conversation: Conversation, piece: int | None, text: str) -> Conversation:
    if piece is None:
        return dataclasses.replace(conversation, system=text or None)
    messages: list[Message] = list(conversation.messages)
    messages[piece] = dataclasses.replace(messages[piece], content=text)
    return dataclasses.replace(conversation, messages=messages)


def _chars_of_first_tokens(tokenizer: Any, text: str, count: int) -> int:
    """How many characters of `text` its first `count` tokens take (at least one; all of it when it has fewer).
    Tokenized alone the text may split a little differently than in the whole conversation: the caller encodes
    again and cuts more if needed."""
    if tokenizer.is_fast:
        offsets = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).offsets
        return len(text) if count >= len(offsets) else max(1, offsets[count][0])
    tokens = tokenizer.encode(text, add_special_tokens=False)  # slow tokenizers give no offsets
    return len(text) if count >= len(tokens) else max(1, len(tokenizer.decode(tokens[:count])))
