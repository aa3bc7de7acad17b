"""glmtune convert: a THUDM-layout checkpoint becomes a directory that plain transformers loads, without glmtune
and without remote code, computing what the official code computed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.parametrize("family, tokenizer_dir, eos, architecture", [
    # the model's own end-of-turn ids (the tokenizer's lie past the tiny model's table)
    ("glm4", "glm-4-9b-chat", [500, 507, 509], "GlmForCausalLM"),
    ("v3", "chatglm3-6b", [2], "GlmForCausalLM"),
    ("v2", "chatglm2-6b", [2], "GlmForCausalLM"),
    ("v1", "chatglm-6b", [505], "ChatGlm6bForCausalLM"),  # glmtune's own class: after `import glmtune.models`
])
def test_converted_checkpoint_loads_with_plain_transformers(cli, tmp_path, shared_dir, family, tokenizer_dir, eos,
                                                            architecture):
    own_class = architecture != "GlmForCausalLM"
    source = shared_dir / "fixtures" / "chatglm" / family
    result = cli("convert", source, tmp_path / "out", "--tokenizer", shared_dir / "tokenizers" / tokenizer_dir)
    assert result.code == 0, result.err
    assert "more than the model's 512 embeddings" in result.err  # real tokenizer, tiny model: a warning only
    # A fresh interpreter that never imports glmtune.
    check = f"""
import json, sys, torch
{"import glmtune.models" if own_class else ""}
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "out")!r}).eval()
tokenizer = AutoTokenizer.from_pretrained({str(tmp_path / "out")!r})
seq = json.load(open({str(source / "golden.json")!r}))["sequences"]["short"]
with torch.no_grad():
    out = model(input_ids=torch.tensor([seq["input_ids"]]), labels=torch.tensor([seq["labels"]]))
strings = json.load(open({str(source / "tokenizer_golden.json")!r}))["strings"]
print(json.dumps({{"glmtune": "glmtune" in sys.modules, "class": type(model).__name__,
                  "logits": (out.logits - torch.tensor(seq["logits"])).abs().max().item(),
                  "loss": abs(out.loss.item() - seq["loss"]),
                  "ids": [tokenizer.encode(c["text"]) == c["ids"] for c in strings[:12]],
                  "template": bool(tokenizer.chat_template), "eos": model.generation_config.eos_token_id}}))
"""
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True).stdout
    report = json.loads(out.strip().splitlines()[-1])
    assert report["glmtune"] is own_class and report["class"] == architecture
    assert report["logits"] < 1e-4 and report["loss"] < 1e-5
    assert all(report["ids"]) and report["template"]
    assert report["eos"] == eos
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["command"] == "convert" and manifest["architecture"] == architecture


def test_convert_of_a_directory_without_weights_is_a_clear_error(cli, tmp_path, shared_dir):
    source = tmp_path / "src"
    source.mkdir()
    (source / "config.json").write_text((shared_dir / "fixtures/chatglm/glm4/config.json").read_text())
    result = cli("convert", source, tmp_path / "out", "--tokenizer", shared_dir / "tokenizers" / "glm-4-9b-chat")
    assert result.code == 2 and "has no weights" in result.err
    assert not (tmp_path / "out").exists()
