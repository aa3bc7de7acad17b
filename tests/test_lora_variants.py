"""LoRA variants (DoRA, rsLoRA, PiSSA, LoRA+) and full / freeze tuning: each trains what it says, records what it
is, and its output loads (and merges) where it should; bad combinations are refused before anything is written."""

from __future__ import annotations

import json
import re

import pytest
from test_ptuning_runs import prepared  # noqa: F401  (the fixture: a one-block model)

from glmtune.demo import demo_data_path
from glmtune.errors import UserError

TRAIN = ["--max_steps", "8", "--per_device_train_batch_size", "8", "--learning_rate", "3e-3", "--lora_dropout", "0",
         "--save_strategy", "no", "--logging_steps", "1", "--precision", "fp32"]
PROOF = re.compile(r"merged vs base \+ adapter = (\S+) over (\d+) probes \(tolerance (\S+) in torch\.(\w+)")


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_model):
    from glmtune.cli import main

    path = tmp_path_factory.mktemp("variants") / "data"
    assert main(["prepare", "--jsonl_path", str(demo_data_path()), "--save_path", str(path),
                 "--model", str(tiny_model)]) == 0
    return path


def train(cli, data, output, *flags: str):
    result = cli("train", "--dataset_path", data, "--output_dir", output, *TRAIN, *flags)
    assert result.code == 0, result.err
    return json.loads((output / "manifest.json").read_text())


def logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


@pytest.mark.parametrize(("flags", "recorded"), [
    (["--use_dora"], {"use_dora": True, "r": 8}),
    (["--use_rslora"], {"use_rslora": True, "r": 8}),
    # PiSSA's adapter is saved converted to a plain LoRA on the original base: twice the rank, plain init
    (["--init_lora_weights", "pissa"], {"init_lora_weights": True, "r": 16}),
])
def test_variant_trains_records_itself_and_merges_with_its_proof(cli, data, tiny_model, tmp_path, flags, recorded):
    run = tmp_path / "run"
    manifest = train(cli, data, run, *flags, "--save_strategy", "steps", "--save_steps", "8")
    losses = [e["loss"] for e in json.loads((run / "checkpoint-8" / "trainer_state.json").read_text())["log_history"]
              if "loss" in e]
    assert losses[-1] < losses[0] * 0.8
    adapter = json.loads((run / "adapter_config.json").read_text())
    assert {key: adapter[key] for key in recorded} == recorded
    assert manifest["finetuning_type"] == "lora" and manifest["config"]["init_lora_weights"] == (
        "pissa" if "pissa" in flags else "true")
    merged = cli("merge", "--peft_path", run, "--output_dir", tmp_path / "merged", "--dtype", "fp32")
    assert merged.code == 0, merged.err
    diff, _, tolerance, dtype = PROOF.search(merged.out).groups()
    assert dtype == "float32" and float(diff) <= float(tolerance) < 1e-2


