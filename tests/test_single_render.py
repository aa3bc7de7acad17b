"""prepare locates a conversation's only trained answer, its last message, from one rendering of the whole where the
template's own output shows that the prompt is the whole less a fixed piece, the answer and a fixed end
(data/single_render.py), and otherwise takes the reference (templates.training_text: the prompt rendered too).
Asserted on real rows and forged ones with the shipped GLM tokenizers, the official GLM-4.6 template and small
templates like GLM-4.7's, GLM-Z1's and GLM-4-0414's: wherever the one rendering is taken it gives the reference's
text and answer spans, and it is taken for the plain rows of the templates that write turns so."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
from conftest import GLM4_0414_LIKE, GLM47_LIKE, Z1_LIKE

from glmtune.data.control import mark_conversation
from glmtune.data.conversation import Conversation, Message
from glmtune.data.prepare import load_data
from glmtune.data.single_render import training_text_once
from glmtune.data.templates import training_text

FILES = ("alpaca/alpaca_zh_demo.json", "multiturn/v1_sft_demo.jsonl", "multiturn/dummy_conversation.json",
         "multiturn/glaive_toolcall_zh_demo.json")
ROWS = 25  # of each file
# A template that writes the last question otherwise when the model is asked it: its prompt is no prefix of the whole.
ASKED_OTHERWISE = ("{% for m in messages %}{% if m.role == 'user' %}<|user|>\n{{ m.content }}"
                   "{% if loop.last %} (answer now){% endif %}{% else %}<|assistant|>\n{{ m.content }}{% endif %}"
                   "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
# A template that trims answers: the probes pass, an answer with spaces around it is written otherwise.
TRIMS = ASKED_OTHERWISE.replace("{% if loop.last %} (answer now){% endif %}", "").replace(
    "<|assistant|>\n{{ m.content }}", "<|assistant|>\n{{ m.content | trim }}")


def _rows(shared_dir) -> list[Conversation]:
    rows = []
    for name in FILES:
        rows += load_data([str(shared_dir / "data" / name)], None, skip_bad_rows=True).conversations[:ROWS]
    asked = [Message("user", "hi <|assistant|> [gMASK]<sop> <|user|>")]
    answers = ("ok <|user|> <|endoftext|>", "  spaced  ", "", "x</think>y")
    rows += [Conversation(messages=[*asked, Message("assistant", answer, train=True)], system=system)
             for answer in answers for system in (None, "Be brief.")]
    # Each row also with its last answer alone trained (--last_turn_only), where the one rendering applies.
    return rows + [dataclasses.replace(row, messages=[dataclasses.replace(m, train=m.train and m is row.messages[-1])
                                                      for m in row.messages]) for row in rows]


@pytest.fixture(scope="module")
def tokenizers(shared_dir, glm45_tokenizer_dir):
    from glmtune.models.loading import load_tokenizer

    return SimpleNamespace(**{name: load_tokenizer(str(shared_dir / "tokenizers" / name)) for name in
                              ("glm-4-9b-chat", "chatglm3-6b", "chatglm2-6b", "chatglm-6b")},
                           glm45=load_tokenizer(str(glm45_tokenizer_dir)), rows=_rows(shared_dir))


CASES = {  # case: (tokenizer, template (None: its own), thinking switch, whether plain rows take the one rendering)
    "glm-4-9b-chat": ("glm-4-9b-chat", None, None, True), "chatglm3-6b": ("chatglm3-6b", None, None, True),
    "chatglm2-6b": ("chatglm2-6b", None, None, True), "chatglm-6b": ("chatglm-6b", None, None, True),
    "glm-4.6": ("glm45", None, None, True), "glm-4.6-thinking-off": ("glm45", None, False, True),
    "glm-4.7-like": ("glm45", GLM47_LIKE, None, False), "glm-4.7-like-thinking-off": ("glm45", GLM47_LIKE, False, True),
    "glm-z1-like": ("glm45", Z1_LIKE, None, False), "glm-4-0414-like": ("glm45", GLM4_0414_LIKE, None, True),
    "asks-otherwise": ("glm-4-9b-chat", ASKED_OTHERWISE, None, False), "trims": ("glm-4-9b-chat", TRIMS, None, True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_rendering_locates_the_answer_as_the_reference_does(tokenizers, case):
    name, template, enable_thinking, taken = CASES[case]
    tokenizer = getattr(tokenizers, name)
    own = tokenizer.chat_template
    tokenizer.chat_template = template or own  # (every cache involved is keyed by the template's text)
    try:
        once = 0
        for row in tokenizers.rows:
            located = training_text_once(tokenizer, mark_conversation(tokenizer, row), enable_thinking)
            if located is None:
                continue
            once += 1
            assert located == training_text(tokenizer, row, enable_thinking), row
    finally:
        tokenizer.chat_template = own
    plain = sum(len(row.messages) == 2 and row.messages[-1].content.strip() != "" for row in tokenizers.rows)
    assert (once > plain // 2) == taken  # taken for most plain rows, or never


@pytest.mark.parametrize("answer", ["", " ", "  spaced  "])
def test_an_empty_answer_or_one_written_otherwise_takes_the_reference(tokenizers, answer):
    tokenizer = tokenizers.__dict__["glm-4-9b-chat"]
    own = tokenizer.chat_template
    tokenizer.chat_template = TRIMS
    try:
        row = Conversation(messages=[Message("user", "hi"), Message("assistant", answer, train=True)])
        assert training_text_once(tokenizer, mark_conversation(tokenizer, row)) is None
        if answer.strip():  # the reference locates the trimmed answer
            assert training_text(tokenizer, row).text.endswith("<|assistant|>\nspaced")
    finally:
        tokenizer.chat_template = own
