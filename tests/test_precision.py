"""The training precision: chosen from the hardware (simulated here), overridable, recorded; LoRA stays fp32."""

from __future__ import annotations

import json

import pytest

from glmtune.errors import UserError
from glmtune.train.precision import CPU_BF16_OVERRIDE, Hardware, choose_precision

CPU_WITHOUT_BF16 = Hardware(cuda=False, bf16_units=None)
CPU_WITH_AMX = Hardware(cuda=False, bf16_units="the CPU (AMX)")
OLD_GPU = Hardware(cuda=True, bf16_units=None)
NEW_GPU = Hardware(cuda=True, bf16_units="the GPU")


@pytest.mark.parametrize("hardware, expected", [
    (CPU_WITHOUT_BF16, "fp32"), (CPU_WITH_AMX, "bf16"), (OLD_GPU, "fp16"), (NEW_GPU, "bf16")])
def test_auto_precision_follows_the_hardware(hardware, expected):
    assert choose_precision("auto", False, False, hardware).name == expected


def test_auto_on_a_cpu_without_bf16_units_is_fp32_on_the_real_detection_path(monkeypatch):
    import torch

    from glmtune.train.precision import detect_hardware

    monkeypatch.delenv(CPU_BF16_OVERRIDE, raising=False)  # CI sets it to run the numeric tests both ways
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert choose_precision("auto", False, False, detect_hardware()).name == "fp32"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert choose_precision("auto", False, False, detect_hardware()).name == "bf16"


@pytest.mark.parametrize("has_bf16", [False, True])
def test_glmtune_cpu_bf16_decides_autos_cpu_choice_whatever_the_cpu_has(monkeypatch, has_bf16):
    import torch

    from glmtune.train.precision import detect_hardware

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: has_bf16)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: has_bf16)
    monkeypatch.setenv(CPU_BF16_OVERRIDE, "1")
    chosen = choose_precision("auto", False, False, detect_hardware())
    assert chosen.name == "bf16" and CPU_BF16_OVERRIDE in chosen.reason  # the log says why
    monkeypatch.setenv(CPU_BF16_OVERRIDE, "0")
    assert choose_precision("auto", False, False, detect_hardware()).name == "fp32"
    monkeypatch.setenv(CPU_BF16_OVERRIDE, "")  # empty: as if unset, the CPU decides
    assert choose_precision("auto", False, False, detect_hardware()).name == ("bf16" if has_bf16 else "fp32")
    monkeypatch.setenv(CPU_BF16_OVERRIDE, "yes")
    with pytest.raises(UserError, match=f"{CPU_BF16_OVERRIDE}='yes': expected 0 or 1"):
        detect_hardware()


def test_glmtune_cpu_bf16_leaves_a_gpus_choice_alone(monkeypatch):
    import torch

    from glmtune.train.precision import detect_hardware

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setenv(CPU_BF16_OVERRIDE, "1")
    assert choose_precision("auto", False, False, detect_hardware()).name == "fp16"


def test_explicit_choices_and_the_seed_flags_win_over_auto():
    assert choose_precision("fp32", False, False, CPU_WITH_AMX).name == "fp32"
    assert choose_precision("auto", True, False, CPU_WITHOUT_BF16).name == "bf16"  # --bf16, even if emulated
    assert choose_precision("auto", False, True, NEW_GPU).name == "fp16"  # the seed's --fp16
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        choose_precision("auto", False, True, CPU_WITH_AMX)
    with pytest.raises(UserError, match="conflicting"):
        choose_precision("fp32", True, False, NEW_GPU)


def test_bf16_run_keeps_lora_weights_in_fp32_and_records_its_precision(cli, tmp_path, tiny_model, demo_rows):
    from conftest import write_json
    from safetensors import safe_open

    data = write_json(tmp_path / "rows.json", demo_rows[:4])
    assert cli("prepare", "--jsonl_path", data, "--save_path", tmp_path / "data", "--model", tiny_model).code == 0
    result = cli("train", "--dataset_path", tmp_path / "data", "--output_dir", tmp_path / "run", "--max_steps", "2",
                 "--per_device_train_batch_size", "4", "--precision", "bf16")
    assert result.code == 0, result.err
    assert "precision: bf16" in result.err
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["config"]["precision"] == "bf16" and manifest["config"]["bf16"] is True
    with safe_open(str(tmp_path / "run" / "adapter_model.safetensors"), "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.float32"}


def test_fp16_is_warned_of_for_the_glm4_line_and_not_for_chatglm3(tiny_model, shared_dir, capsys):
    """fp16 needs a CUDA GPU, so the warning is checked on the step that gives it, before any weight is loaded."""
    from glmtune.logs import configure_logging
    from glmtune.train.precision import Precision
    from glmtune.train.skeleton import warn_if_fp16_overflows

    configure_logging()  # as every command does: glmtune's messages on stderr
    fp16, bf16 = Precision("fp16", "asked for"), Precision("bf16", "asked for")
    warn_if_fp16_overflows(str(tiny_model), bf16)
    assert capsys.readouterr().err == ""
    warn_if_fp16_overflows(str(tiny_model), fp16)  # a native glm: GLM-4's architecture
    warned = capsys.readouterr().err
    assert warned.startswith("warning: fp16 with GLM-4") and "--precision bf16" in warned
    warn_if_fp16_overflows(str(shared_dir / "fixtures" / "chatglm" / "v3"), fp16)  # ChatGLM3 ran in fp16
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_a_bf16_cpu_run_bounds_onednns_primitive_caches_and_keeps_a_users_size(monkeypatch, tmp_path, precision):
    """bf16 matmuls on CPU go through oneDNN, whose caches keep a primitive per shape (1,024 of them by default):
    a bf16 CPU run bounds them before its first matmul, unless the user sized them; an fp32 run leaves them alone."""
    import os

    import torch
    from transformers import TrainingArguments

    from glmtune.arguments import ModelArguments, PrecisionArguments
    from glmtune.train.precision import ONEDNN_CACHE_ENTRIES
    from glmtune.train.skeleton import choose_run_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv(CPU_BF16_OVERRIDE, "1")
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "")  # recorded, so the run's value is undone after the test
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY")
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "7")  # the user's
    chosen, _ = choose_run_precision(ModelArguments(model="unused"), PrecisionArguments(precision=precision),
                                     TrainingArguments(output_dir=str(tmp_path)))
    assert chosen.name == precision
    assert os.environ["LRU_CACHE_CAPACITY"] == "7"
    expected = ONEDNN_CACHE_ENTRIES["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] if precision == "bf16" else None
    assert os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY") == expected
