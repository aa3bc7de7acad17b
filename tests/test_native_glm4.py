"""transformers' own GLM-4 classes (`glm4`, `glm4_moe`) through prepare -> train -> infer, each with the chat
template its tokenizer ships."""

from __future__ import annotations

import json
import math

import pytest
from conftest import write_json

# A template unlike the tiny demo model's (GLM-4-0414 style: the generation prompt ends with a newline), so that
# the test shows the checkpoint's own template is the one used.
OWN_TEMPLATE = ("[gMASK]<sop>{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def native_checkpoint(directory, tiny_model, architecture: str, hidden: int = 128):
    import torch
    from transformers import AutoTokenizer, Glm4Config, Glm4ForCausalLM, Glm4MoeConfig, Glm4MoeForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = OWN_TEMPLATE
    common = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                  initializer_range=1.3 / math.sqrt(hidden), pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|user|>"]),
                  tie_word_embeddings=False)
    if architecture == "glm4":
        model_class, config = Glm4ForCausalLM, Glm4Config(**common)
    else:  # layer 0 dense, layer 1 routed experts + a shared expert
        model_class, config = Glm4MoeForCausalLM, Glm4MoeConfig(
            **common, moe_intermediate_size=hidden // 2, n_routed_experts=4, num_experts_per_tok=2,
            n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1)
    torch.manual_seed(0)
    model_class(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("architecture, adapted", [
    ("glm4", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"}),
    ("glm4_moe", {"q_proj", "k_proj", "v_proj", "o_proj"}),
])
def test_native_glm4_classes_train_and_answer_with_their_own_template(cli, tmp_path, tiny_model, demo_rows,
                                                                      architecture, adapted):
    from transformers import AutoTokenizer

    model = native_checkpoint(tmp_path / "model", tiny_model, architecture)
    rows = demo_rows[:6]
    data = write_json(tmp_path / "data.json", rows)
    assert cli("prepare", "--jsonl_path", data, "--save_path", tmp_path / "data", "--model", model).code == 0

    from datasets import load_from_disk

    sample = load_from_disk(str(tmp_path / "data"))["train"][0]
    first_label = next(i for i, label in enumerate(sample["labels"]) if label != -100)
    tokenizer = AutoTokenizer.from_pretrained(model)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": rows[0]["instruction"]}],
                                           add_generation_prompt=True, return_dict=False)
    assert sample["input_ids"][:first_label] == list(prompt)  # the checkpoint's template, "<|assistant|>\n" included

    result = cli("train", "--dataset_path", tmp_path / "data", "--output_dir", tmp_path / "run", "--max_steps", "60",
                 "--per_device_train_batch_size", "6", "--learning_rate", "1e-2", "--lora_rank", "16",
                 "--lora_dropout", "0", "--logging_steps", "10", "--save_strategy", "no")
    assert result.code == 0, result.err
    adapter = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == adapted
    result = cli("infer", "--peft_path", tmp_path / "run", "--input", data, "--output", tmp_path / "out.jsonl",
                 "--max_new_tokens", "40")
    assert result.code == 0, result.err
    answers = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    exact = sum(a["response"] == a["output"] for a in answers)
    assert exact >= 4, [(a["output"], a["response"]) for a in answers]



