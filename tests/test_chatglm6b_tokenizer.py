"""The first ChatGLM-6B's tokenizer (ice_text.model), rebuilt without remote code, against what the official
tokenizer produced (../shared/fixtures/chatglm/v1/tokenizer_golden.json) and against `sentencepiece` itself
applied as the official code applies it."""

from __future__ import annotations

import json
import random
import shutil

import pytest

from glmtune.data.conversation import Conversation, Message
from glmtune.data.templates import IGNORE_INDEX, encode_for_training, encode_prompt
from glmtune.data.tokenize import TokenizeOptions, process_conversation
from glmtune.models.chatglm.ice_tokenizer import build_ice_tokenizer, is_ice_tokenizer_dir

GMASK, SOP, EOP, MASK = 130001, 130004, 130005, 130000


@pytest.fixture(scope="module")
def directory(shared_dir):
    return shared_dir / "tokenizers" / "chatglm-6b"


@pytest.fixture(scope="module")
def tokenizer(directory):
    return build_ice_tokenizer(directory)


@pytest.fixture(scope="module")
def golden(shared_dir):
    return json.loads((shared_dir / "fixtures/chatglm/v1/tokenizer_golden.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def official(directory):
    """A naive reimplementation of the official tokenizer's text path: its whitespace preprocessing, then the
    SentencePiece model itself; decode reverses it, then transformers 4's clean_up_tokenization."""
    import sentencepiece

    pieces = sentencepiece.SentencePieceProcessor(model_file=str(directory / "ice_text.model"))

    def encode(text: str) -> list[int]:
        text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
        for n in range(80, 1, -1):
            text = text.replace(" " * n, f"<|blank_{n}|>")
        return pieces.encode(text)

    def decode(ids: list[int]) -> str:
        text = pieces.decode([i for i in ids if i != 3]).replace("<n>", "\n").replace("<|tab|>", "\t")
        for n in range(2, 81):
            text = text.replace(f"<|blank_{n}|>", " " * n)
        for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                              (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
            text = text.replace(before, after)
        return text

    return encode, decode


def chat_messages(golden) -> list[dict[str, str]]:
    inputs = golden["chat_inputs"]
    messages = []
    for query, response in inputs["history_pairs"]:
        messages += [{"role": "user", "content": query}, {"role": "assistant", "content": response}]
    return messages + [{"role": "user", "content": inputs["query"]}]


def test_recognises_only_thudm_chatglm6b_tokenizer_dirs(directory, shared_dir, tmp_path):
    assert is_ice_tokenizer_dir(directory)
    assert not is_ice_tokenizer_dir(shared_dir / "tokenizers" / "chatglm2-6b")
    for name in ("ice_text.model", "tokenizer_config.json"):
        shutil.copy(directory / name, tmp_path / name)
    assert is_ice_tokenizer_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")  # a converted tokenizer loads through AutoTokenizer instead
    assert not is_ice_tokenizer_dir(tmp_path)


def test_vocabulary_size_and_special_ids(tokenizer, golden):
    assert len(tokenizer) == golden["len_tokenizer"] == 130344
    ids = golden["special_token_ids"]
    for token in ("[MASK]", "[gMASK]", "<sop>", "<eop>", "</s>", "<pad>", "<unk>", "<n>", "<|tab|>", "<|blank_2|>"):
        assert tokenizer.convert_tokens_to_ids(token) == ids[token], token
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id,
            tokenizer.mask_token_id) == (ids["tokenizer.bos_token_id"], ids["tokenizer.eos_token_id"],
                                         ids["tokenizer.pad_token_id"], ids["tokenizer.unk_token_id"],
                                         ids["tokenizer.mask_token_id"])
    assert tokenizer.padding_side == golden["padding_side"]


def test_encode_gives_the_official_ids(tokenizer, golden):
    # Special-token text included: "[gMASK]<sop>hello" is "▁[" "g" "MASK" "]", <sop>, "▁hello", as officially.
    assert "[gMASK]<sop>hello" in [case["text"] for case in golden["strings"]]
    for case in golden["strings"]:
        assert tokenizer.encode(case["text"]) == case["ids"], case["text"]  # [gMASK] <sop> appended
        assert tokenizer.encode(case["text"], add_special_tokens=False) == case["ids_no_special"], case["text"]
    # A pair is the official training layout: a [gMASK] <sop> b <eop>.
    b = tokenizer.encode("b", add_special_tokens=False)
    assert tokenizer("a", "b")["input_ids"] == tokenizer.encode("a") + b + [EOP]


def test_decode_gives_the_official_text(tokenizer, golden):
    for case in golden["strings"]:
        assert tokenizer.decode(case["ids"]) == case["decode_ids"], case["text"]
        assert tokenizer.decode(case["ids_no_special"]) == case["decode_ids_no_special"], case["text"]
        assert tokenizer.decode(case["ids"], skip_special_tokens=True) == case["decode_ids_skip_special"], case["text"]


def test_chat_template_gives_the_official_prompt_ids(tokenizer, golden):
    messages = chat_messages(golden)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == golden["chat"]["prompt_text"] + "[gMASK]<sop>"  # chat()'s prompt, then what encode() appends
    assert list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)) == golden[
        "chat"]["input_ids"]
    first = [{"role": "user", "content": golden["chat"]["no_history_prompt_text"]}]
    assert list(tokenizer.apply_chat_template(first, add_generation_prompt=True, return_dict=False)) == golden["chat"][
        "no_history_input_ids"]  # without history, chat() sends the bare query


