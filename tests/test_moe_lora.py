"""Expert LoRA on glm4_moe (GLM-4.5/4.6/4.7): the default adapter reaches the fused routed experts, the shared
experts and the dense MLP, trains them, fits better than attention-only LoRA on the same steps, and merges
provably; the router stays frozen unless --train_router; the MoE options are refused on other models."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
from safetensors.torch import load_file

from glmtune.demo import demo_data_path

TRAIN = ["--max_steps", "20", "--per_device_train_batch_size", "8", "--learning_rate", "3e-3", "--lora_dropout", "0",
         "--save_strategy", "no", "--logging_steps", "5", "--seed", "1"]
ATTENTION = ["--target_modules", "q_proj,k_proj,v_proj,o_proj"]


@pytest.fixture(scope="module")
def moe(tmp_path_factory, tiny_model):
    """A tiny glm4_moe (8 experts, 2 active) and the demo data prepared for it."""
    from glmtune.cli import main
    from glmtune.models.tiny_moe import build_tiny_glm4_moe

    tmp = tmp_path_factory.mktemp("moe")
    model = build_tiny_glm4_moe(tmp / "model", tiny_model)
    assert main(["prepare", "--jsonl_path", str(demo_data_path()), "--save_path", str(tmp / "data"),
                 "--model", str(model)]) == 0
    return tmp


def train(moe, name: str, *extra: str):
    from glmtune.cli import main

    assert main(["train", "--dataset_path", str(moe / "data"), "--output_dir", str(moe / name), *TRAIN, *extra]) == 0
    return moe / name


def last_loss(run) -> float:
    import json

    return json.loads((run / "manifest.json").read_text())["last_logged_loss"]


@pytest.fixture(scope="module")
def experts_run(moe):
    return train(moe, "experts")


def test_expert_adapter_weights_exist_and_are_trained(experts_run):
    import json

    config = json.loads((experts_run / "manifest.json").read_text())["config"]
    assert config["packing"] and config["chunked_loss"]  # trained packed, with the chunked loss
    weights = load_file(experts_run / "adapter_model.safetensors")
    for part in ("layers.1.mlp.experts.lora_B", "layers.1.mlp.experts.base_layer.lora_B",  # down_proj, gate_up_proj
                 "layers.1.mlp.shared_experts.gate_proj.lora_B", "layers.0.mlp.down_proj.lora_B",
                 "layers.2.self_attn.q_proj.lora_B"):
        (name,) = [key for key in weights if part in key]
        assert weights[name].abs().max() > 0, name  # lora_B starts at zero: training moved it
    assert not [key for key in weights if ".mlp.gate." in key]  # the router is frozen by default


def test_expert_lora_fits_better_than_attention_only_on_the_same_steps(moe, experts_run):
    attention = train(moe, "attention", *ATTENTION)
    assert last_loss(experts_run) < last_loss(attention) - 0.1


def test_merge_proof_holds_with_expert_adapters_and_a_trained_router(moe):
    from glmtune.cli import main

    run = train(moe, "router", "--train_router", "true", "--moe_aux_loss_coef", "0.01", "--max_steps", "6")
    weights = load_file(run / "adapter_model.safetensors")
    routers = [key for key in weights if key.endswith("mlp.gate.weight")]
    base = load_file(moe / "model" / "model.safetensors")
    assert len(routers) == 2
    assert not torch.equal(weights[routers[0]], base[routers[0].removeprefix("base_model.model.")])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["merge", "--peft_path", str(run), "--output_dir", str(moe / "merged"), "--dtype", "fp32"]) == 0
    assert "merge proof: largest |logit difference|" in out.getvalue()


def test_moe_options_are_refused_on_a_model_without_experts(cli, tiny_model, tmp_path):
    from glmtune.cli import main

    assert main(["prepare", "--jsonl_path", str(demo_data_path()), "--save_path", str(tmp_path / "data"),
                 "--model", str(tiny_model)]) == 0
    result = cli("train", "--dataset_path", str(tmp_path / "data"), "--output_dir", str(tmp_path / "run"),
                 "--max_steps", "1", "--train_router", "true")
    assert result.code != 0
    assert "--train_router" in result.err and "not a mixture of experts" in result.err


def test_balance_loss_is_one_when_balanced_and_its_gradient_reaches_the_router():
    from glmtune.models.moe import _AddAuxGradient, balance_loss

    even = torch.tensor([[0, 1], [2, 3], [0, 2], [1, 3]])
    assert balance_loss(torch.zeros(4, 4), even).item() == pytest.approx(1.0)
    logits = torch.tensor([[3.0, 2.0, -1.0, -1.0]] * 4, requires_grad=True)
    piled = torch.tensor([[0, 1]] * 4)
    assert balance_loss(logits.detach(), piled).item() > 1.0
    weights = logits.sigmoid()
    _AddAuxGradient.apply(weights, balance_loss(logits, piled), 0.5).sum().backward()
    with_aux = logits.grad.clone()
    logits.grad = None
    logits.sigmoid().sum().backward()
    assert not torch.allclose(with_aux, logits.grad)


@pytest.fixture(scope="module")
def moe_pairs(moe):
    """Preference pairs from the demo rows (chosen: a row's own answer, rejected: the next row's), prepared for the
    tiny glm4_moe."""
    import json

    from conftest import write_json

    from glmtune.cli import main

    rows = json.loads(demo_data_path().read_text(encoding="utf-8"))[:8]
    pairs = [{"prompt": row["instruction"], "chosen": row["output"], "rejected": rows[(i + 1) % 8]["output"]}
             for i, row in enumerate(rows)]
    data = write_json(moe / "pairs.json", pairs)
    assert main(["prepare", "--jsonl_path", str(data), "--save_path", str(moe / "pairs"), "--model",
                 str(moe / "model"), "--max_seq_length", "64"]) == 0
    return moe / "pairs"


def dpo(moe, pairs, name: str, *extra: str):
    from glmtune.cli import main

    assert main(["dpo", "--dataset_path", str(pairs), "--output_dir", str(moe / name), "--max_steps", "2",
                 "--per_device_train_batch_size", "8", "--learning_rate", "3e-3", "--precision", "fp32",
                 "--lora_dropout", "0", "--save_strategy", "no", "--logging_steps", "1", "--seed", "1", *extra]) == 0
    return load_file(moe / name / "adapter_model.safetensors")


def routers(weights) -> dict:
    return {key: value for key, value in weights.items() if key.endswith("mlp.gate.weight")}


def test_dpo_trains_the_experts_and_the_router_only_with_train_router_and_applies_the_aux_loss(moe, moe_pairs):
    """dpo with the MoE options: the default adapter's expert weights move and the router stays frozen; with
    --train_router the router is trained (saved whole), and --moe_aux_loss_coef changes what it learns on the same
    steps (the balance loss's gradient reaches it)."""
    base = load_file(moe / "model" / "model.safetensors")
    default = dpo(moe, moe_pairs, "dpo")
    for part in ("layers.1.mlp.experts.lora_B", "layers.2.mlp.experts.base_layer.lora_B",
                 "layers.1.mlp.shared_experts.gate_proj.lora_B"):
        (name,) = [key for key in default if part in key]
        assert default[name].abs().max() > 0, name  # lora_B starts at zero: DPO moved it
    assert not routers(default)

    balanced = routers(dpo(moe, moe_pairs, "dpo-router-aux", "--train_router", "true", "--moe_aux_loss_coef", "1"))
    plain = routers(dpo(moe, moe_pairs, "dpo-router", "--train_router", "true"))
    assert sorted(balanced) == sorted(plain) and len(plain) == 2  # the two MoE layers' routers
    for key, weight in plain.items():
        assert not torch.equal(weight, base[key.removeprefix("base_model.model.")])  # trained
        assert not torch.allclose(weight, balanced[key], atol=1e-6)  # and the aux loss changed the update
