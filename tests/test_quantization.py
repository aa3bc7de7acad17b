"""--quantization_bit 8 / 4: LoRA on a bitsandbytes-quantized base (CPU backend here), evaluations before and during
training, layers that can't be 4-bit quantized, the adapter on the unquantized base, and the refusals."""

from __future__ import annotations

import json
import math
import re
import sys

import pytest
from conftest import write_json

pytest.importorskip("bitsandbytes")

ROWS = [{"prompt": f"question {i}", "completion": f"answer {i} is {i * 7}"} for i in range(16)]


@pytest.fixture(scope="module")
def quant_setup(tmp_path_factory):
    """A tiny GLM whose linear layers take 128 inputs (a multiple of 64: quantizable) except down_proj (160: left in
    full precision in 4-bit), and a prepared dataset with a validation split."""
    import torch
    from transformers import GenerationConfig, GlmConfig, GlmForCausalLM

    from glmtune.cli import main
    from glmtune.models.tiny import END_OF_TURN, build_bpe_tokenizer

    tmp = tmp_path_factory.mktemp("quant")
    tokenizer = build_bpe_tokenizer([r["prompt"] + " " + r["completion"] for r in ROWS] * 5, 400)
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    config = GlmConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=160, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=256,
                       initializer_range=1.3 / math.sqrt(128), pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=end, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = GlmForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=end, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(tmp / "model")
    tokenizer.save_pretrained(tmp / "model")
    data = write_json(tmp / "rows.json", ROWS)
    assert main(["prepare", "--jsonl_path", str(data), "--save_path", str(tmp / "data"), "--model",
                 str(tmp / "model"), "--val_size", "4"]) == 0
    return tmp / "model", tmp / "data"


def train(cli, data, out, *extra):
    return cli("train", "--dataset_path", data, "--output_dir", out, "--per_device_train_batch_size", "4",
               "--max_steps", "6", "--learning_rate", "1e-2", "--logging_steps", "1", "--save_strategy", "no",
               "--eval_on_start", "true", "--eval_strategy", "steps", "--eval_steps", "1", *extra)


@pytest.mark.numeric  # --precision auto: fp32 or bf16 by the CPU; holds either way (CI runs both)
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_lora_trains_through_evaluations_and_the_adapter_answers_on_the_plain_base(
        cli, quant_setup, tmp_path, monkeypatch, bits):
    import bitsandbytes.nn.modules as bnb_modules
    import torch
    from safetensors.torch import load_file

    # Simulate a CPU with AVX512-BF16, where an evaluation used to repack the 4-bit weights for inference and break
    # the training steps after it: the repack must never happen (see quantization.keep_training_layout).
    repacks = []
    repack = bnb_modules._convert_weight_packed_for_cpu
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    monkeypatch.setattr(bnb_modules, "_convert_weight_packed_for_cpu",
                        lambda *a, **k: repacks.append(1) or repack(*a, **k))
    model, data = quant_setup
    result = train(cli, data, tmp_path / "run", "--quantization_bit", str(bits))
    assert result.code == 0, result.err
    assert repacks == []
    if bits == 4:
        assert ("2 linear layer(s) left in full precision, their input size is not a multiple of 64 (LoRA still "
                "adapts them): down_proj (160 inputs) in 2 layers") in result.err
    evals = [float(x) for x in re.findall(r"'eval_loss': '?([0-9.]+)", result.out)]
    assert len(evals) >= 7  # on start, after each of the 6 steps (and the final one)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["eval_loss"] < evals[0] - 0.1
    config = manifest["config"]
    assert config["quantization_bit"] == bits and config["quantization"]["bits"] == bits
    assert "lm_head" in config["quantization"]["skipped"]
    if bits == 4:
        assert config["quantization"]["quant_type"] == "nf4" and config["quantization"]["double_quant"] is True
        # The compute dtype is the training precision's (fp32 on a CPU without bf16 units).
        expected = {"fp32": "float32", "bf16": "bfloat16"}[config["precision"]]
        assert expected in config["quantization"]["compute_dtype"]
        assert "model.layers.0.mlp.down_proj" in config["quantization"]["skipped"]

    adapter = load_file(str(tmp_path / "run" / "adapter_model.safetensors"))
    moved = [name for name, tensor in adapter.items() if "lora_B" in name and tensor.abs().max() > 0]
    assert any("down_proj" in name for name in moved) and any("q_proj" in name for name in moved)
    assert all(t.dtype == torch.float32 for t in adapter.values())

    answered = cli("infer", "--peft_path", tmp_path / "run", "--prompt", "question 3", "--max_new_tokens", "4")
    assert answered.code == 0, answered.err
    # The same greedy answer as the plain fp32 base with the adapter, run here through peft by hand ("answer is"
    # after these 6 steps), and not the untuned base's.
    response = json.loads(answered.out.splitlines()[-1])["response"]
    assert response == greedy_answer(model, tmp_path / "run", "question 3", 4)
    assert response != greedy_answer(model, None, "question 3", 4)


