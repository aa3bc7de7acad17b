"""The chunked loss equals the plain one (value and gradients), without holding the whole logits."""

from __future__ import annotations

import pytest
import torch

from glmtune.train.loss import _is_frozen_linear, chunked_causal_lm_loss


@pytest.fixture
def model_and_batch():
    from transformers import GlmConfig, GlmForCausalLM

    torch.manual_seed(0)
    config = GlmConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=0, eos_token_id=1)
    model = GlmForCausalLM(config).float()
    ids = torch.randint(2, 1000, (3, 40))
    labels = ids.clone()
    labels[:, :15] = -100  # prompts
    labels[1, 30:] = -100  # padding
    return model, ids, labels


@pytest.mark.parametrize("chunk_tokens", [7, 1024])
@pytest.mark.parametrize("frozen_output_layer", [False, True])  # LoRA's case: the states' gradient in the same pass
def test_value_and_gradients_equal_the_plain_loss(model_and_batch, chunk_tokens, frozen_output_layer):
    model, ids, labels = model_and_batch
    model.lm_head.weight.requires_grad_(not frozen_output_layer)
    plain = model(input_ids=ids, labels=labels, use_cache=False).loss  # transformers' own loss, the reference
    plain.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    assert _is_frozen_linear(model.lm_head) == frozen_output_layer
    out = model(input_ids=ids, output_hidden_states=True, logits_to_keep=1, use_cache=False)
    chunked = chunked_causal_lm_loss(out.hidden_states[-1], model.lm_head, labels, chunk_tokens=chunk_tokens,
                                     logits_budget_bytes=0 if chunk_tokens < 1024 else 2**30)  # chunked; one pass
    chunked.backward()
    assert abs(chunked.item() - plain.item()) < 1e-5
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert torch.allclose(parameter.grad, reference[name], atol=1e-6, rtol=1e-4), name


def test_num_items_in_batch_normalises_like_the_trainer(model_and_batch):
    model, ids, labels = model_and_batch
    out = model(input_ids=ids, output_hidden_states=True, logits_to_keep=1, use_cache=False)
    supervised = int((labels[:, 1:] != -100).sum())
    mean = chunked_causal_lm_loss(out.hidden_states[-1], model.lm_head, labels)
    summed = chunked_causal_lm_loss(out.hidden_states[-1], model.lm_head, labels, num_items_in_batch=2 * supervised)
    assert torch.allclose(summed * 2, mean, atol=1e-6)


@pytest.mark.parametrize(("zero3", "frozen_output_layer", "chunk_calls", "gathers"), [
    (False, False, [16, 16, 16, 16, 1], 0),  # a trained output layer: chunks, each recomputed in backward
    (False, True, [], 0),  # LoRA's frozen output layer: its weight read directly, chunk by chunk
    (True, True, [], 1),  # ZeRO-3: that weight gathered once for all the chunks
    (True, False, [65], 0),  # ZeRO-3, a trained output layer: one call, which ZeRO-3 gathers
])
def test_under_deepspeed_zero3_the_output_weight_is_gathered_once_per_step(model_and_batch, tmp_path, monkeypatch,
                                                                          zero3, frozen_output_layer, chunk_calls,
                                                                          gathers):
    """ZeRO-3 keeps weights partitioned outside their layer's forward: a chunk recomputed in backward would find the
    output layer's weight partitioned again, and processes with different supervised-token counts would gather a
    different number of times (a hang). deepspeed is simulated (not a requirement); bench/deepspeed_cpu_check.sh
    runs the real one."""
    import contextlib

    from transformers import TrainingArguments

    import glmtune.train.loss as loss_module

    model, ids, labels = model_and_batch
    model.lm_head.weight.requires_grad_(not frozen_output_layer)
    monkeypatch.setattr(loss_module, "LOGITS_BUDGET_BYTES", 0)  # this small batch would be chunked...
    monkeypatch.setattr(loss_module, "CHUNK_TOKENS", 16)  # ... by 16 tokens
    monkeypatch.setattr(loss_module, "is_deepspeed_zero3_enabled", lambda: zero3)
    gathered = []
    monkeypatch.setattr(loss_module, "_gathered", lambda parameter: gathered.append(parameter) or
                        contextlib.nullcontext())
    trainer = loss_module.ChunkedLossTrainer(model=model, args=TrainingArguments(
        str(tmp_path), use_cpu=True, report_to="none", average_tokens_across_devices=False))
    calls = []
    model.lm_head.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    loss = trainer.compute_loss(model, {"input_ids": ids, "labels": labels, "use_cache": False})
    assert int((labels[:, 1:] != -100).sum()) == 65
    assert calls[0] == 3  # the model's own call, logits of the last position only (logits_to_keep=1)
    assert calls[1:] == chunk_calls
    assert len(gathered) == gathers and all(parameter is model.lm_head.weight for parameter in gathered)
    assert abs(loss.item() - model(input_ids=ids, labels=labels, use_cache=False).loss.item()) < 1e-5


def test_a_frozen_output_layer_is_chunked_even_when_its_logits_fit_the_budget(model_and_batch):
    """LoRA's frozen output layer never takes the one-pass autograd cross-entropy (its whole-batch fp32 temporaries
    cost more than the chunks, docs/benchmarks.md): its weight is read directly, the layer's forward never runs."""
    model, ids, labels = model_and_batch
    model.lm_head.weight.requires_grad_(False)
    out = model(input_ids=ids, output_hidden_states=True, logits_to_keep=1, use_cache=False)
    calls = []
    model.lm_head.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    loss = chunked_causal_lm_loss(out.hidden_states[-1], model.lm_head, labels, logits_budget_bytes=2**30)
    assert calls == []
    assert abs(loss.item() - model(input_ids=ids, labels=labels, use_cache=False).loss.item()) < 1e-5
