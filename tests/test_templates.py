"""The renderer: answers start exactly where the generation prompt ends and end with a stop token."""

from __future__ import annotations

from glmtune.data.conversation import Conversation, Message
from glmtune.data.templates import IGNORE_INDEX, encode_for_training, encode_prompt

STOPS_TOKENS = ["<|endoftext|>", "<|user|>", "<|observation|>"]


def supervised_spans(ids: list[int], labels: list[int]) -> list[tuple[int, int]]:
    spans, start = [], None
    for i, label in enumerate([*labels, IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            spans.append((start, i))
            start = None
    return spans


def two_turns() -> Conversation:
    return Conversation(system="You are a finance assistant.", messages=[
        Message("user", "What is a bond?"), Message("assistant", "A debt security.", train=True),
        Message("user", "什么是股票？"), Message("assistant", "股票是所有权凭证。", train=True),
    ])


def test_each_answer_starts_where_the_generation_prompt_ends(tokenizer):
    stops = tokenizer.convert_tokens_to_ids(STOPS_TOKENS)
    conversation = two_turns()
    ids, labels = encode_for_training(tokenizer, conversation, stops)
    spans = supervised_spans(ids, labels)
    assert len(spans) == 2
    chat = conversation.to_chat_messages()
    for (start, _), upto in zip(spans, [2, 4], strict=True):  # system + 1 user, system + 3 messages
        # Reference: transformers' own tokenized generation prompt for the history before this answer.
        reference = tokenizer.apply_chat_template(chat[:upto], add_generation_prompt=True, tokenize=True,
                                                  return_dict=False)
        assert ids[:start] == list(reference)
    assert encode_prompt(tokenizer, conversation.prompt_part()) == ids[: spans[1][0]]


def test_answers_include_the_template_newline_and_end_with_a_stop_token(tokenizer):
    stops = tokenizer.convert_tokens_to_ids(STOPS_TOKENS)
    ids, labels = encode_for_training(tokenizer, two_turns(), stops)
    texts = [tokenizer.decode(ids[a:b]) for a, b in supervised_spans(ids, labels)]
    # GLM-4 style: "<|assistant|>\n" in history, so the newline is the answer's first token; the model must
    # learn to emit "<|user|>" after a middle answer and the eos after the last one.
    assert texts == ["\nA debt security.<|user|>", "\n股票是所有权凭证。<|endoftext|>"]


def test_untrained_assistant_turns_take_no_loss(tokenizer):
    stops = tokenizer.convert_tokens_to_ids(STOPS_TOKENS)
    conversation = two_turns()
    conversation.messages[1].train = False
    ids, labels = encode_for_training(tokenizer, conversation, stops)
    texts = [tokenizer.decode(ids[a:b]) for a, b in supervised_spans(ids, labels)]
    assert texts == ["\n股票是所有权凭证。<|endoftext|>"]


def test_plain_text_is_trained_on_every_token_and_ends_with_eos(tokenizer):
    stops = tokenizer.convert_tokens_to_ids(STOPS_TOKENS)
    ids, labels = encode_for_training(tokenizer, Conversation(text="Interest compounds."), stops)
    assert labels == ids
    assert tokenizer.decode(ids) == "Interest compounds.<|endoftext|>"
