"""glmtune plan: parameter counts against real models, LoRA counts against peft, saved activations against torch's
own saved-tensor hooks, the THUDM config formats, and the command's table, verdict and errors."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from glmtune.plan.memory import (
    CHUNK_TOKENS,
    LOGITS_BUDGET_BYTES,
    Setup,
    estimate,
    layer_activation_bytes,
    weight_bytes,
)
from glmtune.plan.shape import lora_parameter_count, parameter_count, resolve_targets, shape_from_config

# hidden 64, 2 layers, 4 query heads and 2 key/value heads of 16, MLP 96, vocabulary 512
DIMS = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=512)
IDS = dict(pad_token_id=0, eos_token_id=1, bos_token_id=1)


def native(model_type: str, **extra) -> dict:
    return {"model_type": model_type, **DIMS, **IDS, **extra}


def write_config(directory: Path, config: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_glm_parameter_count_is_the_models_by_hand_and_built():
    from transformers import GlmConfig, GlmForCausalLM

    h, i, layers, q, kv, v = 64, 96, 2, 4 * 16, 2 * 16, 512
    per_layer = (h * q + q) + 2 * (h * kv + kv) + q * h + h * 2 * i + i * h + 2 * h  # q/k/v with bias, o, MLP, norms
    by_hand = v * h + layers * per_layer + h + h * v  # embeddings, layers, final norm, untied output layer
    built = sum(p.numel() for p in GlmForCausalLM(GlmConfig(**DIMS, **IDS)).parameters())
    assert parameter_count(shape_from_config(native("glm"))) == by_hand == built


@pytest.mark.parametrize("model_type", ["glm4", "llama", "qwen2", "glm4_moe"])
def test_parameter_count_matches_the_transformers_model(model_type):
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                 first_k_dense_replace=1) if model_type == "glm4_moe" else {}
    config = native(model_type, **extra)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    assert parameter_count(shape_from_config(config)) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("targets", [None, "all-linear", "q_proj,v_proj"])
def test_lora_parameter_count_matches_peft(targets):
    from peft import LoraConfig, get_peft_model
    from transformers import GlmConfig, GlmForCausalLM

    from glmtune.models.lora import resolve_target_modules

    shape = shape_from_config(native("glm"))
    model = get_peft_model(GlmForCausalLM(GlmConfig(**DIMS, **IDS)),
                           LoraConfig(r=4, target_modules=resolve_target_modules("glm", targets)))
    trainable, _ = model.get_nb_trainable_parameters()
    assert lora_parameter_count(shape, resolve_targets(shape, targets), 4) == trainable


MOE = dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
           first_k_dense_replace=1, n_group=1, topk_group=1)


@pytest.mark.parametrize("targets", [None, "q_proj,v_proj"])
def test_moe_counts_match_the_model_and_its_expert_adapter(targets):
    """glm4_moe: total parameters as the model counts them, those a token uses (its top-k of the routed experts),
    and the default adapter's size (attention, dense MLP, shared and fused routed experts) as peft builds it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from glmtune.models.lora import resolve_target_modules, resolve_target_parameters
    from glmtune.plan.shape import active_parameter_count

    config = native("glm4_moe", **MOE)
    shape = shape_from_config(config)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    total = sum(p.numel() for p in model.parameters())
    per_expert = sum(p[0].numel() for name, p in model.named_parameters() if ".experts." in name) // shape.moe_layers
    assert parameter_count(shape) == total
    assert active_parameter_count(shape) == total - shape.moe_layers * (8 - 2) * per_expert
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_dropout=0.0,
                                                  target_modules=resolve_target_modules("glm4_moe", targets),
                                                  target_parameters=resolve_target_parameters("glm4_moe", targets)))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert lora_parameter_count(shape, resolve_targets(shape, targets), 4) == trainable


