"""glmtune merge: the merged directory loads with plain transformers and computes what base + adapter computes;
a merge that does not (a module left unmerged) fails its proof and writes nothing."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from glmtune.demo import demo_data_path

TRAIN = ["--max_steps", "10", "--per_device_train_batch_size", "8", "--learning_rate", "3e-3", "--lora_dropout", "0",
         "--save_strategy", "no", "--logging_steps", "5"]
PROOF = re.compile(r"merged vs base \+ adapter = (\S+) over (\d+) probes \(tolerance (\S+) in torch\.(\w+)")


@pytest.fixture(scope="module")
def merged(tmp_path_factory, tiny_model):
    """A tiny adapter trained with a high learning rate (it moves the logits a lot), merged in fp32:
    (adapter dir, merged dir, merge's stdout)."""
    import contextlib
    import io

    from glmtune.cli import main

    tmp = tmp_path_factory.mktemp("merge")
    assert main(["prepare", "--jsonl_path", str(demo_data_path()), "--save_path", str(tmp / "data"),
                 "--model", str(tiny_model)]) == 0
    assert main(["train", "--dataset_path", str(tmp / "data"), "--output_dir", str(tmp / "run"), *TRAIN]) == 0
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["merge", "--peft_path", str(tmp / "run"), "--output_dir", str(tmp / "merged"),
                     "--dtype", "fp32"]) == 0
    return tmp / "run", tmp / "merged", out.getvalue()


def chat_prompt(model_dir, text: str) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         return_dict=True)["input_ids"]


def test_merge_prints_its_proof_within_the_fp32_tolerance(merged, tiny_model):
    adapter, merged_dir, out = merged
    diff, probes, tolerance, dtype = PROOF.search(out).groups()
    assert dtype == "float32" and int(probes) == 3 + 4  # fixed probes + the adapter's first training rows
    assert float(diff) <= float(tolerance) < 1e-2
    assert sorted(p.name for p in merged_dir.iterdir()) == [
        "chat_template.jinja", "config.json", "generation_config.json", "manifest.json", "model.safetensors",
        "tokenizer.json", "tokenizer_config.json"]
    manifest = json.loads((merged_dir / "manifest.json").read_text())
    assert manifest["command"] == "merge" and manifest["base_model"] == str(tiny_model)
    assert manifest["peft_path"] == str(adapter) and manifest["dtype"] == "float32"
    assert manifest["proof"]["max_abs_diff"] == pytest.approx(float(diff), rel=1e-2)
    assert "loads with plain AutoModelForCausalLM" in out


def test_merged_directory_loads_without_glmtune_and_equals_base_plus_adapter(merged, tiny_model, demo_rows):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter, merged_dir, out = merged
    tolerance = float(PROOF.search(out).group(3))
    ids = chat_prompt(tiny_model, demo_rows[5]["instruction"])
    check = f"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({str(merged_dir)!r}).eval()
tokenizer = AutoTokenizer.from_pretrained({str(merged_dir)!r})
with torch.no_grad():
    logits = model(input_ids=torch.tensor([{ids!r}])).logits[0]
print(json.dumps({{"glmtune": "glmtune" in sys.modules, "class": type(model).__name__, "logits": logits.tolist(),
                  "template": bool(tokenizer.chat_template), "eos": model.generation_config.eos_token_id}}))
