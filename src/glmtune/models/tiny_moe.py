"""A tiny random GLM-4.5 (transformers' glm4_moe) for tests and benchmarks of expert LoRA."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

from glmtune.models.tiny import END_OF_TURN

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def build_tiny_glm4_moe(output_dir: Path, tokenizer_dir: Path, hidden_size: int = 96, num_layers: int = 3,
                        experts: int = 8, active: int = 2, seed: int = 0) -> Path:
    """Write a tiny glm4_moe (its first layer dense, the others `experts` routed experts with `active` per token
    plus one shared expert) with the tokenizer of `tokenizer_dir` (e.g. glmtune.models.tiny's) to output_dir."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, Glm4MoeConfig, Glm4MoeForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    end_ids = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    config = Glm4MoeConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden_size // 4,
        n_routed_experts=experts, num_experts_per_tok=active, moe_intermediate_size=hidden_size // 2,
        n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, max_position_embeddings=2048,
        initializer_range=1.3 / math.sqrt(hidden_size),  # as models/tiny.py: enough non-linearity to learn
        pad_token_id=tokenizer.pad_token_id, eos_token_id=end_ids, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Glm4MoeForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=end_ids, pad_token_id=tokenizer.pad_token_id)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, output_dir / name)
    return output_dir