@pytest.mark.parametrize("targets", [None, "q_proj,v_proj"])
def test_moe_trained_router_counts_as_the_model_trains_it_after_glmtune_attaches_the_adapter(targets):
    """--train_router: plan's trainable parameters are what the model itself has trainable once glmtune's own
    attach_adapter (train's) has added the adapter and the routers' trainable copies; and the copies' memory
    (fp32: weight, gradient and AdamW's two states) is counted."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from glmtune.arguments import LoraArguments
    from glmtune.train.skeleton import attach_adapter

    config = native("glm4_moe", **MOE)
    shape = shape_from_config(config)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    lora = LoraArguments(lora_rank=4, lora_dropout=0.0, target_modules=targets, train_router=True)
    peft_model = attach_adapter(model, "tiny-moe", lora, seed=0)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    routers = sum(p.numel() for name, p in peft_model.named_parameters() if p.requires_grad and ".mlp.gate." in name)
    assert routers == shape.moe_layers * 8 * 64  # n_routed_experts x hidden, per MoE layer
    setup = Setup(seq_len=64, batch_size=2, lora_rank=4, targets=tuple(resolve_targets(shape, targets)),
                  train_router=True)
    with_router, frozen = estimate(shape, setup), estimate(shape, replace(setup, train_router=False))
    assert with_router.trainable_parameters == trainable == frozen.trainable_parameters + routers
    assert with_router.lines["trained router (copy, gradients, optimizer)"] == 16 * routers
    assert "trained router (copy, gradients, optimizer)" not in frozen.lines
    assert with_router.total - frozen.total == 16 * routers


def test_plan_refuses_train_router_on_a_model_without_experts(cli, tmp_path):
    result = cli("plan", "--model", write_config(tmp_path / "glm", native("glm")), "--device", "cpu",
                 "--train_router", "true")
    assert result.code == 2 and "--train_router" in result.err and "not a mixture of experts" in result.err


def test_moe_routers_are_weighed_in_fp32_whatever_the_precision():
    """transformers keeps glm4_moe's routers in fp32 (_keep_in_fp32_modules_strict): a bf16 model's weights are
    every parameter in bf16 but the routers."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = native("glm4_moe", **MOE)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.bfloat16)
    loaded = sum(p.numel() * p.element_size() for p in model.parameters())
    shape = shape_from_config(config)
    setup = Setup(seq_len=64, batch_size=2, lora_rank=4, targets=tuple(resolve_targets(shape, None)), dtype="bf16")
    assert weight_bytes(shape, setup, parameter_count(shape)) == loaded


def test_moe_expert_adapter_memory_is_counted_only_when_experts_are_adapted():
    shape = shape_from_config(native("glm4_moe", **MOE))
    with_experts = estimate(shape, Setup(seq_len=64, batch_size=2, lora_rank=8,
                                         targets=tuple(resolve_targets(shape, None))))
    attention = estimate(shape, Setup(seq_len=64, batch_size=2, lora_rank=8,
                                      targets=tuple(resolve_targets(shape, "q_proj,k_proj,v_proj,o_proj"))))
    assert with_experts.lines["adapted weights (parameter LoRA)"] > 0
    assert "adapted weights (parameter LoRA)" not in attention.lines


def test_breakdown_of_a_small_config_by_hand():
    shape = shape_from_config(native("glm"))
    setup = Setup(seq_len=128, batch_size=2, lora_rank=8, targets=tuple(resolve_targets(shape, None)))
    lines = estimate(shape, setup).lines
    params = 512 * 64 * 2 + 2 * ((64 * 64 + 64) + 2 * (64 * 32 + 32) + 64 * 64 + 64 * 192 + 96 * 64 + 128) + 64
    lora = 2 * 8 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + (64 + 192) + (96 + 64))  # r x (in + out), per layer
    assert lines["weights"] == params * 4
    assert lines["LoRA weights"] == lines["gradients"] == lora * 4
    assert lines["optimizer states"] == lora * 8  # AdamW: two fp32 states
    # LoRA's output layer is frozen: its loss goes chunk by chunk (256 tokens) whatever the logits' size
    assert lines["loss / logits"] == 2 * 128 * 512 * 3 * 4
    longer = estimate(shape, replace(setup, seq_len=1024)).lines
    assert longer["loss / logits"] == CHUNK_TOKENS * 512 * 3 * 4
    # a trained output layer (full tuning) under the budget: one pass over the whole batch's logits
    full = estimate(shape, replace(setup, seq_len=1024, finetuning_type="full")).lines
    assert full["loss / logits"] == 2 * 1024 * 512 * 3 * 4
    big = estimate(shape_from_config(native("glm", vocab_size=151552)), replace(setup, finetuning_type="full")).lines
    assert big["loss / logits"] == CHUNK_TOKENS * 151552 * 3 * 4  # over it: one chunk of 256 tokens at a time


