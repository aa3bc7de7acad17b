"""glmtune plan reads config.json files and never imports torch (the model registry it asks is glmtune.models, whose
import registers ChatGLM-6B with transformers' Auto classes, which import torch): see glmtune.registration. Loading
keeps working in a process that planned first. (`import glmtune.models` alone still registers: tests/test_convert.py
loads a converted ChatGLM-6B with AutoModelForCausalLM after it, in a fresh process.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

CONFIGS = Path(__file__).parent / "data" / "configs"


def python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def plan_code(model: Path) -> str:
    return (f"from glmtune.cli import main\n"
            f"assert main(['plan', '--model', {str(model)!r}, '--device', 'cpu', '--device_memory_gib', '80']) == 0\n")


@pytest.mark.parametrize("model", ["glm-4-9b-0414", "chatglm3-6b", "glm-4.5-air", "chatglm-6b converted"])
def test_plan_estimates_without_importing_torch(tmp_path, model):
    if model == "chatglm-6b converted":  # glmtune's own architecture: the family whose registration imports torch
        config = {"model_type": "chatglm6b", "vocab_size": 130528, "hidden_size": 4096, "num_layers": 28,
                  "num_attention_heads": 32, "inner_hidden_size": 16384, "position_encoding_2d": True}
        directory = tmp_path / "chatglm6b"
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps(config))
    else:
        directory = CONFIGS / model
    out = python(plan_code(directory) + "import sys\nprint('torch imported:', 'torch' in sys.modules)\n")
    assert "total (peak)" in out
    assert "torch imported: False" in out


def test_a_process_that_planned_first_still_loads_glmtune_s_own_architecture(tmp_path):
    """The registration plan skipped happens when glmtune's loader loads (a directory `glmtune convert` wrote for
    ChatGLM-6B says model_type chatglm6b, which only the registration makes the Auto classes know)."""
    from glmtune.models.chatglm6b.configuration import ChatGlm6bConfig
    from glmtune.models.chatglm6b.modeling import ChatGlm6bForCausalLM

    config = ChatGlm6bConfig(vocab_size=200, hidden_size=32, num_layers=1, num_attention_heads=4,
                             inner_hidden_size=64, bos_token_id=4, eos_token_id=5, mask_token_id=6,
                             gmask_token_id=7, pad_token_id=3)
    ChatGlm6bForCausalLM(config).save_pretrained(tmp_path / "model")
    out = python(plan_code(tmp_path / "model") + "import sys\nassert 'torch' not in sys.modules\n"
                 "from glmtune.models.loading import load_model\n"
                 f"print(type(load_model({str(tmp_path / 'model')!r})).__name__)\n")
    assert out.strip().endswith("ChatGlm6bForCausalLM")

