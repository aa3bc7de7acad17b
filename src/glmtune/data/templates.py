"""One renderer for training and inference: conversation -> token ids (+ labels) through the tokenizer's own
chat template (`apply_chat_template`), so that what the model is trained on and what it is asked at inference
agree token for token.

The gap this fills: `apply_chat_template` renders text, but says neither where each answer starts in tokens
nor which token ends it. Here the supervised span of an assistant turn starts exactly where the rendered
generation prompt ends (GLM-4's template writes "<|assistant|>\n" in history but "<|assistant|>" as the
generation prompt, so that newline belongs to the answer), and it ends with a token that generation stops on,
so the tuned model stops. A conversation that ends on a trained turn ends as the model generates that turn
(`generated_turn`), which is not always how the template writes it in history (GLM-4.7, GLM-Z1).
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import json
import os
import re
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from glmtune.data.control import encode_marked, encode_marked_batch, mark_conversation
from glmtune.data.conversation import Conversation, Message
from glmtune.errors import MAX_PROBLEMS, UserError

IGNORE_INDEX = -100  # label of a token that takes no loss (transformers' convention)


class RowNotRenderable(UserError):
    """A conversation this template can't render for training; `reason` says why in a few words (the report
    counts rows by it), without the row's location."""

    def __init__(self, message: str, reason: str, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.reason = reason


class AnswerNotLocated(RowNotRenderable):
    """The template renders a conversation's prefix as something other than a prefix of the whole, so an answer
    can't be located: always for some templates, for others only with some content (GLM-4's writes nothing for
    an empty message)."""


def render(tokenizer: Any, conversation: Conversation, add_generation_prompt: bool,
           enable_thinking: bool | None = None) -> str:
    """The conversation as the tokenizer's chat template writes it (with the generation prompt when asked).

    Args:
        enable_thinking: the template's thinking switch (--enable_thinking); None leaves the template's default.
    Raises:
        UserError: no chat template, or a thinking switch the template does not have.
        RowNotRenderable: the template refused the conversation.
    """
    from jinja2 import TemplateError

    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"the tokenizer of {tokenizer.name_or_path} has no chat template",
                        hint="use a chat model, or a tokenizer directory whose tokenizer_config.json or "
                             "chat_template.jinja defines one")
    try:
        messages, extra = chat_inputs(tokenizer.chat_template, conversation)
        switch = thinking_switch(tokenizer, enable_thinking)
        key = _render_key(tokenizer.chat_template, messages, extra, add_generation_prompt, switch)
        kept = _RENDERED.setdefault(tokenizer, OrderedDict())
        text = kept.get(key)
        if text is None:
            text = _apply_chat_template(tokenizer, messages, extra, add_generation_prompt, switch)
            kept[key] = text
            while len(kept) > _RENDERED_KEPT:
                kept.popitem(last=False)
        return text
    except TemplateError as e:  # templates refuse what their model can't take (e.g. a system message)
        where = f"{conversation.location}: " if conversation.location else ""
        raise RowNotRenderable(f"{where}the chat template of {tokenizer.name_or_path} refused this conversation: "
                               f"{e}", reason=f"refused by the chat template ({e})",
                               hint="change the data (for example drop the system prompt), or use another model"
                               ) from None


def _apply_chat_template(tokenizer: Any, messages: list[dict[str, Any]], extra: dict[str, Any],
                         add_generation_prompt: bool, switch: dict[str, bool]) -> str:
    """apply_chat_template(tokenize=False), directly where `renders_directly` says it may (render_directly)."""
    if not extra and renders_directly(tokenizer, messages):
        return render_directly(tokenizer, messages, add_generation_prompt, switch)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **extra, **switch)