def test_pissa_adapter_on_the_original_base_is_the_trained_model(cli, data, tiny_model, tmp_path, tokenizer):
    """The checkpoint holds PiSSA's own adapter (on the residual base peft rebuilds when loading it): the trained
    model. The final adapter, converted, must compute the same on the untouched base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    train(cli, data, run, "--init_lora_weights", "pissa", "--save_strategy", "steps", "--save_steps", "8")
    trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), run / "checkpoint-8").eval()
    converted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), run).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    ids = tokenizer("What is a bond? It is a loan.")["input_ids"]
    expected = logits(trained, ids)
    assert (logits(converted, ids) - expected).abs().max() < 1e-3
    assert (logits(base, ids) - expected).abs().max() > 1e-1  # the adapter changes something the check can see


def test_loraplus_gives_the_b_matrices_ratio_times_the_learning_rate(tiny_model, tokenizer, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from glmtune.arguments import LoraArguments
    from glmtune.train.skeleton import Splits, add_lora, build_trainer

    model = add_lora(AutoModelForCausalLM.from_pretrained(tiny_model), str(tiny_model), LoraArguments(), None)
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3, use_cpu=True, report_to=[])
    trainer = build_trainer(Trainer, model, args, Splits(Dataset.from_dict({"input_ids": [[1, 2]]}), None), tokenizer,
                            loraplus_lr_ratio=16)
    names = {id(p): n for n, p in model.named_parameters()}
    rates = {names[id(p)]: group["lr"] for group in trainer.optimizer.param_groups for p in group["params"]}
    b = {n: lr for n, lr in rates.items() if "lora_B" in n}
    a = {n: lr for n, lr in rates.items() if "lora_A" in n}
    assert b and a and len(rates) == sum(p.requires_grad for p in model.parameters())
    assert all(lr == pytest.approx(16e-3) for lr in b.values()) and all(lr == pytest.approx(1e-3) for lr in a.values())


def test_loraplus_run_trains(cli, data, tmp_path):
    manifest = train(cli, data, tmp_path / "run", "--loraplus_lr_ratio", "16", "--max_steps", "3")
    assert manifest["global_step"] == 3 and manifest["config"]["loraplus_lr_ratio"] == 16


def base_tensors(tiny_model) -> dict:
    from safetensors.torch import load_file

    return load_file(tiny_model / "model.safetensors")


def changed_tensors(tiny_model, run) -> set[str]:
    from safetensors.torch import load_file

    before, after = base_tensors(tiny_model), load_file(run / "model.safetensors")
    assert set(after) == set(before)
    return {name for name in before if not (after[name] == before[name]).all()}


def test_full_run_trains_every_weight_and_loads_in_infer(cli, data, tiny_model, tmp_path):
    run = tmp_path / "run"
    manifest = train(cli, data, run, "--finetuning_type", "full", "--learning_rate", "1e-4")
    assert manifest["finetuning_type"] == "full" and not (run / "adapter_config.json").exists()
    assert changed_tensors(tiny_model, run) == set(base_tensors(tiny_model))
    result = cli("infer", "--model", run, "--prompt", "What is a bond?", "--max_new_tokens", "4")
    assert result.code == 0, result.err


def test_freeze_run_trains_exactly_the_last_blocks(cli, data, tiny_model, tmp_path):
    run = tmp_path / "run"
    manifest = train(cli, data, run, "--finetuning_type", "freeze", "--freeze_trainable_layers", "1",
                     "--learning_rate", "1e-4")
    assert manifest["finetuning_type"] == "freeze"
    last = {name for name in base_tensors(tiny_model) if name.startswith("model.layers.3.")}
    assert last and changed_tensors(tiny_model, run) == last
    assert cli("infer", "--model", run, "--prompt", "What is a bond?", "--max_new_tokens", "4").code == 0


@pytest.mark.parametrize(("finetuning_type", "layers", "modules"), [
    ("full", 2, "all"), ("freeze", 2, "all"), ("freeze", -1, "all"), ("freeze", 1, "mlp")])
def test_trainable_parameter_counts_are_the_models_own(tiny_model, finetuning_type, layers, modules):
    from transformers import AutoModelForCausalLM

    from glmtune.arguments import LoraArguments
    from glmtune.train.finetuning import make_trainable

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    make_trainable(model, "tiny", LoraArguments(finetuning_type=finetuning_type, freeze_trainable_layers=layers,
                                                freeze_trainable_modules=modules))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    blocks = model.model.layers
    chosen = {2: blocks[2:], -1: blocks[:1], 1: [blocks[3].mlp]}[layers] if finetuning_type == "freeze" else [model]
    assert trainable == sum(p.numel() for module in chosen for p in module.parameters())


def test_freeze_more_layers_than_the_model_has_is_refused(cli, data, tmp_path):
    result = cli("train", "--dataset_path", data, "--output_dir", tmp_path / "run", *TRAIN,
                 "--finetuning_type", "freeze", "--freeze_trainable_layers", "5")
    assert result.code != 0 and "--freeze_trainable_layers 5: the model has 4 decoder blocks" in result.err
    assert not (tmp_path / "run" / "manifest.json").exists()


@pytest.mark.parametrize(("options", "message"), [
    ({"init_lora_weights": "bogus"}, "--init_lora_weights bogus is unknown"),
    ({"init_lora_weights": "eva"}, "--init_lora_weights eva needs calibration data"),
    ({"init_lora_weights": "pissa", "use_dora": True}, "can't carry DoRA's magnitudes"),
    ({"finetuning_type": "full", "use_dora": True}, "--use_dora: LoRA options, and --finetuning_type is full"),
    ({"finetuning_type": "bogus"}, "--finetuning_type bogus is unknown"),
    ({"loraplus_lr_ratio": 0}, "--loraplus_lr_ratio must be positive"),
])
def test_bad_lora_options_are_refused(options, message):
    from glmtune.arguments import LoraArguments

    with pytest.raises(UserError, match=re.escape(message)):
        LoraArguments(**options)


def test_pissa_niter_and_a_yaml_boolean_init_are_accepted():
    from glmtune.arguments import LoraArguments
    from glmtune.arguments.training import peft_lora_init

    assert LoraArguments(init_lora_weights="pissa_niter_4").init_lora_weights == "pissa_niter_4"
    assert peft_lora_init(LoraArguments(init_lora_weights=False).init_lora_weights) is False


def test_full_tuning_refuses_a_quantized_base(tiny_model):
    from transformers import AutoModelForCausalLM

    from glmtune.arguments import LoraArguments
    from glmtune.train.finetuning import make_trainable

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.config.quantization_config = {"load_in_4bit": True}  # as bitsandbytes leaves it
    with pytest.raises(UserError, match="packed 4/8-bit weights can't be trained"):
        make_trainable(model, "tiny", LoraArguments(finetuning_type="full"))


def test_merge_of_a_full_run_says_no_merge_is_needed(cli, tmp_path, tiny_model):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_model, run)
    (run / "manifest.json").write_text(json.dumps({"command": "train", "finetuning_type": "full"}))
    result = cli("merge", "--peft_path", run, "--output_dir", tmp_path / "merged")
    assert result.code != 0 and "--finetuning_type full run" in result.err and "no merge is needed" in result.err
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("finetuning_type", ["full", "freeze"])
def test_dpo_trains_the_models_own_weights_against_a_frozen_copy(cli, tmp_path, finetuning_type):
    """DPO without an adapter: TRL's reference is a frozen copy of the starting model, and the margin grows."""
    from conftest import SHARED, write_json
    from safetensors.torch import load_file

    from glmtune.cli import main
    from glmtune.models.tiny import build_tiny_glm

    source = SHARED / "data" / "preference" / "dpo_en_demo.json"
    if not source.is_file():
        pytest.skip(f"the shared data file {source} is absent")
    rows = [r for r in json.loads(source.read_text(encoding="utf-8")) if len(r["conversations"]) == 1][:8]
    texts = [m["value"] for r in rows for m in (*r["conversations"], r["chosen"], r["rejected"])]
    model = build_tiny_glm(tmp_path / "model", texts, hidden_size=64, num_layers=2, vocab_size=600)
    assert main(["prepare", "--jsonl_path", str(write_json(tmp_path / "pairs.json", rows)), "--save_path",
                 str(tmp_path / "data"), "--model", str(model), "--max_seq_length", "96"]) == 0
    run = tmp_path / "run"
    result = cli("dpo", "--dataset_path", tmp_path / "data", "--output_dir", run, "--per_device_train_batch_size", 8,
                 "--logging_steps", "1", "--precision", "fp32", "--save_strategy", "no", "--max_steps", "4",
                 "--learning_rate", "1e-3", "--finetuning_type", finetuning_type, "--freeze_trainable_layers", "1")
    assert result.code == 0, result.err
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["finetuning_type"] == finetuning_type and "frozen copy of the model" in manifest["reference"]
    assert manifest["last_logged_rewards"]["rewards/margins"] > manifest["first_logged_rewards"]["rewards/margins"]
    before, after = load_file(model / "model.safetensors"), load_file(run / "model.safetensors")
    changed = {name for name in before if not (after[name] == before[name]).all()}
    assert changed == (set(before) if finetuning_type == "full" else
                       {name for name in before if name.startswith("model.layers.1.")})


