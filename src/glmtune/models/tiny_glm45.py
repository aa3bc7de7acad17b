"""A GLM-4.5/4.6/4.7 tokenizer directory built without the hub, for tests and demos: GLM-4-9B-chat's tiktoken ranks
(the same ordinary tokens) followed by GLM-4.5's special tokens, carrying a given chat template (the official one in
tests), with the config files that make it a `glm4_moe` checkpoint's tokenizer to glmtune (family, stop ids).
"""

from __future__ import annotations

import json
from pathlib import Path

from glmtune.models.chatglm.glm4_tokenizer import RANKS_FILE, SPECIAL_TOKENS, tiktoken_backend

# After GLM-4's 14 (ids 151329...151342, so <|endoftext|>, <|user|> and <|observation|> keep their GLM-4 ids).
MORE_SPECIAL_TOKENS = ["<|begin_of_audio|>", "<|end_of_audio|>", "<|begin_of_transcription|>",
                       "<|end_of_transcription|>", "<|code_prefix|>", "<|code_middle|>", "<|code_suffix|>"]
# Written into answers and kept by decode(skip_special_tokens=True): GLM-4.5 marks them non-special.
TEXT_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
               "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>", "/nothink"]
STOP_TOKENS = ["<|endoftext|>", "<|user|>", "<|observation|>"]  # GLM-4.5's generation_config eos ids


def build_glm45_test_tokenizer(output_dir: Path, ranks_dir: Path, chat_template: str) -> Path:
    """Write the tokenizer (and a glm4_moe config.json + generation_config.json naming its stop ids) to output_dir.

    Args:
        ranks_dir: GLM-4-9B-chat's tokenizer directory (its tokenizer.model ranks file).
        chat_template: the template the tokenizer carries (e.g. the official GLM-4.6 one).
    Returns:
        output_dir, loadable with AutoTokenizer and usable as --model for prepare.
    """
    from tokenizers import AddedToken, processors
    from transformers import Glm4MoeConfig, PreTrainedTokenizerFast

    backend = tiktoken_backend(ranks_dir / RANKS_FILE)
    backend.post_processor = processors.ByteLevel(trim_offsets=False)  # GLM-4.5's template writes [gMASK]<sop>
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=SPECIAL_TOKENS + MORE_SPECIAL_TOKENS,
                                        chat_template=chat_template, clean_up_tokenization_spaces=False)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in TEXT_TOKENS])
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(output_dir)
    stops = tokenizer.convert_tokens_to_ids(STOP_TOKENS)
    (output_dir / "config.json").write_text(json.dumps({"model_type": Glm4MoeConfig.model_type, "eos_token_id": stops}),
                                            encoding="utf-8")
    (output_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": stops}), encoding="utf-8")
    return output_dir
