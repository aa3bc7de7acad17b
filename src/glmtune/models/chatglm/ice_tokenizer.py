"""The first ChatGLM-6B's tokenizer (THUDM/chatglm-6b, `ice_text.model`) as a fast `tokenizers` tokenizer, with a
chat template that reproduces the official chat() prompt.

The official tokenizer is remote code (`tokenization_chatglm.py`, a SentencePiece wrapper) that no longer loads
under transformers 5. What it does, rebuilt here and proven id for id against its outputs (the golden fixture) and
against `sentencepiece` itself:

- Before SentencePiece, "\\n" becomes "<n>", "\\t" "<|tab|>", and runs of 2..80 spaces "<|blank_N|>" (longest
  first, as its chain of str.replace calls does): here a chain of Replace normalizers, in the same order.
- The model is a SentencePiece unigram model (130,344 pieces, ids used as they are: the image tokens of the first
  release are gone) with the nmt_nfkc normalization, SentencePiece's whitespace clean-up (no leading, trailing or
  repeated spaces) and a dummy "▁" prefix. "<n>", "<|tab|>" and "<|blank_N|>" are user-defined pieces, always
  whole; control pieces ([MASK], <sop>, </s>...) and byte pieces are never matched in text.
- encode() appends "[gMASK]" and "<sop>" (a pair: a [gMASK] <sop> b <eop>); decode() drops control tokens, maps
  the whitespace pieces back, and applies transformers 4's clean_up_tokenization (" ." -> "."), as the official one.

- Special-token text: a plain encode parses "[MASK]", "<sop>", "<eop>", "<pad>" and "<unk>" and drops the
  whitespace around them (transformers 4's special tokens), and keeps "[gMASK]" as ordinary pieces ("▁[" "g" "MASK"
  "]"), as the official one (models/chatglm/official_encode.py). The chat template, which writes "[gMASK]<sop>"
  and "<eop>", is encoded with all three parsed and the whitespace next to them kept, so that a prompt and an
  answer rendered around them are encoded exactly as the official training (ptuning/main.py) encodes them apart.

A known gap: a compatibility character followed by a combining mark ("²" + U+0301) loses the mark, where
SentencePiece keeps it (`tokenizers`' Precompiled normalizer looks a short grapheme up by its prefix).

Training on several rounds: chat() writes earlier rounds as plain "[Round i]" history, and without history sends
the bare question, so only a conversation's last answer follows "[gMASK]<sop>" and can be located: earlier answers
are history, untrained (prepare trains the last answer of such rows and counts them in its report).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from glmtune.artifacts import read_json_object

PIECES_FILE = "ice_text.model"
SUFFIX = ["[gMASK]", "<sop>"]  # what the official encode() puts after every text
OFFICIAL_PARSED = ["[MASK]", "<sop>", "<eop>", "<pad>", "<unk>"]  # the official tokenizer's special tokens
MAX_BLANK = 80  # the longest run of spaces with a piece of its own, "<|blank_80|>"

# ChatGLMForConditionalGeneration.chat(): the bare query without history, else "[Round i]\n问：q\n答：a\n" per
# exchange (rounds from 0) and "[Round n]\n问：q\n答：". encode() then appends [gMASK]<sop>, so the generation prompt
# is "[gMASK]<sop>". A conversation ending with an answer (training) renders the prompt of its last question,
# then "[gMASK]<sop>" + answer + "<eop>", as ptuning/main.py builds it; earlier answers are history text.
# (Newlines as written in the Python string: transformers' trim_blocks eats only one right after a {% tag %}.)
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
    "{{ raise_exception('ChatGLM-6B has no ' + m['role'] + ' messages') }}"
    "{% elif (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('ChatGLM-6B conversations alternate user and assistant messages, starting with user') }}"
    "{% endif %}{% endfor %}"
    "{% set last = (messages | length - 1) // 2 * 2 %}"  # the last question
    "{% if last == 0 %}{{ messages[0]['content'] }}{% else %}"
    "{% for i in range(0, last, 2) %}"
    "[Round {{ i // 2 }}]\n问：{{ messages[i]['content'] }}\n答：{{ messages[i + 1]['content'] }}\n{% endfor %}"
    "[Round {{ last // 2 }}]\n问：{{ messages[last]['content'] }}\n答：{% endif %}"
    "{% if messages | length > last + 1 %}[gMASK]<sop>{{ messages[last + 1]['content'] }}<eop>"
    "{% elif add_generation_prompt %}[gMASK]<sop>{% endif %}"
)


def is_ice_tokenizer_dir(directory: Path) -> bool:
    """A tokenizer directory as THUDM publishes ChatGLM-6B (remote ChatGLMTokenizer over ice_text.model)."""
    config = directory / "tokenizer_config.json"
    if not (config.is_file() and (directory / PIECES_FILE).is_file()) or (directory / "tokenizer.json").is_file():
        return False
    return read_json_object(config, "tokenizer config").get("tokenizer_class") == "ChatGLMTokenizer"


def build_ice_tokenizer(directory: Path) -> Any:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    from glmtune.models.chatglm.official_encode import ChatGLMOfficialTokenizer

    pieces, charsmap = read_sentencepiece_model(directory / PIECES_FILE)
    lowest = min(score for _, score, kind in pieces if kind == NORMAL)
    # SentencePiece never matches control, unknown or byte pieces in text; `tokenizers` matches any vocabulary
    # entry, so those get a score no path takes while another exists. (Its unknown-character penalty moves with
    # the lowest score, but an unknown character appears in no piece, so every path crosses it the same way.)
    unmatchable = lowest - 1e6
    vocab = [(piece, score if kind in (NORMAL, USER_DEFINED) else unmatchable) for piece, score, kind in pieces]
    user_defined = sorted((p for p, _, kind in pieces if kind == USER_DEFINED), key=len, reverse=True)
    controls = [p for p, _, kind in pieces if kind == CONTROL]

    backend = Tokenizer(Unigram(vocab, unk_id=0, byte_fallback=True))
    backend.normalizer = normalizers.Sequence([
        normalizers.Replace("\n", "<n>"),
        normalizers.Replace("\t", "<|tab|>"),
        *[normalizers.Replace(" " * n, f"<|blank_{n}|>") for n in range(MAX_BLANK, 1, -1)],
        # nmt_nfkc. `tokenizers` applies the character map per grapheme, and gets decomposed text (NFD Korean,
        # Vietnamese, kana + voiced mark) wrong where SentencePiece maps the whole sequence: composing first,
        # and again after (halfwidth ｶﾞ becomes カ + U+3099), gives what SentencePiece gives on such text.
        normalizers.NFC(),
        normalizers.Precompiled(charsmap),
        normalizers.NFC(),
        normalizers.Replace(Regex(" {2,}"), " "),  # SentencePiece's remove_extra_whitespaces
        normalizers.Replace(Regex(r"\A +| +\z"), ""),
        normalizers.Prepend("▁"),  # the dummy prefix (not on an empty text)
        normalizers.Replace(" ", "▁"),
    ])
    # User-defined pieces are always whole: no piece may start or end inside one.
    backend.pre_tokenizer = pre_tokenizers.Split(
        Regex("|".join(p.replace("|", r"\|") for p in user_defined)), behavior="isolated")
    backend.decoder = decoders.Sequence([
        *[decoders.Replace(p, "") for p in controls],  # SentencePiece decodes control pieces as nothing
        decoders.Replace("<unk>", " \u2047 "),  # and <unk> as " ⁇ "
        decoders.ByteFallback(),
        decoders.Fuse(),
        decoders.Replace(Regex(r"\A▁+"), ""),  # the dummy prefix (pieces hold at most one ▁, in front)
        decoders.Replace("▁", " "),
        # The official decode's str.replace calls on the whole text, in its order.
        decoders.Replace("<n>", "\n"),
        decoders.Replace("<|tab|>", "\t"),
        *[decoders.Replace(f"<|blank_{n}|>", " " * n) for n in range(2, MAX_BLANK + 1)],
    ])
    # The template's markup: [MASK], <pad>, <unk> strip the whitespace around them (transformers 4's default for
    # special tokens given as strings), "[gMASK]", "<sop>", "<eop>" keep it (see above).
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False, lstrip=True, rstrip=True) for t in ["[MASK]", "<pad>", "<unk>"]]
        + [AddedToken(t, special=True, normalized=False) for t in ["[gMASK]", "<sop>", "<eop>"]])
    backend.post_processor = processors.TemplateProcessing(
        single="$A " + " ".join(SUFFIX), pair="$A " + " ".join(SUFFIX) + " $B:1 <eop>:1",
        special_tokens=[(t, backend.token_to_id(t)) for t in [*SUFFIX, "<eop>"]])
    return ChatGLMOfficialTokenizer(
        tokenizer_object=backend,
        text_parsed_tokens=OFFICIAL_PARSED,
        bos_token="<sop>",
        eos_token="<eop>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="[MASK]",
        additional_special_tokens=["[gMASK]"],
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        clean_up_tokenization_spaces=True,  # as the official decode (transformers 4 default): " ." -> "."
        name_or_path=str(directory),
    )


# SentencePiece's piece types (sentencepiece_model.proto).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def read_sentencepiece_model(path: Path) -> tuple[list[tuple[str, float, int]], bytes]:
    """(piece, score, type) for every piece, and the normalizer's precompiled character map, read from the
    model file's protobuf wire format: the fields needed here, without a protobuf dependency (the `sentencepiece`
    API exposes neither the user-defined type nor the character map)."""
    pieces, charsmap = [], b""
    for field, value in _fields(path.read_bytes()):
        if field == 1:  # ModelProto.pieces
            piece = dict(_fields(value))
            pieces.append((piece[1].decode(), struct.unpack("<f", piece.get(2, b"\0\0\0\0"))[0], piece.get(3, NORMAL)))
        elif field == 2 and dict(_fields(value)).get(3, 1) != 1:  # TrainerSpec.model_type, 1 = unigram
            raise ValueError(f"{path} is not a SentencePiece unigram model")
        elif field == 3:  # NormalizerSpec; .precompiled_charsmap
            charsmap = dict(_fields(value)).get(2, b"")
    return pieces, charsmap


def _fields(data: bytes) -> Iterator[tuple[int, Any]]:
    """(field number, value) of one protobuf message: an int (varint), bytes (length-delimited or fixed32)."""
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        wire = key & 7
        if wire == 0:
            value, i = _varint(data, i)
        elif wire == 2:
            size, i = _varint(data, i)
            value, i = data[i:i + size], i + size
        elif wire == 5:
            value, i = data[i:i + 4], i + 4
        elif wire == 1:
            value, i = data[i:i + 8], i + 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield key >> 3, value


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i
