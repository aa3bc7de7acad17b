"""One renderer for training and inference: conversation -> token ids (+ labels) through the tokenizer's own
chat template (`apply_chat_template`), so that what the model is trained on and what it is asked at inference
agree token for token.

The gap this fills: `apply_chat_template` renders text, but says neither where each answer starts in tokens
nor which token ends it. Here the supervised span of an assistant turn starts exactly where the rendered
generation prompt ends (GLM-4's template writes "<|assistant|>\n" in history but "<|assistant|>" as the
generation prompt, so that newline belongs to the answer), and it ends with a token that generation stops on,
so the tuned model stops.
"""

from __future__ import annotations

from typing import Any

from glmtune.data.conversation import Conversation
from glmtune.errors import UserError

IGNORE_INDEX = -100  # label of a token that takes no loss (transformers' convention)


def render(tokenizer: Any, conversation: Conversation, add_generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"the tokenizer of {tokenizer.name_or_path} has no chat template",
                        hint="use a chat model, or a tokenizer directory whose tokenizer_config.json or "
                             "chat_template.jinja defines one")
    return tokenizer.apply_chat_template(conversation.to_chat_messages(), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def encode_prompt(tokenizer: Any, conversation: Conversation) -> list[int]:
    """The ids that inference feeds the model: the conversation so far plus the generation prompt."""
    if conversation.text is not None:
        return tokenizer.encode(conversation.text, add_special_tokens=True)
    # The template writes the special tokens (e.g. [gMASK]<sop>) itself, as apply_chat_template(tokenize=True).
    return tokenizer.encode(render(tokenizer, conversation, add_generation_prompt=True), add_special_tokens=False)


def encode_for_training(tokenizer: Any, conversation: Conversation,
                        stop_ids: list[int]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a whole conversation; labels are IGNORE_INDEX except on trained answers."""
    if conversation.text is not None:
        ids = tokenizer.encode(conversation.text, add_special_tokens=True)
        if not ids or ids[-1] not in stop_ids:
            ids.append(_end_token(tokenizer, stop_ids))
        return ids, list(ids)

    ids: list[int] = []
    labels: list[int] = []
    trained_ends: list[int] = []  # token index just after each trained answer
    rendered = ""
    for i, message in enumerate(conversation.messages):
        if message.role != "assistant":
            continue
        history = Conversation(messages=conversation.messages[:i], system=conversation.system)
        prompt = render(tokenizer, history, add_generation_prompt=True)
        upto = Conversation(messages=conversation.messages[: i + 1], system=conversation.system)
        full = render(tokenizer, upto, add_generation_prompt=False)
        if not prompt.startswith(rendered) or not full.startswith(prompt):
            raise UserError(f"the chat template of {tokenizer.name_or_path} renders a conversation's turns "
                            "differently depending on what follows them, so answers can't be located in it",
                            hint="use a template whose rendering of a conversation prefix is a prefix of the whole")
        _append(tokenizer, prompt[len(rendered):], False, ids, labels)
        _append(tokenizer, full[len(prompt):], message.train, ids, labels)
        if message.train:
            trained_ends.append(len(ids))
        rendered = full
    tail = render(tokenizer, conversation, add_generation_prompt=False)[len(rendered):]
    _append(tokenizer, tail, False, ids, labels)

    # Make every trained answer end with a stop token: either its own last token, or the token the
    # template writes next (GLM-4 writes "<|user|>" before the next question), or an appended one at the end.
    for end in reversed(trained_ends):
        if ids[end - 1] in stop_ids:
            continue
        if end < len(ids) and ids[end] in stop_ids:
            labels[end] = ids[end]
        elif end == len(ids):
            ids.append(_end_token(tokenizer, stop_ids))
            labels.append(ids[-1])
        else:
            raise UserError(f"the chat template of {tokenizer.name_or_path} does not end an assistant turn with a "
                            f"token generation stops on (stop ids {stop_ids})",
                            hint="the model's generation_config.json eos_token_id should list its end-of-turn ids")
    return ids, labels


def _append(tokenizer: Any, text: str, train: bool, ids: list[int], labels: list[int]) -> None:
    if not text:
        return
    piece = tokenizer.encode(text, add_special_tokens=False)
    ids += piece
    labels += piece if train else [IGNORE_INDEX] * len(piece)


def _end_token(tokenizer: Any, stop_ids: list[int]) -> int:
    return tokenizer.eos_token_id if tokenizer.eos_token_id in stop_ids else stop_ids[0]
