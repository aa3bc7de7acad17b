"""One training sample per assistant turn, for chat templates that write a turn differently in history than when
it is generated: GLM-4.5/4.6/4.7's keeps reasoning only in the turns after the last user message (so in the whole
conversation an earlier turn reads `<think></think>` + answer, which is not what the model generated there),
GLM-4.7's writes a turn without reasoning as `</think>` + answer after a prompt that opened `<think>`, and GLM-Z1's
drops reasoning from every turn while its prompt opens the think block.

Each sample is the conversation through one trained turn, that turn alone trained: the earlier turns as the
template writes history, then the turn as it is generated (templates.generated_turn: its generation prompt,
reasoning, answer, calls), then the stop token the template writes after it in the whole conversation (`<|user|>`
before the next question, `<|observation|>` before a tool's result), or the eos at the conversation's end.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from glmtune.data.control import mark_conversation, markup_only
from glmtune.data.conversation import Conversation
from glmtune.data.templates import RowNotRenderable, generated_turn, reasoning_form, render, trained_turns


def split_by_turn(tokenizer: Any, conversation: Conversation, stop_ids: list[int],
                  enable_thinking: bool | None = None) -> list[tuple[Conversation, int | None]] | None:
    """Each trained turn's sample and the stop token that follows it (None at the conversation's end, where the
    usual end token is appended); None when the conversation trains as one sample: a single trained turn, or a
    template whose rendering of the conversation holds every trained turn as it is generated."""
    if conversation.text is not None or reasoning_form(getattr(tokenizer, "chat_template", None)) is None:
        return None
    turns = trained_turns(conversation)
    if len(turns) < 2:
        return None
    # Marked (data/control.py), so that stop-token text inside the users' strings is not counted as markup.
    marked = mark_conversation(tokenizer, conversation)
    ending = turns[-1] + 1 == len(conversation.messages)
    try:
        generated = [generated_turn(tokenizer, marked, i, enable_thinking) for i in turns]
        whole = generated[-1].history if ending else render(tokenizer, marked, add_generation_prompt=False,
                                                            enable_thinking=enable_thinking)
    except RowNotRenderable:  # trained as one sample, which reports the row
        return None
    # As one sample, the text would end as its last turn is generated (templates.encode_for_training).
    text = generated[-1].prompt + generated[-1].text if ending else whole
    if all(text.startswith(turn.prompt + turn.text) for turn in generated):
        return None
    # The stop token after turn i: the whole conversation's stop tokens in order; as many of them come before it
    # as its own rendering holds (reasoning and think markup, all a turn's generation adds, hold none).
    stops = _stop_tokens(tokenizer, stop_ids)
    in_whole = _stops_in(markup_only(tokenizer, whole), stops)
    samples = []
    for i, turn in zip(turns, generated, strict=True):
        before = len(_stops_in(markup_only(tokenizer, turn.history), stops))
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
