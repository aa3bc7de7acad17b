"""The fused LoRA linear computes what peft's LoRA Linear computes, and leaves every other case to peft."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import GlmConfig, GlmForCausalLM

from glmtune.train.fused_lora import FusedLoraLinear, fuse_lora_linears

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]


def _lora_model(dtype: torch.dtype = torch.float32, dropout: float = 0.0):
    torch.manual_seed(0)
    config = GlmConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_bias=True, pad_token_id=0)
    model = get_peft_model(GlmForCausalLM(config).to(dtype),
                           LoraConfig(r=4, lora_alpha=16, lora_dropout=dropout, target_modules=TARGETS))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: give the adapter something to contribute
            torch.nn.init.normal_(parameter, std=0.1)
    return model


def _loss_and_gradients(model, ids, autocast=False):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_fused_lora_gives_peft_loss_and_gradients_in_fp32():
    plain = _lora_model()
    fused = copy.deepcopy(plain)
    assert fuse_lora_linears(fused) == 2 * len(TARGETS)
    ids = torch.randint(0, 300, (2, 40))
    loss, gradients = _loss_and_gradients(plain, ids)
    fused_loss, fused_gradients = _loss_and_gradients(fused, ids)
    torch.testing.assert_close(fused_loss, loss, rtol=1e-6, atol=1e-6)
    assert gradients.keys() == fused_gradients.keys() and gradients
    for name, gradient in gradients.items():
        torch.testing.assert_close(fused_gradients[name], gradient, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_lora_under_bf16_autocast_is_as_close_to_fp32_as_peft():
    ids = torch.randint(0, 300, (2, 40))
    reference = _loss_and_gradients(_lora_model(torch.bfloat16).float(), ids)[1]
    plain = _loss_and_gradients(_lora_model(torch.bfloat16), ids, autocast=True)[1]
    fused_model = _lora_model(torch.bfloat16)
    fuse_lora_linears(fused_model)
    fused = _loss_and_gradients(fused_model, ids, autocast=True)[1]

    def error(gradients):
        relative = [(gradients[k].float() - reference[k]).norm() / reference[k].norm() for k in reference]
        return sum(relative) / len(relative)

    assert all(g.dtype == torch.float32 for g in fused.values())  # the adapter's gradients in its own fp32
    assert error(fused) <= 1.1 * error(plain)


def test_fused_lora_leaves_disabled_adapters_and_dropout_to_peft():
    fused = _lora_model(dropout=0.5)
    fuse_lora_linears(fused)
    layer = next(m for m in fused.modules() if isinstance(m, FusedLoraLinear))
    x = torch.randn(3, layer.in_features)
    with fused.disable_adapter():
        torch.testing.assert_close(layer(x), layer.base_layer(x))
    fused.eval()  # dropout is the identity in eval: the fused path, the same sums
    expected = layer.base_layer(x) + layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"]
    torch.testing.assert_close(layer(x), expected)
    fused.train()
    assert layer._plain_adapter((), {}) is None  # dropout active: peft's own forward


@pytest.mark.parametrize("bias", [True, False])
def test_fused_lora_product_gradients_match_autograd(bias):
    torch.manual_seed(0)
    base = torch.nn.Linear(8, 6, bias=bias)
    x = torch.randn(5, 8, requires_grad=True)
    a, b = torch.randn(2, 8, requires_grad=True), torch.randn(6, 2, requires_grad=True)
    from glmtune.train.fused_lora import _LoraProduct

    out = _LoraProduct.apply(x, base.weight, base.bias, a, b, 3.0)
    expected = base(x) + (x @ a.t()) @ b.t() * 3.0
    torch.testing.assert_close(out, expected)
    assert torch.autograd.gradcheck(lambda *t: _LoraProduct.apply(*t, 3.0),
                                    (x.double(), base.weight.double().detach().requires_grad_(),
                                     None if base.bias is None else base.bias.double().detach().requires_grad_(),
                                     a.double(), b.double()))


def test_every_method_trains_fused_lora_layers_new_or_started_from_an_adapter(tmp_path):
    """The skeleton's adapter step (which train, dpo, kto, orpo, simpo and grpo all take) fuses every LoRA layer,
    of a new adapter and of an earlier run's adapter trained further (dpo's --peft_path) alike."""
    from glmtune.arguments import LoraArguments
    from glmtune.train.skeleton import attach_adapter

    def base():
        torch.manual_seed(0)
        return GlmForCausalLM(GlmConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=0))

    lora = LoraArguments(lora_rank=4, lora_dropout=0.0, target_modules=",".join(TARGETS))
    new = attach_adapter(base(), "tiny", lora, seed=0)
    layers = [m for m in new.modules() if hasattr(m, "lora_A")]
    assert len(layers) == 2 * len(TARGETS) and all(type(m) is FusedLoraLinear for m in layers)
    new.save_pretrained(str(tmp_path / "adapter"))
    started = attach_adapter(base(), "tiny", lora, seed=0, start_adapter=tmp_path / "adapter")
    layers = [m for m in started.modules() if hasattr(m, "lora_A")]
    assert len(layers) == 2 * len(TARGETS) and all(type(m) is FusedLoraLinear for m in layers)
