"""The whole batch in one row, attention sample by sample (packed_attention.PACKED_SDPA + OneRowCollator): the loss
and gradients of the samples run one by one under the model's own sdpa attention; anything that isn't a packed
training forward (padding masks, generation) computes what sdpa computes."""

from __future__ import annotations

import pytest
import torch
from test_packing import assert_same_loss_and_gradients, one_by_one, samples, tiny_glm

from glmtune.train.batching import OneRowCollator, make_collator
from glmtune.train.packed_attention import PACKED_SDPA, can_use_packed_sdpa, use_packed_sdpa

SMALL = dict(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, pad_token_id=0, eos_token_id=1)


def tiny(kind: str, request):
    torch.manual_seed(0)
    if kind == "glm":
        return tiny_glm()
    if kind == "chatglm3":  # ChatGLM3's layout converted to transformers' GLM
        from test_packing import chatglm3_fixture

        return chatglm3_fixture(request.getfixturevalue("shared_dir"))
    import transformers

    config_class, model_class = {
        "glm4": ("Glm4Config", "Glm4ForCausalLM"),
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    }[kind]
    config = getattr(transformers, config_class)(**SMALL)
    return getattr(transformers, model_class)(config)


@pytest.mark.parametrize("kind", ["glm", "glm4", "chatglm3", "llama", "qwen2"])
def test_one_row_batch_gives_the_loss_and_gradients_of_its_samples_one_by_one(kind, request):
    model = tiny(kind, request).float().train()
    model.config.use_cache = False  # as the Trainer sets it
    assert model.config._attn_implementation == "sdpa" and can_use_packed_sdpa(model)
    batch = samples(model.config.vocab_size, [9, 23, 4, 16])
    reference = one_by_one(model, batch)  # the model's own sdpa attention
    reference.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    use_packed_sdpa(model)
    assert model.config._attn_implementation == PACKED_SDPA
    packed = OneRowCollator()(batch)
    assert packed["input_ids"].shape == (1, 52)  # 9 + 23 + 4 + 16: no padding at all
    assert packed["cu_seq_lens_q"].tolist() == [0, 9, 32, 36, 52] and packed["max_length_q"] == 23
    assert_same_loss_and_gradients(model, packed, reference, grads)


def test_restarting_positions_alone_keep_samples_apart():
    """Without the collator's cu_seq_lens (another collator's packed rows), where positions restart still splits."""
    model = tiny_glm().float()
    model.config.use_cache = False
    batch = samples(model.config.vocab_size, [7, 12, 5])
    reference = one_by_one(model, batch).item()
    use_packed_sdpa(model)
    packed = OneRowCollator()(batch)
    for key in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"):
        del packed[key]
    assert abs(model(**packed).loss.item() - reference) < 1e-5
    rows = make_collator(None, packing=True)(batch)  # several rows, position ids only
    assert rows["input_ids"].shape[0] > 1
    assert abs(model(**rows).loss.item() - reference) < 1e-5


def test_rows_never_attend_to_each_other():
    """Rows laid end to end are split at each row's start too, not only where positions restart: transformers'
    own packed-sequence mask (sdpa) is the reference."""
    model = tiny_glm().float()
    model.config.use_cache = False
    ids = torch.randint(5, 500, (2, 6), generator=torch.Generator().manual_seed(2))
    positions = torch.tensor([[0, 1, 2, 0, 1, 2], [3, 4, 5, 6, 7, 8]])  # the second row continues the first's count
    with torch.no_grad():
        expected = model(input_ids=ids, position_ids=positions).logits
        use_packed_sdpa(model)
        actual = model(input_ids=ids, position_ids=positions).logits
    assert torch.allclose(actual, expected, atol=1e-5)


def test_sample_boundaries_that_do_not_cover_the_batch_are_refused():
    """torch.nn.DataParallel splits a one-row batch's tensors along dim 0, cu_seq_lens apart from the row."""
    model = tiny_glm().float()
    model.config.use_cache = False
    use_packed_sdpa(model)
    packed = OneRowCollator()(samples(model.config.vocab_size, [9, 23, 4, 16]))
    packed["cu_seq_lens_q"] = packed["cu_seq_lens_k"] = packed["cu_seq_lens_q"][:3]  # [0, 9, 32] of 52 tokens
    with pytest.raises(ValueError, match="DataParallel"):
        model(**packed)


def test_padded_batches_and_generation_are_untouched():
    model = tiny_glm().float().eval()
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 500, (2, 11), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    right = mask.flip(1)  # right padding
    with torch.no_grad():
        expected = [model(input_ids=ids, attention_mask=m, use_cache=False).logits for m in (mask, right)]
        tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        use_packed_sdpa(model)
        actual = [model(input_ids=ids, attention_mask=m, use_cache=False).logits for m in (mask, right)]
        assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False),
                           tokens)
    for e, a, m in zip(expected, actual, (mask, right), strict=True):
        keep = m.bool()
        assert torch.allclose(e[keep], a[keep], atol=1e-5)


def test_only_plain_causal_attention_is_switched():
    import transformers

    assert not can_use_packed_sdpa(transformers.MistralForCausalLM(transformers.MistralConfig(**SMALL,
                                                                                              sliding_window=8)))
    assert not can_use_packed_sdpa(transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        **SMALL, use_sliding_window=True, sliding_window=8, max_window_layers=0)))
    eager = transformers.GlmForCausalLM(transformers.GlmConfig(**SMALL, attn_implementation="eager"))
    assert not can_use_packed_sdpa(eager)  # a user's explicit choice is kept


def test_short_bf16_samples_attend_in_fp32_on_cpu_and_long_ones_in_bf16():
    """Under the Trainer's bf16 autocast, a sample shorter than CPU_FP32_ATTENTION_BELOW is computed from fp32 operands
    (autocast would cast them back to bf16: it must be off there), a longer one by the bf16 kernel; the outputs are
    bf16 either way, and the gradients reach bf16 inputs."""
    from glmtune.train.packed_attention import CPU_FP32_ATTENTION_BELOW, packed_sdpa_attention

    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.manual_seed(0)
    lengths = [5, CPU_FP32_ATTENTION_BELOW - 1, CPU_FP32_ATTENTION_BELOW + 20]
    tokens = sum(lengths)
    query = torch.randn(1, 4, tokens, 32, dtype=torch.bfloat16, requires_grad=True)  # (batch, heads, tokens, dim)
    key, value = (torch.randn(1, 2, tokens, 32, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    starts = [0, lengths[0], lengths[0] + lengths[1], tokens]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output, _ = packed_sdpa_attention(None, query, key, value, None, cu_seq_lens_q=torch.tensor(starts))
    assert output.dtype == torch.bfloat16 and output.shape == (1, tokens, 4, 32)
    for (start, end), short in zip(zip(starts[:-1], starts[1:], strict=True), [True, True, False], strict=True):
        q, k, v = (t[:, :, start:end] for t in (query, key, value))
        expected = (sdpa(q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True).bfloat16() if short
                    else sdpa(q, k, v, is_causal=True, enable_gqa=True))
        assert torch.equal(output[:, start:end], expected.transpose(1, 2)), (start, end)
    output.float().square().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 and t.grad.abs().sum() > 0
               for t in (query, key, value))
