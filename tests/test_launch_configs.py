"""The ready launch configs in examples/: each accelerate YAML reads through accelerate's own loader into the
processes' environment `accelerate launch --config_file` gives them, and that environment builds the FSDP or
DeepSpeed plugin intended; each DeepSpeed JSON reads as accelerate and transformers read it. (FSDP needs GPUs to run:
accelerate 1.15 enables it only for GPU processes, see test_fsdp_is_refused_on_cpu; DeepSpeed's ZeRO-2/3 training
on CPU is bench/deepspeed_cpu_check.sh, deepspeed not being a requirement.)
"""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
import torch
from conftest import ROOT

ACCELERATE = ROOT / "examples" / "accelerate"
DEEPSPEED = ROOT / "examples" / "deepspeed"

# file -> (distributed_type, num_machines, num_processes, DeepSpeed JSON file or None)
INTENDED = {
    "ddp.yaml": ("MULTI_GPU", 1, 8, None),
    "ddp_multinode.yaml": ("MULTI_GPU", 2, 16, None),
    "fsdp.yaml": ("FSDP", 1, 8, None),
    "deepspeed_zero2.yaml": ("DEEPSPEED", 1, 8, "ds_z2_config.json"),
    "deepspeed_zero2_offload.yaml": ("DEEPSPEED", 1, 8, "ds_z2_offload_config.json"),
    "deepspeed_zero3.yaml": ("DEEPSPEED", 1, 8, "ds_z3_config.json"),
    "deepspeed_zero3_offload.yaml": ("DEEPSPEED", 1, 8, "ds_z3_offload_config.json"),
}
# DeepSpeed JSON -> (ZeRO stage, optimizer offloaded, parameters offloaded)
ZERO = {"ds_z2_config.json": (2, False, False), "ds_z2_offload_config.json": (2, True, False),
        "ds_z3_config.json": (3, False, False), "ds_z3_offload_config.json": (3, True, True)}


def test_every_example_config_is_covered():
    assert sorted(p.name for p in ACCELERATE.glob("*.yaml")) == sorted(INTENDED)
    assert sorted(p.name for p in DEEPSPEED.glob("*.json")) == sorted(ZERO)


@pytest.mark.parametrize("name", list(INTENDED))
def test_accelerate_config_opens_with_the_command_that_runs_it(name):
    text = (ACCELERATE / name).read_text(encoding="utf-8")
    header = text[:text.index("\ncompute_environment")]
    assert all(line.startswith("#") for line in header.splitlines())
    assert f"accelerate launch --config_file examples/accelerate/{name} " in header and "-m glmtune train" in header
    assert "torchrun " in header  # the equivalent without accelerate
    _, _, _, ds_file = INTENDED[name]
    if ds_file:
        assert f"--deepspeed examples/deepspeed/{ds_file}" in header


def _launch_environment(name: str, monkeypatch) -> tuple[object, dict[str, str]]:
    """The arguments and the environment variables `accelerate launch --config_file NAME -m glmtune train` would
    start its processes with (what launch_command does before it spawns them, without spawning)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    monkeypatch.chdir(ROOT)  # the YAMLs name the DeepSpeed files relative to the repository root
    args = launch_command_parser().parse_args(["--config_file", str(ACCELERATE / name), "-m", "glmtune", "train"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch_command
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    return args, {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}


@pytest.mark.parametrize("name", list(INTENDED))
def test_accelerate_config_loads_as_accelerate_launch_reads_it(name, monkeypatch):
    from accelerate.commands.config.config_args import load_config_from_file

    distributed_type, machines, processes, ds_file = INTENDED[name]
    config = load_config_from_file(str(ACCELERATE / name))
    assert (str(config.distributed_type.value), config.num_machines, config.num_processes) == (
        distributed_type, machines, processes)
    assert not config.use_cpu and config.mixed_precision in ("no", None)  # glmtune's --precision decides

    args, env = _launch_environment(name, monkeypatch)
    assert (args.multi_gpu, args.use_fsdp, args.use_deepspeed) == (
        distributed_type == "MULTI_GPU", distributed_type == "FSDP", distributed_type == "DEEPSPEED")
    assert args.num_processes == processes and args.num_machines == machines
    if machines > 1:
        assert args.machine_rank == 0 and re.fullmatch(r"[\d.]+", args.main_process_ip) and args.main_process_port
    if ds_file:
        assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
        assert env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == f"examples/deepspeed/{ds_file}"
        assert (DEEPSPEED / ds_file).is_file()
        # ZeRO-3 shards the weights while they load (deepspeed.zero.Init), else each process holds them all.
        assert env["ACCELERATE_DEEPSPEED_ZERO3_INIT"] == str(ZERO[ds_file][0] == 3).lower()
    else:
        assert "ACCELERATE_USE_DEEPSPEED" not in env
        assert ("ACCELERATE_USE_FSDP" in env) == (distributed_type == "FSDP")


def test_fsdp_config_builds_an_fsdp2_plugin_for_any_lora_model(monkeypatch):
    """The plugin the Trainer's Accelerator builds from the launched processes' environment."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import StateDictType
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    _, env = _launch_environment("fsdp.yaml", monkeypatch)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.auto_wrap_policy is transformer_auto_wrap_policy
    # No class named: accelerate wraps the model's _no_split_modules (GlmDecoderLayer, LlamaDecoderLayer...).
    assert plugin.transformer_cls_names_to_wrap is None
    # Full state dict: Trainer.save_model writes the final adapter only with it.
    assert plugin.state_dict_type == StateDictType.FULL_STATE_DICT
    assert plugin.cpu_ram_efficient_loading is True
    assert not plugin.activation_checkpointing
    # The torchrun form in fsdp.yaml's header: TrainingArguments' own FSDP options, the same plugin settings.
    from transformers import TrainingArguments

    args = TrainingArguments("out", fsdp="full_shard", use_cpu=True).fsdp_plugin_args
    assert args == {"fsdp_version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "reshard_after_forward": True,
                    "state_dict_type": "FULL_STATE_DICT", "cpu_ram_efficient_loading": False}