"""
    report = json.loads(subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                                       check=True).stdout.strip().splitlines()[-1])
    assert report["glmtune"] is False and report["class"] == "GlmForCausalLM" and report["template"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    assert report["eos"] == base.generation_config.eos_token_id  # <|endoftext|>, <|user|>, <|observation|>
    with torch.no_grad():
        base_logits = base(input_ids=torch.tensor([ids])).logits[0]
        reference = PeftModel.from_pretrained(base, adapter)(input_ids=torch.tensor([ids])).logits[0]
    merged_logits = torch.tensor(report["logits"])
    assert (merged_logits - reference).abs().max().item() <= tolerance
    assert (merged_logits - base_logits).abs().max().item() > 1.0  # the adapter really changed the model


def test_infer_with_the_merged_model_answers_like_base_plus_adapter(cli, merged, tmp_path):
    adapter, merged_dir, _ = merged
    common = ["--input", demo_data_path(), "--max_new_tokens", "32", "--temperature", "0", "--batch_size", "16"]
    with_adapter = cli("infer", "--peft_path", adapter, *common)
    with_merged = cli("infer", "--model", merged_dir, *common)
    assert with_adapter.code == with_merged.code == 0, with_merged.err
    assert with_merged.out == with_adapter.out


def test_a_merge_that_leaves_a_module_out_fails_its_proof_and_writes_nothing(cli, merged, tmp_path, monkeypatch):
    from peft.tuners.lora import layer

    adapter, _, _ = merged
    merge = layer.Linear.merge
    calls = []

    def merge_all_but_the_first(self, *args, **kwargs):
        calls.append(self)
        if len(calls) > 1:
            merge(self, *args, **kwargs)

    monkeypatch.setattr(layer.Linear, "merge", merge_all_but_the_first)
    result = cli("merge", "--peft_path", adapter, "--output_dir", tmp_path / "out", "--dtype", "fp32")
    assert result.code == 2
    assert "differ from base + adapter by" in result.err and "nothing was written" in result.err
    assert list(tmp_path.iterdir()) == []  # neither the output nor its temporary directory


def test_bf16_merge_saves_bf16_weights_and_passes_its_proof(cli, merged, tiny_model, tmp_path):
    adapter, _, _ = merged
    result = cli("merge", "--peft_path", adapter, "--output_dir", tmp_path / "out", "--dtype", "bf16")
    assert result.code == 0, result.err
    diff, _, tolerance, dtype = PROOF.search(result.out).groups()
    assert dtype == "bfloat16" and float(diff) <= float(tolerance)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    assert "the proof is coarse" in result.err
    # Independently of merge's own proof: every saved weight is W + (alpha / r) B A, computed here in fp32 from the
    # base checkpoint and the adapter file, up to bf16's rounding of W, of the update and of their sum (each at most
    # half a bf16 step: 2^-8 of the value, 8 significant bits); and the update is far larger than that rounding, so
    # a weight saved without it (or with a wrong scale) fails.
    import torch
    from safetensors.torch import load_file

    base = load_file(str(tiny_model / "model.safetensors"))
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert saved.keys() == base.keys() and {t.dtype for t in saved.values()} == {torch.bfloat16}
    adapted = 0
    for name, weight in base.items():
        prefix = "base_model.model." + name.removesuffix(".weight")
        update = torch.zeros_like(weight.float())
        if f"{prefix}.lora_A.weight" in lora:
            update = scale * lora[f"{prefix}.lora_B.weight"].float() @ lora[f"{prefix}.lora_A.weight"].float()
            adapted += 1
        expected = weight.float() + update
        rounding = (weight.float().abs() + update.abs() + expected.abs()) * 2**-8 + 1e-6
        assert bool(((saved[name].float() - expected).abs() <= rounding).all()), name
        if update.abs().max() > 0:
            assert not bool(((saved[name].float() - weight.float()).abs() <= rounding).all()), name
    assert adapted == len(lora) // 2 > 0


def test_quiet_merge_prints_its_proof_and_leaves_the_note_out(cli, merged, tmp_path):
    adapter, _, _ = merged
    result = cli("merge", "--peft_path", adapter, "--output_dir", tmp_path / "out", "--dtype", "bf16", "--quiet")
    assert result.code == 0, result.err
    assert PROOF.search(result.out) and "Merged" in result.out  # the command's result
    assert result.err == ""  # the bf16 note, the proof's progress bar and the libraries' bars


def test_a_non_empty_output_dir_is_refused(cli, merged, tmp_path):
    adapter, _, _ = merged
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    result = cli("merge", "--peft_path", adapter, "--output_dir", tmp_path / "out")
    assert result.code == 2 and "--overwrite_output_dir" in result.err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_merge_without_an_adapter_or_output_is_a_clear_error(cli, tmp_path):
    result = cli("merge", "--output_dir", tmp_path / "out")
    assert result.code == 2 and "--peft_path and --output_dir are required" in result.err
    result = cli("merge", "--peft_path", tmp_path, "--output_dir", tmp_path / "out")
    assert result.code == 2 and "has no adapter_config.json" in result.err
