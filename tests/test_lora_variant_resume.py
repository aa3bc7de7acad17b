"""LoRA variants resumed after an interruption: PiSSA and OLoRA (whose adapters start from the base weights and are
converted into a plain LoRA on the original base when the run saves its final adapter), DoRA (a magnitude vector per
layer beside A and B), rsLoRA (another scale) and LoRA+ (the B matrices in their own optimizer group, at 16 times the
learning rate) end on the adapter of the run never interrupted, and each resumed adapter, merged, is the trained
model."""

from __future__ import annotations

import json

import pytest
from conftest import adapter_difference, cut_short_copy
from test_lora_variants import PROOF, logits
from test_ptuning_runs import prepared  # noqa: F401  (the fixture, reused: a one-block model, cheap to decompose)

# 8 rows in batches of 2: checkpoint-2 is mid-epoch
FLAGS = ["--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", "--per_device_train_batch_size", "2",
         "--learning_rate", "1e-2", "--lora_dropout", "0", "--logging_steps", "1", "--precision", "fp32",
         "--disable_tqdm", "true"]
VARIANTS = {"pissa": ["--init_lora_weights", "pissa"], "olora": ["--init_lora_weights", "olora"],
            "dora": ["--use_dora"], "rslora": ["--use_rslora"], "loraplus": ["--loraplus_lr_ratio", "16"]}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_resumed_variant_run_ends_on_the_uninterrupted_adapter_and_merges_into_the_model_it_trained(
        cli, prepared, tmp_path, variant):  # noqa: F811
    """A 4-step run with checkpoints at 2 and 4, and the same run killed while writing checkpoint-4, resumed from
    checkpoint-2: the same final adapter. PiSSA's resumed run decomposes the base again (the same SVD; OLoRA's the same
    QR) and converts its trained adapter once, from that start, into the uninterrupted run's rank-16 LoRA on the
    original base. LoRA+'s optimizer state comes back in its two groups.

    Then an independent reference: the resumed run's checkpoint-4 holds the adapter as training left it (PiSSA's own,
    which peft loads onto the base it decomposes again), the trained model. The final adapter, merged into the
    untouched base, must compute it (a conversion done twice, or from the wrong start, would not)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def train(output_dir, *extra):
        result = cli("train", "--dataset_path", prepared, "--output_dir", output_dir, *FLAGS, *VARIANTS[variant],
                     *extra)
        assert result.code == 0, result.err
        return result

    full, cut = tmp_path / "full", tmp_path / "cut"
    train(full)
    cut_short_copy(full, (2, 4), cut, "trainer state cut short")
    assert "resuming from checkpoint-2" in train(cut, "--resume_from_checkpoint", "true").err
    assert json.loads((cut / "manifest.json").read_text())["global_step"] == 4
    saved = [json.loads((d / "adapter_config.json").read_text()) for d in (full, cut)]
    assert saved[0] == saved[1]
    assert adapter_difference(full, cut) <= 1e-6

    merged = cli("merge", "--peft_path", cut, "--output_dir", tmp_path / "merged", "--dtype", "fp32")
    assert merged.code == 0, merged.err
    diff, _, tolerance, _ = PROOF.search(merged.out).groups()
    assert float(diff) <= float(tolerance) < 1e-2  # merge's own proof: merged vs base + final adapter
    base_dir = prepared.parent / "model"
    ids = AutoTokenizer.from_pretrained(base_dir)("question 3 answer 3")["input_ids"]
    trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), cut / "checkpoint-4").eval()
    expected = logits(trained, ids)
    assert (logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval(), ids) - expected).abs().max() < 1e-3
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    assert (logits(base, ids) - expected).abs().max() > 1e-1  # the adapter changes something the check can see
