"""ChatGLM2-6B's and ChatGLM3-6B's tokenizer as a fast `tokenizers` tokenizer, built from THUDM's SentencePiece
model, with chat templates that reproduce the official prompts.

The official tokenizer is remote code (`tokenization_chatglm.py`, a SentencePiece wrapper) that no longer loads
under transformers 5. The model is a byte-fallback BPE with a dummy prefix, an identity normalizer and digits
split one by one; rebuilt here as `tokenizers` BPE (merges from transformers' SentencePiece merge generator),
with the official special tokens after the 64,789 pieces: [MASK] [gMASK] [sMASK] sop eop, and for ChatGLM3 the
role tokens. Proven id for id against the official outputs in the golden fixtures.

Two deliberate differences, both the usual behaviour of transformers' own tokenizers: special-token text in the
input ("[gMASK]", "<|user|>", "</s>") is recognised as that token (the official tokenizer encodes it as ordinary
pieces), and sop/eop are named "<sop>"/"<eop>" so that the plain word "sop" stays ordinary text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from glmtune.artifacts import read_json_object

PIECES_FILE = "tokenizer.model"
PREFIX = ["[gMASK]", "<sop>"]  # what the official encode() puts before every text
SPECIAL_TOKENS = ["[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>"]  # ids 64789.. after the pieces
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]  # ChatGLM3 only, ids 64794..

# ChatGLM2: ChatGLMTokenizer.build_prompt. "[Round i]\n\n问：...\n\n答：" per exchange, the answer after 答：, a
# blank line between rounds. The prompt always ends with 答：, so there is no separate generation prompt.
CHATGLM2_TEMPLATE = (
    "[gMASK]<sop>{% set ns = namespace(round=0) %}{% for m in messages %}"
    # (newlines as expressions: transformers renders templates with trim_blocks, which eats one after a tag)
    "{% if m['role'] == 'user' %}{% if ns.round > 0 %}{{ '\n\n' }}{% endif %}{% set ns.round = ns.round + 1 %}"
    "[Round {{ ns.round }}]\n\n问：{{ m['content'] }}\n\n答："
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}"
    "{% else %}{{ raise_exception('ChatGLM2 has no ' + m['role'] + ' messages') }}{% endif %}{% endfor %}"
)
# ChatGLM3: build_single_message = role token + encode(metadata + "\n") + encode(content), each encode with its own
# dummy prefix; as one text that is "<|role|>" + metadata + "\n " + content (the space becomes the prefix "▁").
CHATGLM3_TEMPLATE = (
    "[gMASK]<sop>{% for m in messages %}<|{{ m['role'] }}|>{{ m.get('metadata', '') }}\n {{ m['content'] }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def chatglm_sp_family(directory: Path) -> str | None:
    """"chatglm2" or "chatglm3" for a tokenizer directory as THUDM publishes them, else None."""
    config = directory / "tokenizer_config.json"
    if not (config.is_file() and (directory / PIECES_FILE).is_file()) or (directory / "tokenizer.json").is_file():
        return None
    settings = read_json_object(config, "tokenizer config")
    if settings.get("tokenizer_class") != "ChatGLMTokenizer":
        return None
    model_config = directory / "config.json"
    names = [settings.get("name_or_path", "")]
    if model_config.is_file():
        names.append(read_json_object(model_config, "model config").get("_name_or_path", ""))
    return "chatglm3" if any("chatglm3" in str(name).lower() for name in names) else "chatglm2"


def build_chatglm_sp_tokenizer(directory: Path, family: str) -> Any:
    import sentencepiece
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import generate_merges

    pieces = sentencepiece.SentencePieceProcessor(model_file=str(directory / PIECES_FILE))
    vocab = {pieces.id_to_piece(i): i for i in range(pieces.get_piece_size())}
    backend = Tokenizer(BPE(vocab, generate_merges(vocab), unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    # SentencePiece's dummy prefix and spaces as "▁" (applied to each text between special tokens).
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\d"), behavior="isolated")  # split_digits
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    specials = SPECIAL_TOKENS + (ROLE_TOKENS if family == "chatglm3" else [])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    backend.post_processor = processors.TemplateProcessing(
        single=" ".join(PREFIX) + " $A", pair=" ".join(PREFIX) + " $A $B:1",
        special_tokens=[(t, backend.token_to_id(t)) for t in PREFIX])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",  # the official pad id is 0
        additional_special_tokens=specials,
        chat_template=CHATGLM3_TEMPLATE if family == "chatglm3" else CHATGLM2_TEMPLATE,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        name_or_path=str(directory),
    )