@pytest.mark.parametrize(("model_type", "finetuning_type", "layers"), [
    ("glm", "full", 2), ("glm", "freeze", 1), ("glm", "freeze", -1), ("glm4_moe", "freeze", 1)])
def test_plan_counts_what_full_and_freeze_train_as_the_model_does(model_type, finetuning_type, layers):
    """plan's trainable count is what make_trainable leaves trainable on the built model; each trained weight costs
    fp32 master weights, gradients and AdamW's two states."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from glmtune.arguments import LoraArguments
    from glmtune.plan.memory import Setup, estimate
    from glmtune.plan.shape import shape_from_config
    from glmtune.train.finetuning import make_trainable

    config = {"model_type": model_type, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512,
              "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 1}
    if model_type == "glm4_moe":
        config.update(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                      first_k_dense_replace=1)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    make_trainable(model, "tiny", LoraArguments(finetuning_type=finetuning_type, freeze_trainable_layers=layers))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    shape = shape_from_config(config)
    result = estimate(shape, Setup(128, 1, 8, (), dtype="bf16", finetuning_type=finetuning_type,
                                   trainable_layers=layers))
    assert result.trainable_parameters == trainable
    assert result.lines["gradients"] == 4 * trainable and result.lines["optimizer states"] == 8 * trainable
    assert "LoRA weights" not in result.lines


def test_plan_prints_full_tuning_and_refuses_it_quantized(cli, tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "model_type": "glm", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512}))
    result = cli("plan", "--model", model, "--device", "cpu", "--device_memory_gib", "8", "--finetuning_type", "full")
    assert result.code == 0 and "full tuning:" in result.out and "LoRA weights" not in result.out
    refused = cli("plan", "--model", model, "--finetuning_type", "full", "--quantization_bit", "4")
    assert refused.code != 0 and "can't be quantized" in refused.err


def test_on_a_4bit_base_dora_trains_and_pissa_and_full_tuning_are_refused(cli, tmp_path):
    pytest.importorskip("bitsandbytes")
    from glmtune.cli import main
    from glmtune.models.tiny import build_tiny_glm

    rows = json.loads(demo_data_path().read_text(encoding="utf-8"))
    model = build_tiny_glm(tmp_path / "m", [r["output"] for r in rows], hidden_size=64, num_layers=2)
    assert main(["prepare", "--jsonl_path", str(demo_data_path()), "--save_path", str(tmp_path / "d"),
                 "--model", str(model)]) == 0

    def run(name, *flags):
        return cli("train", "--dataset_path", tmp_path / "d", "--output_dir", tmp_path / name, "--max_steps", "2",
                   "--per_device_train_batch_size", "4", "--quantization_bit", "4", "--save_strategy", "no", *flags)

    assert run("dora", "--use_dora", "true").code == 0
    assert json.loads((tmp_path / "dora" / "adapter_config.json").read_text())["use_dora"] is True
    pissa = run("pissa", "--init_lora_weights", "pissa")
    assert pissa.code == 2 and "PiSSA and OLoRA move part of each base weight" in pissa.err
    assert "--init_lora_weights true or gaussian" in pissa.err and not (tmp_path / "pissa").exists()
    full = run("full", "--finetuning_type", "full")
    assert full.code != 0 and "packed 4/8-bit weights can't be trained" in full.err


def quantized_run(cli, prepared, output, bits, *flags):  # noqa: F811
    return cli("train", "--dataset_path", prepared, "--output_dir", output, "--quantization_bit", str(bits),
               "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1", "--per_device_train_batch_size",
               "4", "--learning_rate", "1e-2", "--logging_steps", "1", "--disable_tqdm", "true", *flags)


@pytest.mark.parametrize("bits", [4, 8])
def test_rslora_with_loraplus_trains_on_a_quantized_base(cli, prepared, tmp_path, bits):  # noqa: F811
    """One run holds both (rsLoRA's scale and LoRA+'s optimizer groups are independent): its saved adapter says
    rsLoRA, its config LoRA+, and step 2 moves the adapter step 1 saved."""
    from conftest import adapter_difference

    pytest.importorskip("bitsandbytes")
    run = tmp_path / "run"
    result = quantized_run(cli, prepared, run, bits, "--use_rslora", "--loraplus_lr_ratio", "16")
    assert result.code == 0, result.err
    assert json.loads((run / "adapter_config.json").read_text())["use_rslora"] is True
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["config"]["loraplus_lr_ratio"] == 16 and manifest["config"]["quantization"]["bits"] == bits
    assert adapter_difference(run / "checkpoint-1", run) > 0


@pytest.mark.parametrize(("bits", "flags", "message"), [
    (8, ["--init_lora_weights", "pissa"], "--init_lora_weights pissa on '{model}' loaded in 8-bit: PiSSA and OLoRA"),
    (4, ["--init_lora_weights", "olora"], "--init_lora_weights olora on '{model}' loaded in 4-bit: PiSSA and OLoRA"),
    (8, ["--init_lora_weights", "olora"], "--init_lora_weights olora on '{model}' loaded in 8-bit: PiSSA and OLoRA"),
    (8, ["--use_dora"], "--use_dora on '{model}' loaded in 8-bit on the CPU: peft's DoRA dequantizes each weight"),
], ids=["pissa-8bit", "olora-4bit", "olora-8bit", "dora-8bit"])
def test_variants_a_quantized_base_cannot_take_are_refused_before_anything_is_written(
        cli, prepared, tmp_path, bits, flags, message):  # noqa: F811
    """PiSSA (4-bit: test_on_a_4bit_base_dora_trains_and_pissa_and_full_tuning_are_refused) and OLoRA need the
    unquantized weights on either base; DoRA on an 8-bit base fails inside bitsandbytes on the CPU's path."""
    pytest.importorskip("bitsandbytes")
    result = quantized_run(cli, prepared, tmp_path / "run", bits, *flags)
    assert result.code == 2 and message.format(model=prepared.parent / "model") in result.err
    assert "Traceback" not in result.err and not (tmp_path / "run").exists()