def test_fsdp_wraps_each_decoder_layer_of_a_lora_model(tiny_model):
    """accelerate's FSDP2 wrap policy, given the plugin above, picks the decoder layers of a PEFT LoRA model."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=4, target_modules="all-linear"))
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    wrapped = [type(m).__name__ for m in model.modules() if policy(m)]
    assert wrapped == ["GlmDecoderLayer"] * model.config.num_hidden_layers


@pytest.mark.parametrize("name", list(ZERO))
def test_deepspeed_config_loads_as_accelerate_reads_it(name):
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.deepspeed import HfDeepSpeedConfig

    stage, offload_optimizer, offload_params = ZERO[name]
    raw = json.loads((DEEPSPEED / name).read_text(encoding="utf-8"))
    config = HfDeepSpeedConfig(str(DEEPSPEED / name))
    assert config.get_value("zero_optimization.stage") == stage and config.is_zero3() == (stage == 3)
    assert config.is_offload() == (offload_optimizer or offload_params)
    assert (config.get_value("zero_optimization.offload_optimizer.device") == "cpu") == offload_optimizer
    assert (config.get_value("zero_optimization.offload_param.device") == "cpu") == offload_params
    # The Trainer fills these from glmtune's flags: the file never disagrees with them.
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping", "bf16.enabled", "fp16.enabled"):
        assert config.get_value(key) == "auto", key
    assert "optimizer" not in raw and "scheduler" not in raw  # the Trainer's AdamW and schedule (--learning_rate...)
    if stage == 3:  # else the final adapter is not gathered for saving
        assert config.get_value("zero_optimization.stage3_gather_16bit_weights_on_model_save") is True
    plugin = DeepSpeedPlugin(hf_ds_config=str(DEEPSPEED / name))
    assert plugin.zero_stage == stage


@pytest.mark.parametrize("name", list(ZERO))
def test_deepspeed_config_autos_are_filled_by_the_trainer(name):
    """Needs the deepspeed package (not a glmtune requirement): transformers reads --deepspeed files only with it."""
    pytest.importorskip("deepspeed")
    from transformers import TrainingArguments

    args = TrainingArguments("out", deepspeed=str(DEEPSPEED / name), use_cpu=True, per_device_train_batch_size=3,
                             gradient_accumulation_steps=2, max_grad_norm=0.5)
    config = args.hf_deepspeed_config.config
    assert config["train_micro_batch_size_per_gpu"] == 3 and config["gradient_accumulation_steps"] == 2
    assert config["train_batch_size"] == 6 and config["gradient_clipping"] == 0.5
    assert config["bf16"]["enabled"] is False and config["fp16"]["enabled"] is False
    # What is still "auto" depends on the model (hidden size), filled when the Trainer has it.
    left = {k for k, v in config["zero_optimization"].items() if v == "auto"}
    assert left <= {"reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for CPU-only machines")
@pytest.mark.parametrize("command", ["train", "dpo"])
def test_fsdp_is_refused_on_cpu(command, cli, tiny_model, tmp_path, monkeypatch):
    """accelerate would drop it without a word and train plain DDP (seen with fsdp.yaml on 2 CPU processes)."""
    error = _train_launched_with("FSDP", cli, tiny_model, tmp_path, monkeypatch, command)
    assert "FSDP needs CUDA GPUs" in error and "--multi_gpu" in error


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="deepspeed is installed")
@pytest.mark.parametrize("command", ["train", "dpo"])
def test_deepspeed_without_its_package_is_one_error(command, cli, tiny_model, tmp_path, monkeypatch):
    """DeepSpeed itself runs on CPU too (bench/deepspeed_cpu_check.sh); without the package, glmtune says so."""
    error = _train_launched_with("DEEPSPEED", cli, tiny_model, tmp_path, monkeypatch, command)
    assert "needs the deepspeed package" in error and "pip install deepspeed" in error


def _train_launched_with(plugin: str, cli, tiny_model, tmp_path, monkeypatch, command: str = "train") -> str:
    """glmtune train (or dpo) as `accelerate launch` with that plugin's config starts it; it must fail before any
    output."""
    monkeypatch.setenv(f"ACCELERATE_USE_{plugin}", "true")
    data = tmp_path / "rows.json"
    data.write_text(json.dumps([{"prompt": "q", "completion": "a"}]), encoding="utf-8")
    result = cli(command, "--dataset_path", data, "--model", tiny_model, "--output_dir", tmp_path / "run")
    assert result.code == 2
    assert not (tmp_path / "run").exists()
    return result.err
