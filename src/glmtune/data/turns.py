"""One training sample per assistant turn, for chat templates that write a turn differently in history than when
it is generated: GLM-4.5/4.6/4.7's keeps reasoning only in the turns after the last user message, so in the whole
conversation an earlier turn reads `<think></think>` + answer, which is not what the model generated there.

Each sample is the conversation through one trained turn, that turn alone trained: the earlier turns as the
template writes history, then the turn as it is generated (its generation prompt, reasoning, answer, calls), then
the stop token the template writes after it in the whole conversation (`<|user|>` before the next question,
`<|observation|>` before a tool's result), or the eos at the conversation's end.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from glmtune.data.control import mark_conversation, markup_only
from glmtune.data.conversation import Conversation
from glmtune.data.templates import reasoning_form, render, trained_turns


def split_by_turn(tokenizer: Any, conversation: Conversation, stop_ids: list[int],
                  enable_thinking: bool | None = None) -> list[tuple[Conversation, int | None]] | None:
    """Each trained turn's sample and the stop token that follows it (None at the conversation's end, where the
    usual end token is appended); None when the conversation trains as one sample: no reasoning, a single trained
    turn, or a template whose history writes every turn as it was generated."""
    if conversation.text is not None or reasoning_form(getattr(tokenizer, "chat_template", None)) is None:
        return None
    turns = trained_turns(conversation)
    if len(turns) < 2 or not any(m.reasoning for m in conversation.messages):
        return None
    # Marked (data/control.py), so that stop-token text inside the users' strings is not counted as markup.
    marked = mark_conversation(tokenizer, conversation)
    whole = render(tokenizer, marked, add_generation_prompt=False, enable_thinking=enable_thinking)
    throughs = [render(tokenizer, marked.upto(i + 1), add_generation_prompt=False,
                       enable_thinking=enable_thinking) for i in turns]
    if all(whole.startswith(through) for through in throughs):
        return None
    # The stop token after turn i: the whole conversation's stop tokens in order; as many of them come before it
    # as its own rendering holds (reasoning, the only thing history drops, holds none).
    stops = _stop_tokens(tokenizer, stop_ids)
    in_whole = _stops_in(markup_only(tokenizer, whole), stops)
    samples = []
    for i, through in zip(turns, throughs, strict=True):
        before = len(_stops_in(markup_only(tokenizer, through), stops))
        following = in_whole[before] if i + 1 < len(conversation.messages) and before < len(in_whole) else None
        messages = [dataclasses.replace(m, train=k == i) for k, m in enumerate(conversation.messages[: i + 1])]
        samples.append((dataclasses.replace(conversation, messages=messages), following))
    return samples


def _stop_tokens(tokenizer: Any, stop_ids: list[int]) -> dict[str, int]:
    """The stop ids that are added tokens (role tokens, the eos), as the text a template writes for them."""
    added = tokenizer.get_added_vocab()
    return {token: i for token, i in added.items() if i in stop_ids}


def _stops_in(text: str, stops: dict[str, int]) -> list[int]:
    if not stops:
        return []
    pattern = "|".join(re.escape(token) for token in sorted(stops, key=len, reverse=True))
    return [stops[match.group()] for match in re.finditer(pattern, text)]
