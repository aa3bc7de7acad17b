"""A tiny GLM-architecture chat model built locally: the demo's base model and the tests' fixture.

transformers' own `GlmForCausalLM` (GLM-4-9B-chat-hf layout) with random weights, a byte-level BPE tokenizer
trained on the given texts, GLM-4's special tokens and a GLM-4-style chat template.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
                  "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
END_OF_TURN = ["<|endoftext|>", "<|user|>", "<|observation|>"]  # what GLM-4's generation stops on

# GLM-4's template without its tool branch: "<|assistant|>\n" in history, "<|assistant|>" as generation prompt.
CHAT_TEMPLATE = (
    "[gMASK]<sop>{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tiny_glm(output_dir: Path, texts: Iterable[str], hidden_size: int = 256, num_layers: int = 4,
                   vocab_size: int = 3000, seed: int = 0) -> Path:
    """Write a tiny random GLM chat model (config, weights, tokenizer, generation config) to output_dir."""
    import torch
    from transformers import GenerationConfig, GlmConfig, GlmForCausalLM

    tokenizer = build_bpe_tokenizer(texts, vocab_size)
    end_ids = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    config = GlmConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        max_position_embeddings=2048,
        # The default 0.02 makes a random model almost linear, and LoRA on it can't memorise facts;
        # about 1.3/sqrt(hidden) gives it enough non-linearity (measured: 200 facts in 300 steps at 256).
        initializer_range=1.3 / math.sqrt(hidden_size),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=end_ids,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = GlmForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=end_ids, pad_token_id=tokenizer.pad_token_id)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def build_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 3000):
    """A byte-level BPE tokenizer (any UTF-8 text encodes) with GLM-4's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(list(texts), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        chat_template=CHAT_TEMPLATE,
        padding_side="left",  # generation pads on the left; training's collator pads explicitly
    )
