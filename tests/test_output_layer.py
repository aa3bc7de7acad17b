"""A loaded model's output layer reads contiguous hidden states, so one position's logits of a batch of rows
(`logits_to_keep=1`: training's chunked loss, generation's prefill) never make torch broadcast and copy the whole
output weight per row (glmtune/models/output_layer.py), and those logits are the full forward's last ones."""

from __future__ import annotations

import pytest
from test_chatglm6b_pipeline import thudm_chatglm6b


@pytest.fixture(params=["glm", "chatglm6b"])
def model_dir(request, tiny_model, shared_dir, tmp_path):
    return tiny_model if request.param == "glm" else thudm_chatglm6b(tmp_path / "chatglm6b", shared_dir)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_one_positions_logits_of_several_rows_come_from_contiguous_states(model_dir, dtype):
    import torch

    from glmtune.models.loading import load_model

    model = load_model(str(model_dir), dtype=getattr(torch, dtype)).eval()
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda module, args, out: seen.append(args[0]))
    # ChatGLM-6B reads its positions from [gMASK] <sop>, which its prompts end with; other models take them as text
    ids = torch.cat([torch.randint(5, 200, (3, 7)), torch.tensor([[130001, 130004]] * 3) % model.config.vocab_size],
                    dim=1)
    with torch.no_grad():
        whole = model(input_ids=ids).logits[:, -1:]
        last = model(input_ids=ids, logits_to_keep=1).logits
    assert seen[-1].shape[:2] == (3, 1) and seen[-1].is_contiguous()
    tolerance = 1e-5 if dtype == "float32" else 2e-2  # the products' blocking differs with the row count
    torch.testing.assert_close(last.float(), whole.float(), rtol=tolerance, atol=tolerance)
