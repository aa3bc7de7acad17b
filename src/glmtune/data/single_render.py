"""A conversation whose only trained answer is its last message, located from one rendering of the whole.

templates.training_text finds an answer where its generation prompt ends, which takes two renderings (the prompt
alone, then the whole conversation): the two were half of prepare's time per row, where a plain loop renders once.
Most templates write an assistant turn as its generation prompt, a fixed piece, the answer's text and a fixed end,
after a history they write the same whichever message follows. Such a template's prompt is then the whole rendering
less that fixed piece, the answer and the end. Whether a template writes turns so is read once per template,
thinking switch and system prompt or not, from its own output on probe conversations (never from a list of model
families); each row must then end with exactly that piece, its answer and that end, after the generation prompt.
Any other template, row or option takes templates.training_text (the reference this agrees with: ids, labels and
dataset features are the same on 160 prepared configurations, bench/prepare_equivalence.py).
"""

from __future__ import annotations

import weakref
from typing import Any

from glmtune.data.conversation import Conversation, Message
from glmtune.data.templates import RowNotRenderable, TrainingText, render, trained_turns
from glmtune.errors import UserError


def training_text_once(tokenizer: Any, marked: Conversation, enable_thinking: bool | None = None
                       ) -> TrainingText | None:
    """templates.training_text of a marked conversation (control.mark_conversation) from one rendering, or None where
    that isn't shown to be the same: a conversation with tools, tool calls, reasoning, an empty last answer or more
    than one trained turn, a template that fails the probes, a row that doesn't end as the probes' answers do."""
    messages = marked.messages
    if marked.text is not None or marked.tools or not messages:
        return None
    last = messages[-1]
    if last.role != "assistant" or not last.train or not last.content.strip():
        return None  # (an empty answer: GLM-4's template writes nothing for it, the reference refuses the row)
    if any(m.tool_call is not None or m.reasoning or m.role not in ("user", "assistant") for m in messages):
        return None
    if trained_turns(marked) != [len(messages) - 1]:
        return None
    form = _turn_form(tokenizer, enable_thinking, bool(marked.system))
    if form is None:
        return None
    generation_prompt, opening, closing = form
    try:
        text = render(tokenizer, marked, add_generation_prompt=False, enable_thinking=enable_thinking)
    except RowNotRenderable:  # the reference renders the prompt first and reports its refusal
        return None
    turn = opening + last.content + closing
    start = len(text) - len(turn)
    # (start - len(...) >= 0 first: a negative start would make startswith look from the text's end)
    if not (text.endswith(turn) and start >= len(generation_prompt)
            and text.startswith(generation_prompt, start - len(generation_prompt))):
        return None
    return TrainingText(text, [(start, len(text))])


# The answers the probes write: two, so that the pieces around an answer are shown not to depend on its text.
_ANSWERS = ("glmtune probe answer", "glmtune\nsecond probe answer, longer")
_FORMS: weakref.WeakKeyDictionary[Any, dict[Any, tuple[str, str, str] | None]] = weakref.WeakKeyDictionary()


def _turn_form(tokenizer: Any, enable_thinking: bool | None, system: bool) -> tuple[str, str, str] | None:
    """(the generation prompt, what the template writes between it and a last answer, what after the answer) where
    on every probe the template renders: the prompt as its history plus the same generation prompt; the whole as
    the prompt, the opening piece, the answer and the closing piece; the same pieces for each probe. None otherwise.
    Probes: one question, and a question after a first exchange; with a system prompt where `system`."""
    key = (tokenizer.chat_template, enable_thinking, system)
    kept = _FORMS.setdefault(tokenizer, {})
    if key not in kept:
        kept[key] = _probe(tokenizer, enable_thinking, system)
    return kept[key]


def _probe(tokenizer: Any, enable_thinking: bool | None, system: bool) -> tuple[str, str, str] | None:
    exchange = [Message("user", "glmtune probe question"), Message("assistant", "glmtune probe reply")]
    forms = set()
    for earlier in ([], exchange):
        for answer in _ANSWERS:
            prompt = Conversation(messages=[*earlier, Message("user", "glmtune probe last question")],
                                  system="glmtune probe system" if system else None)
            whole = Conversation(messages=[*prompt.messages, Message("assistant", answer, train=True)],
                                 system=prompt.system)
            try:
                history = render(tokenizer, prompt, add_generation_prompt=False, enable_thinking=enable_thinking)
                asked = render(tokenizer, prompt, add_generation_prompt=True, enable_thinking=enable_thinking)
                text = render(tokenizer, whole, add_generation_prompt=False, enable_thinking=enable_thinking)
            except UserError:  # (RowNotRenderable among them) a template that refuses a probe: the reference decides
                return None
            if not (asked.startswith(history) and text.startswith(asked)) or text.count(answer) != 1 \
                    or answer not in text[len(asked):]:
                return None
            opening, closing = text[len(asked):].split(answer)
            forms.add((asked[len(history):], opening, closing))
    return forms.pop() if len(forms) == 1 else None
