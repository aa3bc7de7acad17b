"""prepare -> train -> infer through the CLI on ChatGLM2/3 and GLM-4 checkpoint directories as THUDM publishes
them (official parameter names, remote-code config, the real tokenizer files), here small random ones."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from conftest import write_json

FAMILIES = {  # fixture config, tokenizer folder, tokenizer files, embedding rows, eos, pad
    "chatglm2": ("v2", "chatglm2-6b", ["tokenizer.model", "tokenizer_config.json"], 65024, 2, 0),
    "chatglm3": ("v3", "chatglm3-6b", ["tokenizer.model", "tokenizer_config.json"], 65024, 2, 0),
    "glm4": ("glm4", "glm-4-9b-chat", ["tokenizer.model", "tokenizer_config.json", "generation_config.json"],
             151552, [151329, 151336, 151338], 151329),
}


def thudm_checkpoint(directory, shared_dir, family: str, hidden: int = 128):
    """A random checkpoint with the official layout: config.json of the family, official tensor names."""
    import torch
    from safetensors.torch import save_file

    fixture, tokenizer_dir, files, vocab, eos, pad = FAMILIES[family]
    config = json.loads((shared_dir / "fixtures/chatglm" / fixture / "config.json").read_text())
    heads, groups, head_dim, ffn, layers = 4, 2, hidden // 4, 2 * hidden, 2
    config.update({"hidden_size": hidden, "kv_channels": head_dim, "num_attention_heads": heads,
                   "multi_query_group_num": groups, "ffn_hidden_size": ffn, "num_layers": layers,
                   "num_hidden_layers": layers, "padded_vocab_size": vocab, "vocab_size": vocab,
                   "eos_token_id": eos, "pad_token_id": pad})
    generator = torch.Generator().manual_seed(0)
    std = 1.3 / math.sqrt(hidden)  # non-linear enough for LoRA to memorise (see the tiny demo model)

    def randn(*shape):
        return torch.randn(*shape, generator=generator) * std

    state = {"transformer.embedding.word_embeddings.weight": randn(vocab, hidden),
             "transformer.encoder.final_layernorm.weight": torch.ones(hidden),
             "transformer.output_layer.weight": randn(vocab, hidden)}
    qkv = (heads + 2 * groups) * head_dim
    for i in range(layers):
        prefix = f"transformer.encoder.layers.{i}."
        state.update({prefix + "input_layernorm.weight": torch.ones(hidden),
                      prefix + "post_attention_layernorm.weight": torch.ones(hidden),
                      prefix + "self_attention.query_key_value.weight": randn(qkv, hidden),
                      prefix + "self_attention.query_key_value.bias": randn(qkv),
                      prefix + "self_attention.dense.weight": randn(hidden, heads * head_dim),
                      prefix + "mlp.dense_h_to_4h.weight": randn(2 * ffn, hidden),
                      prefix + "mlp.dense_4h_to_h.weight": randn(hidden, ffn)})
    directory.mkdir(parents=True)
    save_file(state, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config))
    for name in files:
        shutil.copy(shared_dir / "tokenizers" / tokenizer_dir / name, directory / name)
    return directory


# Each family memorises at least 7 of the 8 answers (the untuned random model answers none of them).
@pytest.mark.parametrize("family", ["glm4", "chatglm3", "chatglm2"])
def test_lora_through_prepare_train_infer(cli, tmp_path, shared_dir, family, demo_rows):
    steps, exact_at_least = 80, 7
    model = thudm_checkpoint(tmp_path / "model", shared_dir, family)
    rows = demo_rows[:8]
    data = write_json(tmp_path / "data.json", rows)
    assert cli("prepare", "--jsonl_path", data, "--save_path", tmp_path / "data", "--model", model).code == 0
    result = cli("train", "--dataset_path", tmp_path / "data", "--output_dir", tmp_path / "run",
                 "--max_steps", str(steps), "--per_device_train_batch_size", "8", "--learning_rate", "1e-2",
                 "--lora_rank", "16", "--lora_dropout", "0", "--logging_steps", "10", "--save_strategy", "no",
                 "--precision", "fp32")  # the same run on CPUs with and without bf16 units
    assert result.code == 0, result.err
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["base_model"] == str(model)
    result = cli("infer", "--peft_path", tmp_path / "run", "--input", data, "--output", tmp_path / "out.jsonl",
                 "--max_new_tokens", "40")
    assert result.code == 0, result.err
    answers = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [a["instruction"] for a in answers] == [r["instruction"] for r in rows]
    exact = sum(a["response"] == a["output"] for a in answers)
    assert exact >= exact_at_least, [(a["output"], a["response"]) for a in answers]
