"""The FLOPs count behind MFU counts each part of a LoRA pass once, from the model's shape."""

from glmtune.train.flops import ModelShape, lora_step_flops, mfu

GLM = {"model_type": "glm", "hidden_size": 8, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4,
       "intermediate_size": 16, "num_hidden_layers": 3, "vocab_size": 100}


def test_glm_shape_has_its_fused_gate_up_and_grouped_kv():
    shape = ModelShape.from_config(GLM)
    assert shape.linears == {"q_proj": (8, 8), "k_proj": (8, 4), "v_proj": (8, 4), "o_proj": (8, 8),
                             "gate_up_proj": (8, 32), "down_proj": (16, 8)}


def test_llama_shape_names_gate_and_up_apart_with_the_same_total():
    llama = ModelShape.from_config({**GLM, "model_type": "llama"})
    glm = ModelShape.from_config(GLM)
    assert "gate_up_proj" not in llama.linears
    assert sum(i * o for i, o in llama.linears.values()) == sum(i * o for i, o in glm.linears.values())


def test_lora_step_flops_adds_frozen_layers_adapters_attention_and_supervised_output_layer():
    shape = ModelShape.from_config(GLM)
    frozen = 64 + 32 + 32 + 64 + 256 + 128  # parameters of one block's linear layers
    adapter = 2 * (8 + 4)  # r (in + out) for k_proj and v_proj, rank 2
    tokens, supervised, squares = 10, 4, 6 * 6 + 4 * 4
    expected = (3 * (4 * frozen + 6 * 2 * adapter) * tokens  # forward + input gradients; adapters 6r(in + out)
                + 3 * 3 * 4 * 2 * 4 * squares / 2  # causal attention, forward and twice that backward
                + 4 * 8 * 100 * supervised)  # output layer on supervised tokens
    assert lora_step_flops(shape, tokens, supervised, squares, 2, ["k_proj", "v_proj"]) == expected
    assert mfu(expected, 2.0, expected) == 0.5
