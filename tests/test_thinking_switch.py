"""--enable_thinking reaches a chat template that has the switch, and a template without it refuses the flag."""

from __future__ import annotations

from pathlib import Path

import pytest

from glmtune.data.conversation import Conversation, Message
from glmtune.data.templates import render
from glmtune.errors import UserError

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "templates" / "glm-4.6.jinja"


@pytest.fixture()
def thinking_tokenizer(tiny_model):
    if not REFERENCE.is_file():
        pytest.skip(f"{REFERENCE} is absent (../shared)")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = REFERENCE.read_text(encoding="utf-8")
    return tokenizer


def test_thinking_off_renders_nothink_and_the_empty_think_block(thinking_tokenizer):
    question = Conversation(messages=[Message(role="user", content="2+2?")])
    off = render(thinking_tokenizer, question, add_generation_prompt=True, enable_thinking=False)
    on = render(thinking_tokenizer, question, add_generation_prompt=True, enable_thinking=True)
    default = render(thinking_tokenizer, question, add_generation_prompt=True)
    assert "/nothink" in off and off.endswith("<think></think>")
    assert "/nothink" not in on and not on.endswith("</think>")
    assert default == on  # the template thinks unless told not to


def test_a_template_without_the_switch_refuses_the_flag(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    question = Conversation(messages=[Message(role="user", content="2+2?")])
    assert render(tokenizer, question, add_generation_prompt=True)  # renders without the flag
    with pytest.raises(UserError, match="has no thinking switch"):
        render(tokenizer, question, add_generation_prompt=True, enable_thinking=False)