def renders_directly(tokenizer: Any, messages: list[dict[str, Any]]) -> bool:
    """Whether apply_chat_template would hand these messages to the template as they are: messages of plain text
    alone (role and content strings, nothing else: most training rows), no tools, and a tokenizer that renders as
    transformers does (its class doesn't override apply_chat_template, or is glmtune's ChatGLM tokenizer, whose
    override changes only how the text is then encoded)."""
    return bool(messages) and _renders_as_transformers(type(tokenizer)) and all(
        message.keys() == _PLAIN_KEYS and type(message["role"]) is str and type(message["content"]) is str
        for message in messages)


def render_directly(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool,
                    switch: dict[str, bool]) -> str:
    """What apply_chat_template(tokenize=False) renders from plain messages (renders_directly): its compiled
    template called with the variables it passes, past the copies and checks that leave such messages as they are
    (more than half of a short row's rendering). The two agree on every tokenizer the tests have
    (tests/test_direct_render.py)."""
    from transformers.utils.chat_template_utils import _compile_jinja_template, _plain_template_data

    variables = _plain_template_data({**tokenizer.special_tokens_map, **switch})  # (apply_chat_template's own)
    return _compile_jinja_template(tokenizer.get_chat_template()).render(
        messages=[dict(message) for message in messages], tools=None, documents=None,
        add_generation_prompt=add_generation_prompt, **variables)


_PLAIN_KEYS = {"role", "content"}


@functools.lru_cache(maxsize=16)
def _renders_as_transformers(tokenizer_class: type) -> bool:
    from transformers import PreTrainedTokenizerBase

    from glmtune.models.chatglm.official_encode import ChatGLMOfficialTokenizer

    method = getattr(tokenizer_class, "apply_chat_template", None)  # (None: a wrapper that forwards attributes)
    return method is PreTrainedTokenizerBase.apply_chat_template or \
        method is ChatGLMOfficialTokenizer.apply_chat_template


# A row's prefixes are rendered twice, by split_by_turn (data/turns.py: does the row need splitting?) and then by
# encode_for_training for the sample(s): the last renderings per tokenizer are kept, keyed by all the template reads.
_RENDERED: weakref.WeakKeyDictionary[Any, OrderedDict[Any, str]] = weakref.WeakKeyDictionary()
_RENDERED_KEPT = 64


def _render_key(template: str, messages: list[dict[str, Any]], extra: dict[str, Any], add_generation_prompt: bool,
                switch: dict[str, bool]) -> Any:
    """What a rendering depends on, as a dictionary key: the messages' text as a tuple where every value is a string
    (most rows: hashing it costs a fraction of the JSON text, which took a third of a short row's rendering), else as
    JSON (tool definitions and calls)."""
    if not extra and all(type(value) is str for message in messages for value in message.values()):
        return template, add_generation_prompt, tuple(switch.items()), tuple(tuple(m.items()) for m in messages)
    return json.dumps([template, messages, extra, add_generation_prompt, switch], ensure_ascii=False, default=str)


