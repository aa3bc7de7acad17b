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


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_chatml_answers_end_at_im_end_not_at_the_newline_after_it():
    from glmtune.models.tiny import build_bpe_tokenizer

    tokenizer = build_bpe_tokenizer(["What is a bond? A debt security. 什么是股票？ 股票是所有权凭证。"] * 5, 500)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    stops = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    conversation = two_turns()
    ids, labels = encode_for_training(tokenizer, conversation, stops)
    spans = supervised_spans(ids, labels)
    assert [tokenizer.decode(ids[a:b]) for a, b in spans] == ["A debt security.<|im_end|>",
                                                              "股票是所有权凭证。<|im_end|>"]
    reference = tokenizer.apply_chat_template(conversation.to_chat_messages()[:4], add_generation_prompt=True,
                                              tokenize=True, return_dict=False)
    assert ids[: spans[1][0]] == list(reference)


def test_metaspace_tokenizer_prompts_match_between_training_and_inference():
    """A SentencePiece-style tokenizer prepends '▁' to every encoded string: encoding the rendered pieces one by
    one would put one at each answer boundary, where inference (one encode of the prompt) has none."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    backend.decoder = decoders.Metaspace(prepend_scheme="first")
    backend.train_from_iterator(["[INST] What is a bond? [/INST] A debt security. 股票是所有权凭证。"] * 20,
                                trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>")
    tokenizer.chat_template = ("<s>{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} "
                               "[/INST]{% elif m['role'] == 'assistant' %}{{ m['content'] }}</s>{% endif %}"
                               "{% endfor %}")
    conversation = Conversation(messages=[
        Message("user", "What is a bond?"), Message("assistant", "A debt security.", train=True),
        Message("user", "股票?"), Message("assistant", "股票是所有权凭证。", train=True)])
    ids, labels = encode_for_training(tokenizer, conversation, [tokenizer.eos_token_id])
    spans = supervised_spans(ids, labels)
    assert len(spans) == 2
    assert ids[: spans[1][0]] == encode_prompt(tokenizer, conversation.prompt_part())
    assert tokenizer.decode(ids[spans[1][0]: spans[1][1]]) == "股票是所有权凭证。</s>"


def test_tokenizer_fingerprint_ignores_call_time_truncation_state(tiny_model, tmp_path):
    import json
    import shutil

    from transformers import AutoTokenizer

    from glmtune.models.loading import tokenizer_fingerprint

    copy = tmp_path / "model"
    shutil.copytree(tiny_model, copy)
    state = json.loads((copy / "tokenizer.json").read_text())
    state["truncation"] = {"direction": "Right", "max_length": 512, "strategy": "LongestFirst", "stride": 0}
    (copy / "tokenizer.json").write_text(json.dumps(state))
    tokenizer = AutoTokenizer.from_pretrained(copy)
    before = tokenizer_fingerprint(tokenizer)
    tokenizer.encode("some text")  # transformers resets the backend's truncation here
    assert tokenizer_fingerprint(tokenizer) == before