def test_save_pretrained_reloads_with_plain_autotokenizer(tokenizer, golden, tmp_path):
    """transformers alone (which does not know glmtune's class) loads the saved files as its generic tokenizer:
    the official ids for text and for the chat prompt; special-token text in a plain encode is parsed there, as
    transformers' tokenizers do (glmtune's load_tokenizer restores the official encode: the next test)."""
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    for case in golden["strings"]:
        if "[gMASK]" in case["text"]:
            assert reloaded.encode(case["text"], add_special_tokens=False)[:2] == [GMASK, SOP]
        else:
            assert reloaded.encode(case["text"]) == tokenizer.encode(case["text"]), case["text"]
        assert reloaded.decode(case["ids"]) == case["decode_ids"], case["text"]
    assert list(reloaded.apply_chat_template(chat_messages(golden), add_generation_prompt=True, return_dict=False)) == \
        golden["chat"]["input_ids"]
    assert (reloaded.padding_side, reloaded.bos_token, reloaded.eos_token, reloaded.pad_token) == (
        "left", "<sop>", "<eop>", "<pad>")
    assert len(reloaded) == len(tokenizer)


def test_glmtune_reloads_a_saved_tokenizer_with_the_official_encode(tokenizer, golden, official, tmp_path):
    from glmtune.models.loading import load_tokenizer

    encode, _ = official
    tokenizer.save_pretrained(tmp_path)
    reloaded = load_tokenizer(str(tmp_path))
    assert type(reloaded) is type(tokenizer)
    for case in golden["strings"]:
        assert reloaded.encode(case["text"]) == case["ids"], case["text"]
    assert reloaded.encode("x<eop>\ny", add_special_tokens=False) == encode("x") + [EOP] + encode("y")
    assert list(reloaded.apply_chat_template(chat_messages(golden), add_generation_prompt=True, return_dict=False)) \
        == golden["chat"]["input_ids"]


# Texts beyond the golden file: whitespace runs past 80, mixed tabs and newlines, leading/trailing spaces, CRLF,
# emoji, CJK, decomposed (NFD) Korean/Japanese/Vietnamese, halfwidth kana, unicode spaces, piece-like text.
OTHER_TEXTS = [
    " " * 81 + "x", "a" + " " * 85 + "b", " " * 160, "x" + " " * 200 + "\n", "\t \t  \n \n\n   \tend",
    "  leading and trailing  ", " one ", "\r\n\r\n  crlf \r\n", "tab\tthen  two\n\n\nthree   ",
    "emoji 🤖🦾 and flags 🇨🇳🇫🇷 and family 👨‍👩‍👧 ❤️ 1️⃣", "中文，标点；还有“引号”和……省略号！",
    "混合 English 和中文 mixed",
    "ＡＢＣ１２３ fullwidth　ideographic　space", "non\u00a0breaking\u2009thin", "한국어 텍스트", "日本語のテキスト",
    "\u1112\u1161\u11ab\u1100\u116e\u11a8", "か\u3099き\u3099 ｶﾞｷﾞｸﾞ ﾊﾟ", "Vie\u0323\u0302t Nam Tie\u0302\u0301ng",
    "<n> <|tab|> <|blank_3|> <0x41> </s> <s> [sMASK] <ENC> ▁x", "def f(x):\n\treturn {\n        'k': x,\n    }\n",
    "3.14159265358979 ... 1,000,000 ½ ² ⅻ ㍿", "a\x00b\x1fc\u200bd\ufeffe", "…", " . , ! ? don 't",
]