def has_thinking_switch(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template reads `enable_thinking` (GLM-4.5/4.6/4.7's does)."""
    return "enable_thinking" in (getattr(tokenizer, "chat_template", None) or "")


def thinking_switch(tokenizer: Any, enable_thinking: bool | None) -> dict[str, bool]:
    """apply_chat_template's keyword for --enable_thinking: nothing when not given; a template without the switch
    refuses it rather than ignoring it (the user would believe thinking was off)."""
    if enable_thinking is None:
        return {}
    if not has_thinking_switch(tokenizer):
        raise UserError(f"--enable_thinking: the chat template of {tokenizer.name_or_path} has no thinking switch",
                        hint="leave --enable_thinking out for this model")
    return {"enable_thinking": enable_thinking}


def reasoning_form(template: str | None) -> str | None:
    """Where a chat template takes an assistant's reasoning: "field" (it reads `reasoning_content`, as GLM-4.5+'s and
    Qwen3's do), "content" (it knows <think> blocks only inside the content, as templates that strip them from
    history do), or None (it has no place for reasoning: ChatGLM3, GLM-4-9B-chat, most others)."""
    if "reasoning_content" in (template or ""):
        return "field"
    return "content" if "</think>" in (template or "") else None


# A template that compares a message's role with 'tool' and never with 'observation' (GLM-4.5+, Qwen) reads tool
# results as `tool` messages; GLM-4's and ChatGLM3's write the role itself (`<|observation|>`).
_TOOL_ROLE = re.compile(r"""role\W{0,3}\s*==\s*["']tool["']""")
_OBSERVATION_ROLE = re.compile(r"""role\W{0,3}\s*==\s*["']observation["']""")
# Where a template writes a call as `<|assistant|>NAME\n{arguments}`, it reads NAME from the message's metadata:
# `message['metadata']` (GLM-4-9B-chat), `message.get("metadata", "")` (GLM-4-0414, GLM-Z1).
METADATA_CALLS = re.compile(r"""\[\s*["']metadata["']\s*\]|\.get\(\s*["']metadata["']""")


def chat_inputs(template: str, conversation: Conversation) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The messages (and keyword arguments) for apply_chat_template. Tools and tool calls go where the template
    reads them: GLM-4's official template reads tools from a message (`item['tools']`) and writes a call as
    `<|assistant|>NAME\n{arguments}` (`metadata`); transformers' convention is `tools=` and `tool_calls` (GLM-4.5+
    reads each call's arguments as a mapping). A template that knows neither gets the call as the message's text.
    Reasoning goes where `reasoning_form` says; a template with no place for it refuses it.

    Raises:
        UserError: reasoning in a conversation whose template has no place for it.
        RowNotRenderable: several calls, or text beside a call, in one turn of a template that writes one call per
            turn (GLM-4-9B-chat's).
    """
    styles, form, tool_role = _template_reads(template)
    messages: list[dict[str, Any]] = [{"role": "system", "content": conversation.system}] if conversation.system \
        else []
    for m in conversation.messages:
        message = _chat_message(m, styles, tool_role, conversation.location)
        if m.reasoning:
            if form is None:
                raise UserError(f"{conversation.location + ': ' if conversation.location else ''}an assistant turn "
                                "carries reasoning, and this chat template has no place for it",
                                hint=REASONING_HINT)
            if form == "field":
                message["reasoning_content"] = m.reasoning
            else:
                message["content"] = think_block(m.reasoning) + message["content"]
        messages.append(message)
    if not conversation.tools:
        return messages, {}
    if "['tools']" not in template:
        return messages, {"tools": conversation.tools}
    if messages and messages[0]["role"] == "system":
        messages[0] = {**messages[0], "tools": conversation.tools}
    else:
        messages.insert(0, {"role": "system", "content": "", "tools": conversation.tools})
    return messages, {}


@functools.lru_cache(maxsize=16)
def _template_reads(template: str) -> tuple[tuple[bool, bool], str | None, str]:
    """How a template takes tool calls (GLM-4's metadata style, transformers' tool_calls), reasoning, and tool
    results: read once per template, not for each rendering (the searches cost more than a short row's rendering)."""
    # A template that reads `tool_calls` (transformers' convention) gets them there even where it also reads
    # `metadata` for other turns (glmtune's ChatGLM3 template does both).
    reads_tool_calls = "tool_calls" in template
    styles = (bool(METADATA_CALLS.search(template)) and not reads_tool_calls, reads_tool_calls)
    tool_role = "tool" if _TOOL_ROLE.search(template) and not _OBSERVATION_ROLE.search(template) else "observation"
    return styles, reasoning_form(template), tool_role


def think_block(reasoning: str) -> str:
    """Reasoning as it opens an assistant's content, for a template that reads it there (and as GLM-Z1 generates it
    after the think block its prompt opens); the form thinking models write (DeepSeek-R1, Qwen3, GLM-Z1)."""
    return f"<think>\n{reasoning}\n</think>\n\n"


REASONING_HINT = ("use a model whose chat template writes reasoning (GLM-4.5/4.6/4.7, Qwen3, ...), or drop the "
                  "reasoning (reasoning_content, <think>...</think>, the reasoning column) from the data")


def check_reasoning(tokenizer: Any, conversations: list[Conversation], enable_thinking: bool | None) -> None:
    """Refuse, before tokenizing, a thinking switch the template lacks, and reasoning it can't train: a template with
    no place for it, or --enable_thinking false (the model then answers at once, so no turn is generated with it).

    Raises:
        UserError: naming the rows (file:line) that carry reasoning.
    """
    thinking_switch(tokenizer, enable_thinking)
    template = getattr(tokenizer, "chat_template", None)
    rows = [c.location or "a row" for c in conversations if any(m.reasoning for m in c.messages)]
    if not (rows and template):  # no template: render says so
        return
    if reasoning_form(template) is None:
        problem, hint = "has no place for reasoning", REASONING_HINT
    elif enable_thinking is False:
        problem, hint = "is told not to think (--enable_thinking false)", "leave --enable_thinking out (or true)"
    elif not holds_reasoning(tokenizer, enable_thinking):
        problem, hint = "has no place for reasoning (it drops it, and its prompt opens no think block)", \
            REASONING_HINT
    else:
        return
    raise UserError(f"{len(rows)} row(s) carry reasoning, and the chat template of {tokenizer.name_or_path} "
                    f"{problem}", problems=[f"{where}: an assistant turn carries reasoning" for where in
                                            rows[:MAX_PROBLEMS]], hint=hint)


def holds_reasoning(tokenizer: Any, enable_thinking: bool | None = None) -> bool:
    """Whether the model generates an assistant turn's reasoning under this template: the template writes it in the
    turn being generated, or its generation prompt opens a think block (GLM-Z1's drops reasoning from every turn it
    writes). A template that mentions `</think>` only to drop it (GLM-4-9B-0414's) has no place for it."""
    probe = Conversation(messages=[Message("user", "?"), Message("assistant", "!", train=True, reasoning=_PROBE)])
    try:
        return _PROBE in generated_turn(tokenizer, probe, 1, enable_thinking).text
    except RowNotRenderable:  # the template refuses the probe itself: the rows will tell
        return True
    except UserError:
        return False


def _chat_message(m: Message, styles: tuple[bool, bool], tool_role: str, location: str | None) -> dict[str, Any]:
    """One message for the template, without its reasoning."""
    glm_style, hf_style = styles
    if m.role == "observation":
        result = {"role": tool_role, "content": m.content}
        return {**result, "tool_call_id": m.tool_call_id} if m.tool_call_id and tool_role == "tool" else result
    calls = m.calls()
    if not (calls and (glm_style or hf_style)):
        return {"role": m.role, "content": m.content}  # plain text (a call as its text, for a template without tools)
    text = "" if isinstance(m.tool_call, dict) else m.content  # a function_call turn's content is the call itself
    if glm_style:
        if len(calls) > 1 or text.strip():
            raise RowNotRenderable(f"{location + ': ' if location else ''}GLM-4's chat template writes one tool call "
                                   "per assistant turn, without text beside it",
                                   reason="several tool calls, or text beside a call, in one turn (GLM-4 template)")
        arguments = calls[0]["arguments"]
        return {"role": "assistant", "metadata": calls[0]["name"],
                "content": arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)}
    return {"role": "assistant", "content": text, "tool_calls": [
        {"type": "function", "function": {"name": c["name"], "arguments": c["arguments"]},
         **({"id": c["id"]} if c.get("id") else {})} for c in calls]}


def encode_prompt(tokenizer: Any, conversation: Conversation, enable_thinking: bool | None = None) -> list[int]:
    """The ids that inference feeds the model: the conversation so far plus the generation prompt. Control-token
    text in the conversation's strings is encoded as text (data/control.py)."""
    if conversation.text is not None:
        return tokenizer.encode(conversation.text, add_special_tokens=True)
    # The template writes the special tokens (e.g. [gMASK]<sop>) itself, as apply_chat_template(tokenize=True).
    text = render(tokenizer, mark_conversation(tokenizer, conversation), add_generation_prompt=True,
                  enable_thinking=enable_thinking)
    return encode_marked(tokenizer, text)[0]


def encode_for_training(tokenizer: Any, conversation: Conversation, stop_ids: list[int],
                        train_on_prompt: bool = False, enable_thinking: bool | None = None,
                        next_token: int | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a whole conversation; labels are IGNORE_INDEX except on trained answers
    (everywhere with train_on_prompt). Control-token text in the conversation's strings is encoded as text.

    Args:
        enable_thinking: the template's thinking switch, as inference will pass it.
        next_token: the stop token appended when the conversation ends on a trained answer (by default the eos,
            or the first stop id): what the template writes after it where the conversation goes on.
    """
    if conversation.text is not None:
        ids = tokenizer.encode(conversation.text, add_special_tokens=True)
        if not ids or ids[-1] not in stop_ids:
            ids.append(end_token(tokenizer, stop_ids))
        return ids, list(ids)

    return label_training_text(tokenizer, training_text(tokenizer, conversation, enable_thinking), stop_ids,
                               train_on_prompt=train_on_prompt, next_token=next_token)


@dataclasses.dataclass(frozen=True)
class TrainingText:
    """A conversation rendered for training, before it is tokenized (encode_for_training's first half)."""

    text: str  # marked (data/control.py): control-token text from users is encoded as text
    answer_spans: list[tuple[int, int]]  # the characters of each trained answer


def training_text(tokenizer: Any, conversation: Conversation, enable_thinking: bool | None = None) -> TrainingText:
    """The rendering that encode_for_training tokenizes, with its answers located (not for a plain-text row).

    Raises:
        RowNotRenderable: the template refused the conversation, or an answer can't be located (AnswerNotLocated).
    """
    return TrainingText(*_render_with_answer_spans(tokenizer, mark_conversation(tokenizer, conversation),
                                                   enable_thinking))


def label_training_text(tokenizer: Any, rendered: TrainingText, stop_ids: list[int],
                        encoded: tuple[list[int], Sequence[int]] | None = None, train_on_prompt: bool = False,
                        next_token: int | None = None) -> tuple[list[int], list[int]]:
    """encode_for_training's second half: (input_ids, labels) of a rendered conversation. `encoded`: its
    encode_marked_batch result where the caller encoded many texts at once (None: encoded here)."""
    ids, token_spans = _tokenize_with_spans(tokenizer, rendered.text, rendered.answer_spans, encoded)
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in reversed(token_spans):  # reversed: an appended end token doesn't shift earlier spans
        end = _end_at_stop_token(tokenizer, ids, start, end, stop_ids, next_token)
        labels[start:end] = ids[start:end]
    return ids, list(ids) if train_on_prompt else labels


def _render_with_answer_spans(tokenizer: Any, conversation: Conversation,
                              enable_thinking: bool | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and, for each trained answer, its character range: from the end of the generation
    prompt before it to the end of what the model generates there. A conversation that ends on a trained turn ends
    as that turn is generated, which the template may write otherwise in history (GLM-4.7's `</think>` alone,
    GLM-Z1's dropped reasoning)."""
    turns = {i: generated_turn(tokenizer, conversation, i, enable_thinking) for i in trained_turns(conversation)}
    last = turns.get(len(conversation.messages) - 1)
    text = last.prompt + last.text if last else render(tokenizer, conversation, add_generation_prompt=False,
                                                       enable_thinking=enable_thinking)
    spans = []
    for turn in turns.values():
        end = len(turn.prompt) + len(turn.text)
        if text[:end] != turn.prompt + turn.text:
            raise _not_located(tokenizer)
        spans.append((len(turn.prompt), end))
    return text, spans


# Reasoning no real row holds: rendered in a turn's place, it shows whether and how a template writes reasoning there.
_PROBE = "glmtune-reasoning-probe"


@dataclasses.dataclass(frozen=True)
class GeneratedTurn:
    """An assistant turn as the model generates it."""

    prompt: str  # the generation prompt the template renders for the conversation before the turn
    text: str  # what follows it: reasoning with the template's think markup, answer, calls (not the stop token)
    history: str  # the conversation through the turn as the template writes it, the turn last


def generated_turn(tokenizer: Any, conversation: Conversation, i: int,
                   enable_thinking: bool | None = None) -> GeneratedTurn:
    """Assistant turn i as the model generates it: the template's generation prompt for the messages before it, then
    the part of the template's own rendering of the turn (as the last one) that follows that prompt. The think markup
    comes from the template: where it writes a turn without reasoning otherwise than the prompt began it (GLM-4.7's
    prompt opens `<think>`, its turn is `</think>` + answer), the turn is rendered with a probe reasoning and the
    probe then replaced; where it drops reasoning from the turn too but its prompt opens a think block (GLM-Z1),
    the reasoning follows that opening as `think_block` writes it, then the turn as the template writes it.

    Raises:
        UserError: reasoning in a turn that the template neither writes nor opens a think block for (GLM-4-9B-0414).
        AnswerNotLocated: a turn the template writes otherwise than its generation prompt begins it.
    """
    prompt = render(tokenizer, conversation.upto(i), add_generation_prompt=True, enable_thinking=enable_thinking)
    through = conversation.upto(i + 1)
    history = render(tokenizer, through, add_generation_prompt=False, enable_thinking=enable_thinking)
    reasoning = conversation.messages[i].reasoning
    if history.startswith(prompt) and not reasoning:
        return GeneratedTurn(prompt, history[len(prompt):], history)
    if reasoning_form(tokenizer.chat_template) is None:  # (reasoning there: chat_inputs refused it)
        raise _not_located(tokenizer)
    messages = [*through.messages[:i], dataclasses.replace(through.messages[i], reasoning=_PROBE)]
    probed = render(tokenizer, dataclasses.replace(through, messages=messages), add_generation_prompt=False,
                    enable_thinking=enable_thinking)
    if probed.startswith(prompt) and _PROBE in probed[len(prompt):]:
        written = history if history.startswith(prompt) and reasoning else probed.replace(_PROBE, reasoning or "")
        return GeneratedTurn(prompt, written[len(prompt):], history)
    if _PROBE in probed:  # written, but not where the prompt leaves the model: the turn can't be located
        raise _not_located(tokenizer)
    before = render(tokenizer, conversation.upto(i), add_generation_prompt=False, enable_thinking=enable_thinking)
    opened = prompt.rstrip().endswith("<think>") and prompt.startswith(before) and history.startswith(before)
    if not opened:
        if reasoning:
            raise UserError(f"{conversation.location + ': ' if conversation.location else ''}an assistant turn "
                            f"carries reasoning, and the chat template of {tokenizer.name_or_path} has no place for "
                            "it (it drops it, and its prompt opens no think block)", hint=REASONING_HINT)
        raise _not_located(tokenizer)
    generation_prompt, turn = prompt[len(before):], history[len(before):]
    at = generation_prompt.rstrip().rfind("<think>")
    block = think_block(reasoning or "")
    if not block.startswith(generation_prompt[at:]):
        raise _not_located(tokenizer)
    # The turn as the template writes it, after what it shares with the prompt (GLM-Z1: "<|assistant|>\n" before an
    # answer, "<|assistant|>" before a call's NAME).
    shared = len(os.path.commonprefix([generation_prompt[:at], turn]))
    return GeneratedTurn(prompt, block[len(generation_prompt) - at:] + turn[shared:], history)


def _not_located(tokenizer: Any) -> AnswerNotLocated:
    return AnswerNotLocated(
        f"the chat template of {tokenizer.name_or_path} renders a conversation's turns differently depending "
        "on what follows them, so answers can't be located in it",
        reason="answer not locatable in the rendered template (an empty answer, or a template that rewrites "
               "history)",
        hint="use a template whose rendering of a conversation prefix is a prefix of the whole")


def trained_turns(conversation: Conversation) -> list[int]:
    """The indices of the trained assistant turns; an opening assistant turn (a greeting) answers nothing and stays
    context."""
    asked, turns = False, []
    for i, message in enumerate(conversation.messages):
        asked = asked or message.role == "user"
        if message.role == "assistant" and message.train and asked:
            turns.append(i)
    return turns


def _tokenize_with_spans(tokenizer: Any, text: str, char_spans: list[tuple[int, int]],
                         encoded: tuple[list[int], Sequence[int]] | None = None
                         ) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of the whole marked text (as inference tokenizes it: no added special tokens, marked control tokens
    as text) and the token range of each character span; `encoded`: the text's encode_marked_batch result."""
    if tokenizer.is_fast:
        ids, starts = encoded or encode_marked_batch(tokenizer, [text])[0]  # starts ascending
        ids = list(ids)  # the caller's copy: an end token may be appended
        # (A span to the text's end, as most are, ends after the last token: every token starts inside the text.)
        return ids, [(bisect.bisect_left(starts, a), len(ids) if b >= len(text) else bisect.bisect_left(starts, b))
                     for a, b in char_spans]
    # Slow tokenizers give no offsets: encode the pieces between span boundaries one by one.
    cuts = sorted({0, len(text), *(c for span in char_spans for c in span)})
    ids, first_token = [], {}
    for a, b in zip(cuts, cuts[1:], strict=False):
        first_token[a] = len(ids)
        ids += encode_marked(tokenizer, text[a:b])[0]
    first_token[len(text)] = len(ids)
    return ids, [(first_token[a], first_token[b]) for a, b in char_spans]


def _end_at_stop_token(tokenizer: Any, ids: list[int], start: int, end: int, stop_ids: list[int],
                       next_token: int | None = None) -> int:
    """Where a trained answer's supervision ends, so that its last supervised token is one generation stops on:
    its own end-of-turn token (ChatML-style templates write a newline after it, which is not trained), the
    token the template writes next (GLM-4 writes "<|user|>" before the next question), or an appended one."""
    last_inside = _last_stop(ids, start, end, stop_ids)
    if last_inside is not None and not tokenizer.decode(ids[last_inside + 1: end]).strip():
        return last_inside + 1
    if end < len(ids) and ids[end] in stop_ids:
        return end + 1
    if end == len(ids):
        ids.append(next_token if next_token is not None else end_token(tokenizer, stop_ids))
        return end + 1
    # A template that writes no stop token after an answer in history (ChatGLM2's "[Round i]" prompts): the
    # answer's text is trained as it is; the conversation's last answer still learns to stop.
    return end


def _last_stop(ids: list[int], start: int, end: int, stop_ids: list[int]) -> int | None:
    """The index of the last stop token in ids[start:end], if any. The set test runs in C: most answers hold none."""
    if set(stop_ids).isdisjoint(ids[start:end]):
        return None
    return next(k for k in range(end - 1, start - 1, -1) if ids[k] in stop_ids)


def end_token(tokenizer: Any, stop_ids: list[int]) -> int:
    """The stop token appended after a conversation's last trained answer: the eos where generation stops on it.
    (eos_token_id looks the token up each time: a caller of many rows reads it once and passes it as next_token.)"""
    return tokenizer.eos_token_id if tokenizer.eos_token_id in stop_ids else stop_ids[0]
