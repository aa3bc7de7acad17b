"""Packed batches (samples end to end, positions restarting, no padding) compute exactly what the samples
compute one by one: same loss, same gradients."""

from __future__ import annotations

import json

import pytest
import torch

from glmtune.train.batching import make_collator, supports_packing


def samples(vocab: int, lengths: list[int], seed: int = 0) -> list[dict[str, list[int]]]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(5, vocab, (n,), generator=generator).tolist()
        labels = [-100] * (n // 3) + ids[n // 3:]  # a prompt without loss, then the answer
        out.append({"input_ids": ids, "labels": labels})
    return out


def one_by_one(model, batch: list[dict[str, list[int]]]) -> torch.Tensor:
    """The reference: each sample alone; the batch loss is the mean over all supervised tokens."""
    total, count = 0.0, 0
    for sample in batch:
        n = sum(label != -100 for label in sample["labels"][1:])
        out = model(input_ids=torch.tensor([sample["input_ids"]]), labels=torch.tensor([sample["labels"]]),
                    use_cache=False)
        total, count = total + out.loss * n, count + n
    return total / count


def tiny_glm():
    from transformers import GlmConfig, GlmForCausalLM

    torch.manual_seed(0)
    return GlmForCausalLM(GlmConfig(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=0,
                                    eos_token_id=1))


def chatglm3_fixture(shared_dir):
    from glmtune.models.loading import load_model

    return load_model(str(shared_dir / "fixtures" / "chatglm" / "v3"))  # ChatGLM3's layout, converted


@pytest.mark.parametrize("build", ["glm", "chatglm3"])
def test_packed_batch_gives_the_loss_and_gradients_of_its_samples_one_by_one(build, request):
    model = tiny_glm() if build == "glm" else chatglm3_fixture(request.getfixturevalue("shared_dir"))
    model.float().train()
    model.config.use_cache = False
    assert supports_packing(model)
    batch = samples(model.config.vocab_size, [9, 23, 4, 16])
    reference = one_by_one(model, batch)
    reference.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    packed = make_collator(None, packing=True)(batch)
    # Rows no longer than the longest sample (23), first-fit longest first: [23], [16 + 4], [9].
    assert packed["input_ids"].shape == (3, 23)
    assert "attention_mask" not in packed  # the restarting positions keep the samples apart
    assert_same_loss_and_gradients(model, packed, reference, grads)


def assert_same_loss_and_gradients(model, inputs, reference: torch.Tensor, grads: dict[str, torch.Tensor]) -> None:
    loss = model(**inputs).loss
    loss.backward()
    assert abs(loss.item() - reference.item()) < 1e-5
    for name, parameter in model.named_parameters():
        if name in grads:
            assert torch.allclose(parameter.grad, grads[name], atol=1e-6, rtol=1e-4), name


def test_packing_trains_like_padding(cli, tiny_model, tmp_path, demo_rows):
    from conftest import write_json

    data = write_json(tmp_path / "rows.json", demo_rows[:8])
    assert cli("prepare", "--jsonl_path", data, "--save_path", tmp_path / "data", "--model", tiny_model).code == 0
    runs = {}
    for packing in ("true", "false"):
        result = cli("train", "--dataset_path", tmp_path / "data", "--output_dir", tmp_path / packing, "--max_steps",
                     "3", "--per_device_train_batch_size", "4", "--logging_steps", "1", "--packing", packing,
                     "--seed", "5", "--lora_dropout", "0", "--precision", "fp32")  # fp32: exact comparison
        assert result.code == 0, result.err
        runs[packing] = json.loads((tmp_path / packing / "manifest.json").read_text())
    assert runs["true"]["config"]["packing"] is True and runs["false"]["config"]["packing"] is False
    # GLM's attention is plain causal attention: one-row batches, attention sample by sample (test_packed_attention)
    assert [runs[p]["config"]["attention"] for p in ("true", "false")] == ["glmtune_packed_sdpa", "sdpa"]
    assert abs(runs["true"]["train_loss"] - runs["false"]["train_loss"]) < 1e-4


def test_rows_of_one_sample_keep_plain_positions_so_no_mask_is_built():
    from transformers.masking_utils import find_packed_sequence_indices

    model = tiny_glm().float()
    batch = samples(model.config.vocab_size, [7, 5, 3])  # no two fit together in rows of 7: one sample per row
    packed = make_collator(None, packing=True)(batch)
    assert packed["position_ids"].tolist() == [list(range(7))] * 3  # the padding tails continue their sample
    assert find_packed_sequence_indices(packed["position_ids"]) is None  # plain causal attention, no mask
    assert abs(model(**packed).loss.item() - one_by_one(model, batch).item()) < 1e-5


def test_rows_grow_past_the_longest_sample_when_that_computes_less():
    from glmtune.train.batching import PackedRowsCollator

    model = tiny_glm().float()
    model.config.use_cache = False  # as the Trainer sets it: with a cache, transformers builds no packed mask
    batch = samples(model.config.vocab_size, [20, 19, 20, 19])
    # Without the model's width: rows of at most the longest sample, here one sample each (4 x 20, 1 padded token).
    assert PackedRowsCollator(0)(batch)["input_ids"].shape == (4, 20)
    # A wide model, whose attention is cheap next to its linear layers: two samples a row (2 x 39, no padding).
    packed = PackedRowsCollator(0, hidden_size=4096)(batch)
    assert packed["input_ids"].shape == (2, 39)
    assert abs(model(**packed).loss.item() - one_by_one(model, batch).item()) < 1e-5
    # A narrow one: the wider rows' attention would cost more than the padding saved.
    assert PackedRowsCollator(0, hidden_size=8)(batch)["input_ids"].shape == (4, 20)