def test_encode_and_decode_agree_with_sentencepiece_on_other_texts(tokenizer, official):
    encode, decode = official
    rng = random.Random(0)
    alphabet = [*"abcxyzABC0123456789.,!?;:'\"()[]{}<>|_-+=*/\\#@$%^&~`", *[" "] * 20, *["\n"] * 5, *["\t"] * 3,
                *"你好世界中文测试我们，。！？、；：“”‘’（）《》…—￥", "😀", "🎉", "👍🏽", "\u3000", "\xa0", "\r", "é",
                "ﬁ", "①", "ｱ", "ｶﾞ", "한", "ア", "▁", "\x85", "Ω", "½"]
    words = ["hello", " world", "<n>", "<|blank_3|>", "<0x41>", "</s>", "[sMASK]", " " * 81, "  ", "\r\n"]
    fuzzed = ["".join(rng.choice(alphabet) if rng.random() < 0.7 else rng.choice(words)
                      for _ in range(rng.randint(0, 30))) for _ in range(300)]
    for text in OTHER_TEXTS + fuzzed:
        expected = encode(text)
        assert tokenizer.encode(text) == expected + [GMASK, SOP], repr(text)
        assert tokenizer.decode(expected) == decode(expected), repr(text)


def test_special_token_text_is_encoded_as_officially(tokenizer, official):
    encode, _ = official
    # As officially: [MASK], <pad>, <unk>, <sop>, <eop> in a text are those tokens, and the whitespace around them
    # goes; "[gMASK]" is ordinary text.
    assert tokenizer.encode("a \n[MASK]\t b<pad>c", add_special_tokens=False) == encode("a") + [MASK] + encode(
        "b") + [3] + encode("c")
    assert tokenizer.encode("x<eop>\ny <sop> [gMASK]z", add_special_tokens=False) == encode("x") + [EOP] + encode(
        "y") + [SOP] + encode("[gMASK]z")
    # The chat template's markup: [gMASK] is the token, and whitespace next to [gMASK], <sop>, <eop> stays, so that
    # an answer rendered between them is encoded as ptuning/main.py encodes it alone.
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\na "}]
    assert tokenizer.apply_chat_template(messages, return_dict=False) == encode("q") + [GMASK, SOP] + encode(
        "\na ") + [EOP]


def test_training_layout_is_the_official_ptuning_layout(tokenizer, official, directory):
    from glmtune.models.loading import stop_token_ids

    encode, _ = official
    stops = stop_token_ids(str(directory), tokenizer)
    assert EOP in stops
    # ptuning/main.py: encode(prompt) + [gMASK] <sop> + encode(answer) + <eop>, answers trained with their stop.
    question, answer = "写一首诗\n", "\n春天来了。 \n"
    conversation = Conversation(messages=[Message("user", question), Message("assistant", answer, True)])
    ids, labels = encode_for_training(tokenizer, conversation, stops)
    prompt = encode(question) + [GMASK, SOP]
    assert ids == prompt + encode(answer) + [EOP]
    assert labels == [IGNORE_INDEX] * len(prompt) + encode(answer) + [EOP]
    assert ids[:len(prompt)] == encode_prompt(tokenizer, conversation.upto(1))

    # Several rounds: the earlier answers are history text in the last question's prompt, as chat() writes it.
    rounds = [Message("user", "你好"), Message("assistant", "你好！", True), Message("user", "2+2?"),
              Message("assistant", "4.", True)]
    prompt = encode("[Round 0]\n问：你好\n答：你好！\n[Round 1]\n问：2+2?\n答：") + [GMASK, SOP]
    for last_turn_only in (True, False):  # without the flag, the same: the earlier answer can only be history
        row = process_conversation(Conversation(messages=rounds), tokenizer, stops,
                                   TokenizeOptions(512, last_turn_only=last_turn_only))
        assert row["input_ids"] == prompt + encode("4.") + [EOP]
        assert row["labels"] == [IGNORE_INDEX] * len(prompt) + encode("4.") + [EOP]
        assert row["history_untrained"] is not last_turn_only and not row["dropped"]  # counted in the report
    assert encode_prompt(tokenizer, Conversation(messages=rounds[:3])) == prompt


def test_chat_template_refuses_what_chatglm6b_cannot_take(tokenizer):
    from jinja2 import TemplateError

    for messages in ([{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
                     [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]):
        with pytest.raises(TemplateError):
            tokenizer.apply_chat_template(messages, tokenize=False)
