"""GLM-4-9B-chat's tokenizer as a fast `tokenizers` tokenizer, built from THUDM's tiktoken ranks file.

The official tokenizer is remote code (`tokenization_chatglm.py`, a tiktoken wrapper) that no longer loads under
transformers 5. The ranks file is a byte-level BPE with the cl100k-style split pattern; transformers'
TikTokenConverter turns it into merges. What the official class adds, rebuilt here: the 14 special tokens after
the 151,329 ranks, `[gMASK]<sop>` prepended by encode(), and the chat template from tokenizer_config.json.
Proven id for id against the official outputs in the golden fixtures.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

from glmtune.artifacts import read_json_object, sha256_file

RANKS_FILE = "tokenizer.model"
SPECIAL_TOKENS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                  "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>",
                  "<|begin_of_video|>", "<|end_of_video|>"]
PREFIX = ["[gMASK]", "<sop>"]  # what the official encode() puts before every text


def is_glm4_tokenizer_dir(directory: Path) -> bool:
    """A tokenizer directory as THUDM publishes GLM-4 (remote ChatGLM4Tokenizer over a tiktoken ranks file)."""
    config = directory / "tokenizer_config.json"
    if not (config.is_file() and (directory / RANKS_FILE).is_file()) or (directory / "tokenizer.json").is_file():
        return False
    return read_json_object(config, "tokenizer config").get("tokenizer_class") == "ChatGLM4Tokenizer"


def load_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """The ranks file: one "base64(token bytes) rank" per line (what tiktoken's loader reads)."""
    ranks = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def build_glm4_tokenizer(directory: Path) -> Any:
    from transformers import PreTrainedTokenizerFast

    config = read_json_object(directory / "tokenizer_config.json", "tokenizer config")
    return PreTrainedTokenizerFast(
        tokenizer_object=tiktoken_backend(directory / RANKS_FILE),
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS,
        chat_template=config.get("chat_template"),
        padding_side=config.get("padding_side", "left"),
        clean_up_tokenization_spaces=False,
        name_or_path=str(directory),
    )


def tiktoken_backend(ranks_file: Path) -> Any:
    """The converted `tokenizers.Tokenizer`, kept under HF_HOME/glmtune/tokenizers by the ranks file's hash:
    converting the 151,329 ranks into merges takes about 7 s, loading the result well under one."""
    from huggingface_hub import constants
    from tokenizers import Tokenizer

    cached = Path(constants.HF_HOME) / "glmtune" / "tokenizers" / f"glm4-{sha256_file(ranks_file)[:24]}.json"
    if cached.is_file():
        return Tokenizer.from_file(str(cached))
    backend = _convert(ranks_file)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".tmp-{os.getpid()}")
        backend.save(str(tmp))
        tmp.replace(cached)
    except OSError:  # a read-only cache only costs the conversion next time
        pass
    return backend


def _convert(ranks_file: Path) -> Any:
    from tokenizers import processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class _Converter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:  # no tiktoken dependency for one file
            return load_tiktoken_ranks(Path(tiktoken_url))

    # TikTokenConverter's default split pattern is GLM-4's own (the official tokenizer's pat_str).
    backend = _Converter(vocab_file=str(ranks_file), extra_special_tokens=SPECIAL_TOKENS).converted()
    prefix_ids = [(token, backend.token_to_id(token)) for token in PREFIX]
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=" ".join(PREFIX) + " $A", pair=" ".join(PREFIX) + " $A $B:1",
                                      special_tokens=prefix_ids),
    ])
    return backend