def greedy_answer(model, adapter, prompt: str, max_new_tokens: int) -> str:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    tuned = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    if adapter is not None:
        tuned = PeftModel.from_pretrained(tuned, adapter)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = tuned.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_evaluation_on_avx512_bf16_cpus_repacks_4bit_weights_unless_the_training_layout_is_kept(monkeypatch):
    import bitsandbytes.nn.modules as bnb_modules
    import torch

    from glmtune.models.quantization import keep_training_layout

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)  # as Linear4bit sees such a CPU

    def layer_after_an_evaluation(keep: bool) -> tuple[object, torch.Tensor]:
        torch.manual_seed(0)
        layer = bnb_modules.Linear4bit(128, 64, compute_dtype=torch.float32, quant_type="nf4",
                                       compress_statistics=True).to("cpu")  # quantized on the move
        if keep:
            assert keep_training_layout(layer) == 1
        x = torch.randn(4, 128, requires_grad=True)
        layer(x).sum().backward()  # a training step's gradient, before any evaluation
        layer.eval()
        with torch.no_grad():
            layer(torch.randn(4, 128))
        layer.train()
        return layer, x

    exposed, _ = layer_after_an_evaluation(keep=False)
    assert exposed.weight.quant_state.packing_format_for_cpu  # the hazard, reproduced: weights repacked in place

    kept, x = layer_after_an_evaluation(keep=True)
    assert not getattr(kept.weight.quant_state, "packing_format_for_cpu", False)
    before = x.grad.clone()
    x.grad = None
    kept(x).sum().backward()
    assert torch.equal(x.grad, before)  # training after the evaluation: the same gradient as before it


def test_quantization_bit_other_than_4_or_8_is_a_clear_error(cli, quant_setup, tmp_path):
    _, data = quant_setup
    result = cli("train", "--dataset_path", data, "--output_dir", tmp_path / "run", "--quantization_bit", "3")
    assert result.code == 2
    assert "error: --quantization_bit must be 4 or 8, got 3" in result.err and "hint:" in result.err


def test_no_bitsandbytes_backend_stops_before_loading_anything(cli, quant_setup, tmp_path, monkeypatch):
    import bitsandbytes

    def never(*args, **kwargs):
        raise AssertionError("loaded something")

    monkeypatch.setattr("glmtune.train.skeleton.load_tokenizer", never)
    monkeypatch.setattr("glmtune.train.skeleton.load_model", never)
    _, data = quant_setup
    monkeypatch.setattr(bitsandbytes, "supported_torch_devices", {"xpu"})  # a build with neither CPU nor CUDA
    result = cli("train", "--dataset_path", data, "--output_dir", tmp_path / "run", "--quantization_bit", "4")
    assert result.code == 2, result.err
    assert re.search(r"error: --quantization_bit 4: bitsandbytes \S+ has no backend for (this GPU|the CPU)",
                     result.err)
    assert "hint:" in result.err and "Traceback" not in result.err
    assert not (tmp_path / "run").exists()

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed: its import fails
    result = cli("train", "--dataset_path", data, "--output_dir", tmp_path / "run", "--quantization_bit", "8")
    assert result.code == 2, result.err
    assert "error: --quantization_bit 8 needs bitsandbytes, which does not import here" in result.err
    assert "pip install bitsandbytes" in result.err


def test_merge_refuses_a_quantized_base(cli, tmp_path):
    result = cli("merge", "--peft_path", tmp_path / "adapter", "--output_dir", tmp_path / "merged",
                 "--quantization_bit", "4")
    assert result.code == 2
    assert "merging into a quantized base would round the update away" in result.err
    assert not (tmp_path / "merged").exists()


def test_thudm_layout_checkpoints_are_refused_with_the_convert_command(tmp_path):
    from glmtune.errors import UserError
    from glmtune.models.loading import load_model

    (tmp_path / "chatglm3").mkdir()
    (tmp_path / "chatglm3" / "config.json").write_text(json.dumps(
        {"model_type": "chatglm", "multi_query_attention": True}), encoding="utf-8")
    with pytest.raises(UserError) as caught:
        load_model(str(tmp_path / "chatglm3"), quantization_bit=4)
    assert "THUDM's layout" in caught.value.message
    assert f"glmtune convert {tmp_path / 'chatglm3'} CONVERTED_DIR" in caught.value.hint
