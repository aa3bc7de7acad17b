"""ChatGLM2-6B's and ChatGLM3-6B's tokenizer as a fast `tokenizers` tokenizer, built from THUDM's SentencePiece
model, with chat templates that reproduce the official prompts.

The official tokenizer is remote code (`tokenization_chatglm.py`, a SentencePiece wrapper) that no longer loads
under transformers 5. The model is a byte-fallback BPE with a dummy prefix, an identity normalizer and digits
split one by one; rebuilt here as `tokenizers` BPE (merges from transformers' SentencePiece merge generator),
with the official special tokens after the 64,789 pieces: [MASK] [gMASK] [sMASK] sop eop, and for ChatGLM3 the
role tokens. Proven id for id against the official outputs in the golden fixtures.

Special-token text in a plain encode ("[gMASK]", "<|user|>", "</s>") is ordinary pieces, as officially; the chat
template's own markup is parsed (models/chatglm/official_encode.py). One deliberate difference: sop/eop are named
"<sop>"/"<eop>" so that the plain word "sop" stays ordinary text.
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
    "{% if tools %}{{ raise_exception('ChatGLM2 has no tools') }}{% endif %}"
    "[gMASK]<sop>{% set ns = namespace(round=0) %}{% for m in messages %}"
    # (newlines as expressions: transformers renders templates with trim_blocks, which eats one after a tag)
    "{% if m['role'] == 'user' %}{% if ns.round > 0 %}{{ '\n\n' }}{% endif %}{% set ns.round = ns.round + 1 %}"
    "[Round {{ ns.round }}]\n\n问：{{ m['content'] }}\n\n答："
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}"
    "{% else %}{{ raise_exception('ChatGLM2 has no ' + m['role'] + ' messages') }}{% endif %}{% endfor %}"
)
# ChatGLM3: build_single_message = role token + encode(metadata + "\n") + encode(content), each encode with its own
# dummy prefix; as one text that is "<|role|>" + metadata + "\n " + content (the space becomes the prefix "▁").
# Tools (build_chat_input): the system message's content + "\n" + json.dumps(tools, indent=4, ensure_ascii=False),
# with the official tool demo's system text when the conversation has none. A call (the official fine-tuning data
# layout): <|assistant|>NAME + "\n" + "```python\ntool_call(key=value, ...)\n```", values written as Python's repr
# (as the official data preparation's ast unparse writes them). The result comes back as an <|observation|> message.
CHATGLM3_TOOLS_SYSTEM = "Answer the following questions as best as you can. You have access to the following tools:"
_PYTHON_REPR = (  # Python's repr of a JSON value; strings in single quotes unless they hold only double ones
    "{% macro pyrepr(v) %}{% if v is string %}{% set e = v | replace('\\\\', '\\\\\\\\') | replace('\\n', '\\\\n')"
    " | replace('\\t', '\\\\t') | replace('\\r', '\\\\r') %}"
    "{% if \"'\" in v and '\"' not in v %}\"{{ e }}\"{% else %}'{{ e | replace(\"'\", \"\\\\'\") }}'{% endif %}"
    "{% elif v is mapping %}{{ '{' }}{% for k, x in v.items() %}{{ ', ' if not loop.first }}{{ pyrepr(k) }}: "
    "{{ pyrepr(x) }}{% endfor %}{{ '}' }}{% elif v is iterable %}[{% for x in v %}{{ ', ' if not loop.first }}"
    "{{ pyrepr(x) }}{% endfor %}]{% else %}{{ v }}{% endif %}{% endmacro %}"
)
CHATGLM3_TEMPLATE = _PYTHON_REPR + (
    "[gMASK]<sop>{% set ns = namespace(skip_system=false, tools=[]) %}"
    "{% if tools %}{% for t in tools %}{% set ns.tools = ns.tools + [t['function'] if t['function'] is defined else t]"
    " %}{% endfor %}{% set ns.skip_system = messages and messages[0]['role'] == 'system' %}"
    "<|system|>\n {{ messages[0]['content'] if ns.skip_system else '" + CHATGLM3_TOOLS_SYSTEM + "' }}"
    "{{ '\n' }}{{ ns.tools | tojson(indent=4) }}{% endif %}"
    "{% for m in messages %}{% if not (loop.first and ns.skip_system) %}"
    "{% if m['role'] == 'assistant' and m.get('tool_calls') %}{% for call in m['tool_calls'] %}"
    "{% set args = call['function']['arguments'] %}<|assistant|>{{ call['function']['name'] }}\n ```python\ntool_call("
    "{% if args is mapping %}{% for k, v in args.items() %}{{ ', ' if not loop.first }}{{ k }}={{ pyrepr(v) }}"
    "{% endfor %}{% else %}{{ args }}{% endif %})\n```{% endfor %}"
    "{% else %}<|{{ m['role'] }}|>{{ m.get('metadata', '') }}\n {{ m['content'] }}{% endif %}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
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
    from transformers.convert_slow_tokenizer import generate_merges

    from glmtune.models.chatglm.official_encode import ChatGLMOfficialTokenizer

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
    return ChatGLMOfficialTokenizer(
        tokenizer_object=backend,
        text_parsed_tokens=[],  # the official encode parses no special-token text
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",  # the official pad id is 0
        additional_special_tokens=specials,
        chat_template=CHATGLM3_TEMPLATE if family == "chatglm3" else CHATGLM2_TEMPLATE,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        name_or_path=str(directory),
    )
