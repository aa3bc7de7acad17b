"""glmtune plan --finetuning_type ptuning: the prefix's parameters are those peft builds on the model (grouped-query
attention, with and without the projection MLP, and ChatGLM-6B), and its memory is priced as a run without LoRA
plus the prefix."""

from __future__ import annotations

import json

import pytest

from glmtune.plan.memory import Setup, estimate
from glmtune.plan.shape import shape_from_config

# 4 query heads and 2 key/value heads of 16: the prefix is sized for the key/value heads
GLM = {"model_type": "glm", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
       "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512, "pad_token_id": 0,
       "eos_token_id": 1}


def peft_prefix_count(model, pre_seq_len: int, projection: bool) -> int:
    from glmtune.arguments.ptuning import PtuningArguments
    from glmtune.train.ptuning import add_prefix

    prefixed = add_prefix(model, "tiny", PtuningArguments(pre_seq_len=pre_seq_len, prefix_projection=projection),
                          resume=None)
    return prefixed.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("projection", [False, True])
def test_prefix_parameter_count_is_what_glmtune_attaches(projection):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**GLM))
    setup = Setup(64, 2, 8, (), finetuning_type="ptuning", pre_seq_len=5, prefix_projection=projection)
    assert estimate(shape_from_config(GLM), setup).trainable_parameters == peft_prefix_count(model, 5, projection)


def test_chatglm6b_prefix_parameter_count_is_what_glmtune_attaches(shared_dir):
    from glmtune.models.chatglm6b.configuration import config_from_official
    from glmtune.models.chatglm6b.modeling import ChatGlm6bForCausalLM

    official = json.loads((shared_dir / "fixtures/chatglm/v1/config.json").read_text())
    model = ChatGlm6bForCausalLM(config_from_official(official))
    setup = Setup(64, 2, 8, (), finetuning_type="ptuning", pre_seq_len=4, prefix_projection=True)
    assert estimate(shape_from_config(official), setup).trainable_parameters == peft_prefix_count(model, 4, True)


def test_prefix_memory_is_a_run_without_lora_plus_the_prefix():
    shape = shape_from_config(GLM)
    prefix = estimate(shape, Setup(256, 4, 8, (), finetuning_type="ptuning", pre_seq_len=16))
    longer = estimate(shape, Setup(256, 4, 8, (), finetuning_type="ptuning", pre_seq_len=64))
    trainable = prefix.trainable_parameters
    assert trainable == 16 * 2 * 3 * 32  # tokens x (keys, values) x layers x key/value width
    assert prefix.lines["prefix weights"] == prefix.lines["gradients"] == 4 * trainable
    assert prefix.lines["optimizer states"] == 8 * trainable
    # 4 rows x 16 tokens x every layer's keys and values, in fp32
    assert prefix.lines["prefix (keys and values of every layer)"] == 4 * 16 * 2 * 3 * 32 * 4
    assert longer.lines["activations"] > prefix.lines["activations"]
    assert longer.total > prefix.total


def test_cli_plans_ptuning_naming_the_prefix(cli, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(GLM))
    result = cli("plan", "--model", tmp_path / "m", "--device", "cpu", "--device_memory_gib", "8",
                 "--finetuning_type", "ptuning", "--pre_seq_len", "32", "--prefix_projection", "true")
    assert result.code == 0, result.err
    assert "P-Tuning v2 prefix of 32 tokens (projected)" in result.out
    assert "prefix weights" in result.out and "\nfits: " in result.out
    setup = Setup(512, 8, 8, (), finetuning_type="ptuning", pre_seq_len=32, prefix_projection=True)
    trainable = estimate(shape_from_config(GLM), setup).trainable_parameters
    assert f"{trainable / 1e6:,.2f}M trainable" in result.out