def import_only_rss_bytes() -> int:
    """Peak RSS of a fresh Python that only imported torch, transformers and peft: the floor of any training run."""
    import subprocess
    import sys

    # VmHWM, the new process's own high-water mark: getrusage's ru_maxrss also counts what the forking parent (this
    # test process, large after a whole suite) held before exec.
    code = ("import re, torch, transformers, peft; "
            "print(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    return int(out.stdout.split()[-1]) * 1024


def test_runtime_baseline_lies_between_the_imports_alone_and_twice_them():
    """The CPU baseline (bench/plan_accuracy.py's measurement: imports, thread pools, kernels of a first step) is
    more than a process that only imported the libraries holds, and not wildly more."""
    shape = shape_from_config(native("glm"))
    baseline = estimate(shape, Setup(seq_len=8, batch_size=1, lora_rank=8, targets=())).lines["runtime baseline"]
    floor = import_only_rss_bytes()
    assert floor < baseline < 2 * floor, (floor / 2**30, baseline / 2**30)


def test_loss_constants_are_the_losss_own():
    from glmtune.train import loss

    assert (CHUNK_TOKENS, LOGITS_BUDGET_BYTES) == (loss.CHUNK_TOKENS, getattr(loss, "LOGITS_BUDGET_BYTES", None))


def _saved_bytes_per_token(dtype: torch.dtype, dropout: float, attention: str) -> float:
    """What one GlmDecoderLayer with peft LoRA saves for backward, per token, as torch's hooks see it."""
    from peft import LoraConfig, get_peft_model
    from transformers import GlmConfig, GlmForCausalLM

    torch.manual_seed(0)
    model = GlmForCausalLM(GlmConfig(**DIMS, **IDS, attn_implementation=attention)).to(dtype)
    model = get_peft_model(model, LoraConfig(r=8, lora_dropout=dropout, target_modules="all-linear"))
    inner = model.base_model.model.model
    batch, seq = 2, 32
    hidden = inner.embed_tokens(torch.randint(0, 512, (batch, seq))).detach().requires_grad_()
    positions = torch.arange(seq)[None].expand(batch, seq)
    rotary = inner.rotary_emb(hidden, positions)
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        inner.layers[0](hidden, position_embeddings=rotary, attention_mask=None, position_ids=positions)
    # Not activations: the weights, the layer's input (the caller's) and the rotary tables (shared by all layers).
    known = {p.untyped_storage().data_ptr() for p in model.parameters()} | {hidden.untyped_storage().data_ptr()}
    known |= {t.untyped_storage().data_ptr() for t in rotary}
    return sum(n for ptr, n in storages.items() if ptr not in known) / (batch * seq)


@pytest.mark.parametrize("dtype,dropout,attention", [("fp32", 0.1, "sdpa"), ("fp32", 0.0, "sdpa"),
                                                     ("bf16", 0.1, "sdpa"), ("fp32", 0.0, "eager")])
def test_layer_activations_are_what_backward_saves(dtype, dropout, attention):
    shape = shape_from_config(native("glm"))
    setup = Setup(seq_len=32, batch_size=2, lora_rank=8, targets=tuple(resolve_targets(shape, "all-linear")),
                  dtype=dtype, lora_dropout=dropout, attention=attention)
    measured = _saved_bytes_per_token({"fp32": torch.float32, "bf16": torch.bfloat16}[dtype], dropout, attention)
    assert layer_activation_bytes(shape, setup) == pytest.approx(measured, rel=0.02)


@pytest.mark.parametrize("version", ["v2", "v3", "glm4"])
def test_thudm_configs_read_as_the_glm_they_convert_to(shared_dir, version):
    from transformers import GlmForCausalLM

    from glmtune.models.chatglm.convert import glm_config

    official = json.loads((shared_dir / "fixtures/chatglm" / version / "config.json").read_text())
    converted = glm_config(official)
    equivalent = shape_from_config({"model_type": "glm", **converted.to_dict()})
    shape = shape_from_config(official)
    assert shape == equivalent
    assert parameter_count(shape) == sum(p.numel() for p in GlmForCausalLM(converted).parameters())


def test_first_chatglm_config_reads_as_glmtunes_chatglm6b(shared_dir):
    from glmtune.models.chatglm6b.configuration import config_from_official
    from glmtune.models.chatglm6b.modeling import ChatGlm6bForCausalLM

    official = json.loads((shared_dir / "fixtures/chatglm/v1/config.json").read_text())
    shape = shape_from_config(official)
    model = ChatGlm6bForCausalLM(config_from_official(official))
    assert shape.model_type == "chatglm6b"
    assert parameter_count(shape) == sum(p.numel() for p in model.parameters())
    assert [t.name for t in resolve_targets(shape, None)] == ["query_key_value"]


def test_cli_prints_the_breakdown_and_fits(cli, tmp_path):
    model = write_config(tmp_path / "m", native("glm"))
    result = cli("plan", "--model", model, "--device", "cpu", "--device_memory_gib", "8",
                 "--max_seq_length", "256", "--per_device_train_batch_size", "2")
    assert result.code == 0, result.err
    for line in ("weights", "LoRA weights", "gradients", "optimizer states", "activations", "loss / logits",
                 "runtime baseline", "total (peak)", "device memory"):
        assert line in result.out
    assert "\nfits: " in result.out and "to fit" not in result.out


def test_cli_says_what_to_change_when_it_does_not_fit(cli, tmp_path):
    big = {"model_type": "glm", "hidden_size": 4096, "intermediate_size": 13696, "num_hidden_layers": 40,
           "num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": 128, "vocab_size": 151552}
    model = write_config(tmp_path / "glm-4-9b", big)
    result = cli("plan", "--model", model, "--device", "cuda", "--device_memory_gib", "1",
                 "--max_seq_length", "2048", "--per_device_train_batch_size", "4")
    assert result.code == 0, result.err
    assert "does not fit" in result.out
    assert "--gradient_checkpointing true" in result.out
    assert "--per_device_train_batch_size 1 --gradient_accumulation_steps 4" in result.out
    # The changes are given as glmtune train's flags, to paste into the training command.
    assert "(--precision bf16)" in result.out and "(--quantization_bit 8)" in result.out
    assert "4-bit quantized weights (--quantization_bit 4)" in result.out and "still too big" in result.out


def test_cli_never_suggests_a_quantization_that_raises_a_moes_peak(cli):
    """GLM-4.5-Air: bitsandbytes can't quantize its fused experts (most of its weights), which k-bit preparation
    then keeps in fp32, so 4 or 8 bits would raise the peak; plan says so rather than suggest them."""
    from conftest import ROOT

    model = ROOT / "tests" / "data" / "configs" / "glm-4.5-air"
    args = ["--model", model, "--device", "cuda", "--precision", "bf16", "--max_seq_length", "1024",
            "--per_device_train_batch_size", "1", "--gradient_checkpointing", "true", "--device_memory_gib", "80"]
    result = cli("plan", *args)
    assert result.code == 0, result.err
    assert "quantized weights" not in result.out and "still too big" in result.out
    bf16 = float(result.out.split("total (peak)")[1].split("GiB")[0])
    quantized = cli("plan", *args, "--quantization_bit", "4")
    assert float(quantized.out.split("total (peak)")[1].split("GiB")[0]) > bf16  # what a suggestion would have done


def test_quantized_weights_are_the_decoder_linears_in_4_bits_and_the_rest_in_fp32(cli, tmp_path):
    """train's k-bit preparation casts the embeddings, norms and output layer to fp32: 4-bit linear weights cost
    0.5 + 4/64 bytes a parameter (NF4 plus a scale per block of 64), the rest 4 bytes. Reference: the parameters of
    the real transformers model, split by module type."""
    from transformers import GlmConfig, GlmForCausalLM

    config = native("glm", tie_word_embeddings=False)
    with torch.device("meta"):
        model = GlmForCausalLM(GlmConfig(**{k: v for k, v in config.items() if k != "model_type"}))
    linear = sum(p.numel() for name, m in model.model.layers.named_modules() if isinstance(m, torch.nn.Linear)
                 for p in m.parameters())
    rest = sum(p.numel() for p in model.parameters()) - linear
    shape = shape_from_config(config, "config.json")
    setup = Setup(seq_len=128, batch_size=2, lora_rank=8, targets=tuple(resolve_targets(shape, None)), dtype="bf16",
                  quantization="4bit")
    assert weight_bytes(shape, setup, linear + rest) == pytest.approx(linear * (0.5 + 4 / 64) + rest * 4)

    directory = write_config(tmp_path / "glm", config)
    result = cli("plan", "--model", directory, "--device", "cpu", "--quantization_bit", "4", "--precision", "bf16")
    assert result.code == 0, result.err
    assert "bf16, 4bit weights" in result.out
    refused = cli("plan", "--model", directory, "--quantization_bit", "3")
    assert refused.code == 2 and "--quantization_bit must be 4 or 8, got 3" in refused.err


def test_cli_errors_on_missing_or_unsupported_configs(cli, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = cli("plan", "--model", empty)
    assert result.code == 2 and "has no config.json" in result.err
    result = cli("plan", "--model", write_config(tmp_path / "t5", {"model_type": "t5", "d_model": 512}))
    assert result.code == 2 and "model_type 't5' is not one `glmtune plan` can estimate" in result.err
    result = cli("plan", "--model", write_config(tmp_path / "bad", {"model_type": "glm", "hidden_size": 64}))
    assert result.code == 2 and "expected positive integers for num_hidden_layers" in result.err
    result = cli("plan", "--model", write_config(tmp_path / "ok", native("glm")), "--target_modules", "qkv")
    assert result.code == 2 and "--target_modules qkv: no such linear layer" in result.err


def test_plan_estimates_fp32_unless_told_and_refuses_auto_whose_choice_it_cannot_see(cli, tmp_path):
    model = write_config(tmp_path / "m", native("glm"))
    result = cli("plan", "--model", model, "--device", "cpu", "--device_memory_gib", "8")
    assert result.code == 0, result.err
    assert "tokens, fp32, gradient checkpointing off" in result.out
    refused = cli("plan", "--model", model, "--device", "cpu", "--precision", "auto")
    assert refused.code == 2 and "auto's depends on the hardware the run finds" in refused.err
    assert "fp32, bf16, fp16" in refused.err
    negative = cli("plan", "--model", model, "--device_memory_gib", "-1")
    assert negative.code == 2 and "--device_memory_gib must be positive, got -1.0" in negative.err
