"""P-Tuning v2 on each GLM family glmtune loads: ChatGLM-6B (glmtune's class, positions from the ids as in THUDM's
ptuning), GLM-4 in transformers' classes (`glm4`, `glm4_moe`), and ChatGLM2/3 and GLM-4-9B-chat converted from
THUDM's layout. Each learns a prefix on four facts (the loss falls), answers them through `infer`, and its prefix
loads with peft alone."""

from __future__ import annotations

import json

import pytest
from conftest import write_json
from test_chatglm6b_pipeline import thudm_chatglm6b
from test_chatglm_pipeline import thudm_checkpoint
from test_native_glm4 import native_checkpoint

FACTS = [("capital of France?", "Paris"), ("colour of the sky?", "blue"), ("two plus two?", "four"),
         ("opposite of hot?", "cold")]


def checkpoint(family: str, directory, shared_dir, tiny_model):
    if family == "chatglm6b":
        # Its residual branch is scaled by sqrt(56), which damps what the prefix adds: at hidden 64 the loss
        # stalls near 5 (measured), at 128 it falls from 8 to 2.6 in 100 steps.
        return thudm_chatglm6b(directory, shared_dir)
    if family in ("glm4", "glm4_moe"):
        return native_checkpoint(directory, tiny_model, family)
    return thudm_checkpoint(directory, shared_dir, family)


# ChatGLM2-6B and GLM-4-9B-chat convert into the class ChatGLM3-6B converts into (GlmForCausalLM, also
# test_ptuning.py's): ChatGLM3 stands for the three.
@pytest.mark.parametrize("family", ["chatglm6b", "glm4", "glm4_moe", "chatglm3"])
def test_prefix_learns_answers_and_loads_with_peft(cli, tmp_path, shared_dir, tiny_model, family):
    import torch
    from datasets import load_from_disk
    from peft import PeftModel

    from glmtune.models.loading import load_model

    model = checkpoint(family, tmp_path / "model", shared_dir, tiny_model)
    data = write_json(tmp_path / "rows.json", [{"prompt": q, "completion": a} for q, a in FACTS])
    assert cli("prepare", "--jsonl_path", data, "--save_path", tmp_path / "data", "--model", model).code == 0
    # 100 full-batch steps: after 60, glm4 at hidden 64 gave 2 of 4 answers (measured). ChatGLM-6B needs 200: its
    # residual scale holds the prefix on a plateau (loss ~2.6 at step 100) where it knows the four answers but not
    # which question gets which (teacher-forced argmax 2 of 4; infer then says 'Paris, Paris, cold, cold'). After
    # 200 steps (loss 2.1) infer gives 4 of 4 in fp32 and bf16; learning rates 5e-2 and 1e-1, or a prefix of 32,
    # stay on the plateau at 100 (measured).
    # Those 200 steps run in fp32: 20 s, against 75 s in bf16 on a CPU with bf16 units (measured, load 1 and 4).
    run, steps = tmp_path / "run", 200 if family == "chatglm6b" else 100
    precision = ["--precision", "fp32"] if family == "chatglm6b" else []
    result = cli("train", "--dataset_path", tmp_path / "data", "--output_dir", run, "--finetuning_type", "ptuning",
                 "--pre_seq_len", "8", "--prefix_projection", "true", "--max_steps", str(steps),
                 "--per_device_train_batch_size", "4", "--logging_steps", "10", *precision)
    assert result.code == 0, result.err
    state = json.loads((run / f"checkpoint-{steps}" / "trainer_state.json").read_text())
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert losses[-1] < 0.5 * losses[0], losses

    args = [arg for q, _ in FACTS for arg in ("--prompt", q)]
    result = cli("infer", "--peft_path", run, *args, "--max_new_tokens", "4")
    assert result.code == 0, result.err
    answers = [json.loads(line)["response"].strip() for line in result.out.splitlines()]
    assert sum(answer == fact for answer, (_, fact) in zip(answers, FACTS, strict=True)) >= 3, answers

    # peft alone (no glmtune generation fix): the saved prefix is read back and changes the model's logits
    base = load_model(str(model), False)
    ids = torch.tensor([load_from_disk(str(tmp_path / "data"))["train"][0]["input_ids"]])
    prefixed = PeftModel.from_pretrained(base, run)
    assert prefixed.active_peft_config.peft_type == "PREFIX_TUNING"
    with torch.no_grad():
        with prefixed.disable_adapter():
            before = prefixed(input_ids=ids).logits
        after = prefixed(input_ids=ids).logits
    assert (after - before).abs().max() > 1e-2
