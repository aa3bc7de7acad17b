"""A bf16 run holds its frozen weights in bf16, so it peaks no higher than the same run in fp32 (issue 20 saw a bf16
run peak at 2.7 GiB against fp32's 1.95 GiB)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Each run in its own process, so that its peak RSS (ru_maxrss) is its own.
CHILD = """
import json, resource, sys
from glmtune.cli import main
code = main(["train", *sys.argv[1:]])
print(json.dumps({"code": code, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


@pytest.fixture(scope="module")
def wide_vocabulary_data(tmp_path_factory, shared_dir):
    """A tiny GLM whose weights are mostly GLM-4's 151,552-token embedding and output layer (2 x 58.2M parameters:
    466 MB in fp32, half in bf16), prepared rows of 96 tokens. (At hidden 128 both runs peaked at 1024.7 MiB: a phase
    both share, not the weights, set the peak.)"""
    import torch
    from conftest import write_json
    from transformers import GenerationConfig, GlmConfig, GlmForCausalLM

    from glmtune.cli import main
    from glmtune.models.loading import load_tokenizer

    root = tmp_path_factory.mktemp("wide")
    tokenizer = load_tokenizer(str(shared_dir / "tokenizers" / "glm-4-9b-chat"))
    config = GlmConfig(vocab_size=len(tokenizer), hidden_size=384, intermediate_size=768, num_hidden_layers=2,
                       num_attention_heads=6, num_key_value_heads=2, head_dim=64, pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = GlmForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rows = [{"instruction": f"Question {i}: " + "tell me more " * 20, "output": f"Answer {i} " + "and so on " * 20}
            for i in range(16)]
    data = write_json(root / "rows.json", rows)
    assert main(["prepare", "--jsonl_path", str(data), "--save_path", str(root / "data"), "--model",
                 str(root / "model"), "--max_seq_length", "96"]) == 0
    return root


def peak_mib(root, precision: str) -> float:
    out = root / f"run-{precision}"
    done = subprocess.run([sys.executable, "-c", CHILD, "--dataset_path", str(root / "data"), "--output_dir", str(out),
                           "--precision", precision, "--per_device_train_batch_size", "4", "--max_steps", "3",
                           "--save_strategy", "no", "--logging_steps", "1", "--seed", "0"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["code"] == 0
    return result["peak_mib"]


@pytest.mark.xfail(strict=True, reason="open (issue 20): measured 1421 MiB in bf16 against 1198 MiB in fp32 at "
                   "load 9 to 12; the excess is about the bf16 weights' size (unconfirmed guess: the fp32 checkpoint's "
                   "mapped pages and the bf16 copies resident at once while loading)")
def test_a_bf16_run_peaks_no_higher_than_the_same_run_in_fp32(wide_vocabulary_data):
    fp32, bf16 = peak_mib(wide_vocabulary_data, "fp32"), peak_mib(wide_vocabulary_data, "bf16")
    # bf16 saves 233 MB of weights; 20 MiB of margin for the allocator's run-to-run spread (one pair measured so far,
    # so the spread itself is not known yet).
    assert bf16 <= fp32 + 20, (fp32, bf16)
