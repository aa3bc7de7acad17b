"""P-Tuning v2 (--finetuning_type ptuning): a prefix learns, is saved in peft's format, answers through infer, and
is refused where it can't work (merge, a sliding-window cache); ChatGLM-6B's prefix follows THUDM's positions."""

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


def tiny_chatglm6b():
    import torch

    from glmtune.models.chatglm6b.configuration import ChatGlm6bConfig
    from glmtune.models.chatglm6b.modeling import ChatGlm6bForCausalLM

    config = ChatGlm6bConfig(vocab_size=300, hidden_size=32, num_layers=2, num_attention_heads=2,
                             inner_hidden_size=64, bos_token_id=4, eos_token_id=5, mask_token_id=1,
                             gmask_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    return ChatGlm6bForCausalLM(config).eval()


def test_chatglm6b_prefix_positions_ignore_the_prefix_as_thudm_computes_them():
    """THUDM's ptuning: every token attends to the prefix, and positions come from the ids alone. peft's forward
    equals the model run with the prefix as its cache and the ids' own positions; and the prefix changes it."""
    import torch
    from peft import PrefixTuningConfig, get_peft_model

    from glmtune.models.chatglm6b.modeling import chatglm6b_position_ids

    model = tiny_chatglm6b()
    prefixed = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    with torch.no_grad():
        for parameter in prefixed.prompt_encoder.parameters():
            parameter.normal_()
        ids = torch.tensor([[10, 11, 12, 2, 4, 20, 21]])  # context, [gMASK] <sop>, answer
        ones = torch.ones_like(ids)
        through_peft = prefixed(input_ids=ids, attention_mask=ones).logits
        widened = torch.cat([torch.ones(1, 3, dtype=ones.dtype), ones], 1)  # the prefix, then the ids
        by_hand = model(input_ids=ids, attention_mask=widened, cache=prefixed.get_prompt(1),
                        position_ids=chatglm6b_position_ids(ids, ones, model.config)).logits
        with prefixed.disable_adapter():
            without = prefixed(input_ids=ids, attention_mask=ones).logits
    assert (through_peft - by_hand).abs().max() < 1e-5
    assert (through_peft - without).abs().max() > 1e-3  # measured 2e-3: the small model barely reads it


def test_chatglm6b_generation_from_a_prefix_equals_full_forwards_step_by_step():
    import torch
    from peft import PrefixTuningConfig, get_peft_model

    from glmtune.models.prefix import enable_prefix_generation

    prefixed = get_peft_model(tiny_chatglm6b(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    with torch.no_grad():
        for parameter in prefixed.prompt_encoder.parameters():
            parameter.normal_()
    enable_prefix_generation(prefixed)
    prompt = torch.tensor([[10, 11, 12, 2, 4]])
    with torch.no_grad():
        out = prefixed.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4,
                                do_sample=False, output_scores=True, return_dict_in_generate=True)
        sequence = prompt
        for scores in out.scores:
            full = prefixed(input_ids=sequence, attention_mask=torch.ones_like(sequence)).logits[:, -1]
            assert (full - scores).abs().max() < 1e-4
            sequence = torch.cat([sequence, full.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out.sequences, sequence)


def test_ptuning_is_refused_for_a_sliding_window_cache_naming_the_family():
    from transformers import MistralConfig, MistralForCausalLM

    from glmtune.errors import UserError
    from glmtune.models.prefix import check_prefix_support

    config = MistralConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, sliding_window=4, pad_token_id=0)
    with pytest.raises(UserError, match="sliding-window") as refusal:
        check_prefix_support(MistralForCausalLM(config), "tiny-mistral")
    assert "--finetuning_type lora" in refusal.value.hint


@pytest.fixture(scope="module")
def prefix_pairs(prefix_run, tmp_path_factory):
    """Preference pairs on the prefix run's base model, prepared."""
    from glmtune.cli import main

    model, _ = prefix_run
    tmp = tmp_path_factory.mktemp("ptuning_pairs")
    rows = [{"prompt": q, "chosen": a, "rejected": "no"} for q, a in FACTS]
    assert main(["prepare", "--jsonl_path", str(write_json(tmp / "pairs.json", rows)), "--save_path",
                 str(tmp / "data"), "--model", str(model)]) == 0
    return tmp / "data"


def test_dpo_refuses_to_train_a_prefix_saying_which_methods_do(cli, prefix_pairs, tmp_path):
    result = cli("dpo", "--dataset_path", prefix_pairs, "--output_dir", tmp_path / "run", "--finetuning_type",
                 "ptuning", "--max_steps", "1", "--save_strategy", "no")
    assert result.code == 2
    assert "--finetuning_type ptuning is for glmtune train" in result.err and "--finetuning_type lora" in result.err
    assert not (tmp_path / "run" / "adapter_config.json").exists()


def test_dpo_refuses_to_continue_a_prefix_from_peft_path(cli, prefix_run, prefix_pairs, tmp_path):
    _, run = prefix_run
    result = cli("dpo", "--dataset_path", prefix_pairs, "--output_dir", tmp_path / "run", "--peft_path", run,
                 "--max_steps", "1", "--save_strategy", "no")
    assert result.code == 2
    assert "is a P-Tuning v2 prefix" in result.err and "train LoRA adapters further" in result.err


def test_serve_refuses_a_prefix_among_per_request_adapters_and_says_to_serve_it_alone(cli, prefix_run):
    model, run = prefix_run
    result = cli("serve", "--model", model, "--port", "0", "--adapter", f"facts={run}")
    assert result.code == 2
    assert "P-Tuning v2 prefix" in result.err and "can't be picked per request" in result.err
    assert "glmtune serve --peft_path" in result.err
