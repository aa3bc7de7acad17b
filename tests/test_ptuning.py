"""P-Tuning v2 (--finetuning_type ptuning): a prefix learns, is saved in peft's format, answers through infer, and
is refused where it can't work (merge, ChatGLM-6B's own cache)."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import write_json

FACTS = [("capital of France?", "Paris"), ("colour of the sky?", "blue"), ("two plus two?", "four"),
         ("opposite of hot?", "cold")]


@pytest.fixture(scope="module")
def prefix_run(tmp_path_factory):
    """A tiny GLM (hidden 64, 2 layers) and a projected 8-token prefix trained on 4 facts at the method's default
    learning rate (measured: the loss falls from about 6 to 0.4 in 25 full-batch steps)."""
    from glmtune.cli import main
    from glmtune.models.tiny import build_tiny_glm

    tmp = tmp_path_factory.mktemp("ptuning")
    rows = [{"prompt": q, "completion": a} for q, a in FACTS]
    model = build_tiny_glm(tmp / "model", [q + " " + a for q, a in FACTS] * 10, hidden_size=64, num_layers=2,
                           vocab_size=300)
    data = write_json(tmp / "rows.json", rows)
    assert main(["prepare", "--jsonl_path", str(data), "--save_path", str(tmp / "data"), "--model", str(model)]) == 0
    run = tmp / "run"
    assert main(["train", "--dataset_path", str(tmp / "data"), "--output_dir", str(run), "--finetuning_type",
                 "ptuning", "--pre_seq_len", "8", "--prefix_projection", "true", "--max_steps", "60",
                 "--per_device_train_batch_size", "4", "--logging_steps", "10", "--quiet"]) == 0
    return model, run


def test_prefix_training_lowers_the_loss_at_the_method_learning_rate(prefix_run):
    _, run = prefix_run
    losses = [e["loss"] for e in json.loads((run / "checkpoint-60" / "trainer_state.json").read_text())["log_history"]
              if "loss" in e]
    assert losses[-1] < 0.5 * losses[0]
    config = yaml.safe_load((run / "train_config.yaml").read_text())
    assert config["learning_rate"] == pytest.approx(2e-2)  # THUDM's, since none was given
    assert config["finetuning_type"] == "ptuning" and config["pre_seq_len"] == 8
    adapter = json.loads((run / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "PREFIX_TUNING" and adapter["num_virtual_tokens"] == 8


def test_infer_with_the_prefix_answers_the_memorised_facts(cli, prefix_run):
    _, run = prefix_run
    args = [arg for q, _ in FACTS for arg in ("--prompt", q)]
    result = cli("infer", "--peft_path", run, *args, "--max_new_tokens", "4")
    assert result.code == 0, result.err
    answers = [json.loads(line)["response"].strip() for line in result.out.splitlines()]
    assert sum(answer == fact for answer, (_, fact) in zip(answers, FACTS, strict=True)) >= 3, answers


def test_saved_prefix_loads_with_peft_and_changes_the_logits(prefix_run):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, run = prefix_run
    ids = torch.tensor([[5, 6, 7, 8]])
    base = AutoModelForCausalLM.from_pretrained(model)
    with torch.no_grad():
        before = base(input_ids=ids).logits
        after = PeftModel.from_pretrained(base, run)(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert after.shape == before.shape
    assert (after - before).abs().max() > 1e-2


def test_merge_of_a_prefix_is_refused_with_the_reason(cli, prefix_run, tmp_path):
    _, run = prefix_run
    result = cli("merge", "--peft_path", run, "--output_dir", tmp_path / "merged")
    assert result.code == 2
    assert "P-Tuning v2 prefix" in result.err and "cannot be folded" in result.err
    assert not (tmp_path / "merged").exists()


def test_ptuning_is_refused_for_chatglm6b_naming_the_family():
    from glmtune.errors import UserError
    from glmtune.models.chatglm6b.configuration import ChatGlm6bConfig
    from glmtune.models.chatglm6b.modeling import ChatGlm6bForCausalLM
    from glmtune.models.prefix import check_prefix_support

    config = ChatGlm6bConfig(vocab_size=300, hidden_size=32, num_layers=1, num_attention_heads=2,
                             inner_hidden_size=64, bos_token_id=4, eos_token_id=5, mask_token_id=1,
                             gmask_token_id=2, pad_token_id=0)
    with pytest.raises(UserError, match="ChatGLM-6B") as refusal:
        check_prefix_support(ChatGlm6bForCausalLM(config), "tiny-chatglm6b")
    assert "--finetuning_type lora" in refusal.value.hint
