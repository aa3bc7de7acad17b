"""ChatGLM2-6B, ChatGLM3-6B and GLM-4-9B-chat checkpoints (official parameter names) load as transformers'
GlmForCausalLM without remote code, and compute what the official code computed on them
(../shared/fixtures/chatglm/{v2,v3,glm4}/golden.json)."""

from __future__ import annotations

import json

import pytest

FAMILIES = ["v2", "v3", "glm4"]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, shared_dir):
    from glmtune.models.loading import load_model

    directory = shared_dir / "fixtures" / "chatglm" / request.param
    golden = json.loads((directory / "golden.json").read_text(encoding="utf-8"))
    return load_model(str(directory)), golden


def test_loads_as_native_glm(family):
    model, _ = family
    assert type(model).__name__ == "GlmForCausalLM"


def test_logits_and_loss_match_the_official_code(family):
    import torch

    model, golden = family
    for name, sequence in golden["sequences"].items():
        with torch.no_grad():
            out = model(input_ids=torch.tensor([sequence["input_ids"]]), labels=torch.tensor([sequence["labels"]]))
        assert (out.logits - torch.tensor(sequence["logits"])).abs().max().item() < 1e-4, name
        assert abs(out.loss.item() - sequence["loss"]) < 1e-5, name


def test_greedy_generation_through_the_cache_matches_step_by_step(family):
    import torch

    model, golden = family
    for name, sequence in golden["sequences"].items():
        for case in ("generate_from_prompt", "generate_continue"):
            expected = sequence[case]
            ids = torch.tensor([expected["input_ids"]])
            with torch.no_grad():
                out = model.generate(input_ids=ids, max_new_tokens=expected["n_new"], do_sample=False,
                                     num_beams=1, use_cache=True, return_dict_in_generate=True, output_scores=True,
                                     eos_token_id=None)
            assert out.sequences[0, ids.shape[1]:].tolist() == expected["new_ids"], (name, case)
            scores = torch.stack([s[0] for s in out.scores])  # (steps, vocab)
            assert (scores - torch.tensor(expected["step_scores"])).abs().max().item() < 1e-4, (name, case)


def test_left_padded_batch_gives_the_same_logits_at_real_positions(family):
    import torch

    model, golden = family
    sequences = list(golden["sequences"].values())
    width = max(len(s["input_ids"]) for s in sequences)
    pad = model.config.pad_token_id
    ids = torch.tensor([[pad] * (width - len(s["input_ids"])) + s["input_ids"] for s in sequences])
    mask = torch.tensor([[0] * (width - len(s["input_ids"])) + [1] * len(s["input_ids"]) for s in sequences])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    for row, sequence in enumerate(sequences):
        real = logits[row, width - len(sequence["input_ids"]):]
        assert (real - torch.tensor(sequence["logits"])).abs().max().item() < 1e-4  # (seq, vocab)


def test_a_few_lora_steps_run_and_lower_the_loss(shared_dir):
    import torch
    from peft import LoraConfig, get_peft_model

    from glmtune.models.loading import load_model
    from glmtune.models.lora import resolve_target_modules

    directory = shared_dir / "fixtures" / "chatglm" / "glm4"
    golden = json.loads((directory / "golden.json").read_text(encoding="utf-8"))
    model = load_model(str(directory))
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=resolve_target_modules(
        model.config.model_type, None)))
    sequence = golden["sequences"]["long"]
    ids, labels = torch.tensor([sequence["input_ids"]]), torch.tensor([sequence["labels"]])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert abs(losses[0] - sequence["loss"]) < 1e-4  # LoRA starts as the identity
    assert losses[-1] < losses[0] - 0.5


def test_rope_ratio_scales_the_base_or_interpolates_positions_as_the_checkpoint_code_does(shared_dir, tmp_path):
    import torch

    from glmtune.models.chatglm.convert import glm_config

    config = json.loads((shared_dir / "fixtures/chatglm/v2/config.json").read_text())

    def rotary(settings: dict, directory=None):
        from transformers.models.glm.modeling_glm import GlmRotaryEmbedding

        glm = glm_config({**config, **settings}, directory)
        return GlmRotaryEmbedding(config=glm), glm.rope_parameters

    plain, _ = rotary({})
    scaled, params = rotary({"rope_ratio": 50})  # ChatGLM3-32K / GLM-4 style: a larger base
    assert params["rope_theta"] == 500000.0 and params["rope_type"] == "default"
    (tmp_path / "modeling_chatglm.py").write_text(
        "seq_idx = torch.arange(seq_len, dtype=torch.float, device=device) / self.rope_ratio\n")
    interpolated, params = rotary({"rope_ratio": 16}, tmp_path)  # ChatGLM2-6B-32K: positions / rope_ratio
    assert params["rope_type"] == "linear"
    x = torch.zeros(1, 1, 8)
    cos_i, sin_i = interpolated(x, torch.tensor([[160]]))
    inv_freq = plain.inv_freq  # reference: the plain rotary angles at position 160 / 16 = 10
    assert torch.allclose(cos_i[0, 0, : inv_freq.numel()], torch.cos(10.0 * inv_freq), atol=1e-5)
    assert torch.allclose(sin_i[0, 0, : inv_freq.numel()], torch.sin(10.0 * inv_freq), atol=1e-5)
    assert not torch.allclose(scaled.inv_freq, plain.inv_freq)


def test_per_head_qkv_layout_without_multi_query_attention(shared_dir, tmp_path):
    """A checkpoint without multi_query_attention fuses q/k/v per head ([q_h; k_h; v_h] rows, the official view
    (heads, 3 * head_dim)). Rebuilt from the MQA fixture by giving every head its group's key and value, the
    official computation is unchanged, so the converted model must reproduce the fixture's logits."""
    import torch
    from safetensors.torch import load_file, save_file

    from glmtune.models.loading import load_model

    source = shared_dir / "fixtures" / "chatglm" / "v2"
    config = json.loads((source / "config.json").read_text())
    golden = json.loads((source / "golden.json").read_text())
    heads, groups = config["num_attention_heads"], config["multi_query_group_num"]
    d = config.get("kv_channels") or config["hidden_size"] // heads
    state = load_file(str(source / "model.safetensors"))
    for name in [n for n in state if "query_key_value" in n]:
        q, k, v = state[name].split([heads * d, groups * d, groups * d])
        group = [h * groups // heads for h in range(heads)]
        state[name] = torch.cat([torch.cat([q[h * d:(h + 1) * d], k[g * d:(g + 1) * d], v[g * d:(g + 1) * d]])
                                 for h, g in enumerate(group)])
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({**config, "multi_query_attention": False}))
    model = load_model(str(tmp_path))
    assert model.config.num_key_value_heads == heads
    sequence = golden["sequences"]["long"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([sequence["input_ids"]])).logits
    assert (logits - torch.tensor(sequence["logits"])).abs().max().item() < 1e-4
