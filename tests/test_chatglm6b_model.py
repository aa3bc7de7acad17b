"""The native ChatGLM-6B (glmtune.models.chatglm6b) loads THUDM's checkpoint layout and computes what the official
remote code computed on it (../shared/fixtures/chatglm/v1/golden.json); on other shapes it agrees with itself."""

from __future__ import annotations

import json
import shutil

import pytest

torch = pytest.importorskip("torch")

from glmtune.models.chatglm6b import register  # noqa: E402
from glmtune.models.chatglm6b.configuration import ChatGlm6bConfig, config_from_official  # noqa: E402
from glmtune.models.chatglm6b.modeling import ChatGlm6bForCausalLM, chatglm6b_position_ids  # noqa: E402


@pytest.fixture(scope="module")
def fixture_dir(shared_dir):
    return shared_dir / "fixtures" / "chatglm" / "v1"


@pytest.fixture(scope="module")
def golden(fixture_dir) -> dict:
    return json.loads((fixture_dir / "golden.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def checkpoint(fixture_dir, tmp_path_factory):
    """THUDM's weights file as it is (with its rotary inv_freq buffers) beside our config.json."""
    directory = tmp_path_factory.mktemp("chatglm6b")
    official = json.loads((fixture_dir / "config.json").read_text(encoding="utf-8"))
    config_from_official(official).save_pretrained(directory)
    shutil.copy(fixture_dir / "model.safetensors", directory / "model.safetensors")
    return directory


@pytest.fixture(scope="module")
def model(checkpoint):
    return ChatGlm6bForCausalLM.from_pretrained(checkpoint).eval()


def left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def test_defaults_are_the_real_chatglm_6b():
    config = ChatGlm6bConfig()
    assert config.model_type == "chatglm6b"
    assert (config.vocab_size, config.hidden_size, config.num_layers) == (130528, 4096, 28)
    assert config.num_attention_heads == 32
    assert (config.inner_hidden_size, config.layernorm_epsilon, config.max_sequence_length) == (16384, 1e-5, 2048)
    assert (config.bos_token_id, config.eos_token_id, config.mask_token_id, config.gmask_token_id) == (
        130004, 130005, 130000, 130001)
    assert config.pad_token_id == 3 and config.tie_word_embeddings and config.position_encoding_2d


def test_official_configs_that_cannot_run_natively_are_refused(fixture_dir):
    official = json.loads((fixture_dir / "config.json").read_text(encoding="utf-8"))
    with pytest.raises(ValueError, match="quantization_bit=4"):
        config_from_official({**official, "quantization_bit": 4})
    with pytest.raises(ValueError, match="P-Tuning"):
        config_from_official({**official, "pre_seq_len": 128})


def test_the_official_checkpoint_loads_without_renaming(checkpoint):
    model, info = ChatGlm6bForCausalLM.from_pretrained(checkpoint, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.lm_head.weight is model.transformer.word_embeddings.weight


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_logits_loss_and_positions_match_the_official_code(checkpoint, golden, attn):
    model = ChatGlm6bForCausalLM.from_pretrained(checkpoint, attn_implementation=attn).eval()
    for name, sequence in golden["sequences"].items():
        ids = torch.tensor([sequence["input_ids"]])
        with torch.no_grad():
            out = model(input_ids=ids, labels=torch.tensor([sequence["labels"]]))
        assert (out.logits[0] - torch.tensor(sequence["logits"])).abs().max().item() < 1e-4, name
        assert abs(out.loss.item() - sequence["loss"]) < 1e-5, name
        assert chatglm6b_position_ids(ids, None, model.config)[0].tolist() == sequence["position_ids"], name


def test_greedy_generation_through_the_cache_matches_the_official_steps(model, golden):
    for name, sequence in golden["sequences"].items():
        for case in ("generate_from_prompt", "generate_continue"):
            expected = sequence[case]
            ids = torch.tensor([expected["input_ids"]])
            with torch.no_grad():
                out = model.generate(input_ids=ids, max_new_tokens=expected["n_new"], do_sample=False, num_beams=1,
                                     use_cache=True, return_dict_in_generate=True, output_scores=True,
                                     eos_token_id=None)
            assert out.sequences[0, ids.shape[1]:].tolist() == expected["new_ids"], (name, case)
            scores = torch.stack([s[0] for s in out.scores])  # (steps, vocab)
            assert (scores - torch.tensor(expected["step_scores"])).abs().max().item() < 1e-4, (name, case)


def test_left_padded_batch_gives_each_rows_own_logits(model, golden):
    sequences = list(golden["sequences"].values())
    ids, mask = left_padded([s["input_ids"] for s in sequences], model.config.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits  # (batch, seq, vocab)
    for row, sequence in enumerate(sequences):
        real = logits[row, ids.shape[1] - len(sequence["input_ids"]):]
        assert (real - torch.tensor(sequence["logits"])).abs().max().item() < 1e-4


def test_left_padded_generation_matches_the_official_steps_of_each_row(model, golden):
    cases = [s["generate_continue"] for s in golden["sequences"].values()]
    ids, mask = left_padded([c["input_ids"] for c in cases], model.config.pad_token_id)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                             return_dict_in_generate=True, output_scores=True, eos_token_id=None)
    for row, case in enumerate(cases):
        assert out.sequences[row, ids.shape[1]:].tolist() == case["new_ids"]
        scores = torch.stack([s[row] for s in out.scores])
        assert (scores - torch.tensor(case["step_scores"])).abs().max().item() < 1e-4


def test_last_hidden_state_feeds_lm_head_and_logits_to_keep_keeps_the_last(model, golden):
    sequence = golden["sequences"]["long"]
    ids = torch.tensor([sequence["input_ids"]])
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        last = model(input_ids=ids, logits_to_keep=1).logits
    assert len(out.hidden_states) == model.config.num_layers + 1
    assert (model.lm_head(out.hidden_states[-1]) - out.logits).abs().max().item() < 1e-6
    assert last.shape == (1, 1, model.config.vocab_size)
    assert (last[0, 0] - torch.tensor(sequence["logits"][-1])).abs().max().item() < 1e-4


def test_save_and_auto_load_round_trip(model, golden, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    register()
    register()  # idempotent
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "chatglm6b"
    assert type(AutoConfig.from_pretrained(tmp_path)) is ChatGlm6bConfig
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is ChatGlm6bForCausalLM
    ids = torch.tensor([golden["sequences"]["long"]["input_ids"]])
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_bf16_runs_and_stays_near_the_fp32_reference(checkpoint, golden):
    model = ChatGlm6bForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16).eval()
    sequence = golden["sequences"]["long"]
    with torch.no_grad():
        out = model(input_ids=torch.tensor([sequence["input_ids"]]), labels=torch.tensor([sequence["labels"]]))
        model.generate(input_ids=torch.tensor([sequence["generate_continue"]["input_ids"]]), max_new_tokens=3,
                       do_sample=False)
    assert out.logits.dtype == torch.bfloat16
    assert (out.logits[0].float() - torch.tensor(sequence["logits"])).abs().max().item() < 0.25
    assert abs(out.loss.item() - sequence["loss"]) < 0.05


def test_a_few_lora_steps_on_query_key_value_lower_the_loss(checkpoint, golden):
    from peft import LoraConfig, get_peft_model

    model = ChatGlm6bForCausalLM.from_pretrained(checkpoint)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["query_key_value"]))
    sequence = golden["sequences"]["long"]
    ids, labels = torch.tensor([sequence["input_ids"]]), torch.tensor([sequence["labels"]])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert abs(losses[0] - sequence["loss"]) < 1e-4  # LoRA starts as the identity
    assert losses[-1] < losses[0] - 0.5


def test_gradient_checkpointing_gives_the_same_gradients(checkpoint, golden):
    sequence = golden["sequences"]["long"]
    ids, labels = torch.tensor([sequence["input_ids"]]), torch.tensor([sequence["labels"]])

    def gradient(checkpointing: bool) -> torch.Tensor:
        model = ChatGlm6bForCausalLM.from_pretrained(checkpoint)
        if checkpointing:
            model.gradient_checkpointing_enable()  # the Trainer's switch (gradient_checkpointing=True)
        model.train()
        model(input_ids=ids, labels=labels).loss.backward()
        return model.transformer.layers[0].attention.query_key_value.weight.grad

    assert (gradient(True) - gradient(False)).abs().max().item() < 1e-5


def test_loss_sums_over_num_items_in_batch(model, golden):
    sequence = golden["sequences"]["short"]
    targets = sum(label != -100 for label in sequence["labels"][1:])
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([sequence["input_ids"]]), labels=torch.tensor([sequence["labels"]]),
                     num_items_in_batch=torch.tensor(2 * targets)).loss
    assert abs(loss.item() - sequence["loss"] / 2) < 1e-5


def test_rows_without_gmask_or_sop_are_refused_with_the_fix(model):
    with pytest.raises(ValueError, match=r"\[gMASK\].*<sop>.*rows \[0\]"):
        model(input_ids=torch.tensor([[37, 121, 254]]))


# An independent check on shapes the fixture does not have: other head count, layers, epsilon, special ids, and
# [MASK] rows beside [gMASK] rows. Greedy decoding through the cache must see what full forwards see.
@pytest.mark.parametrize("position_encoding_2d", [True, False])
def test_other_shapes_decode_through_the_cache_as_full_forwards_do(position_encoding_2d):
    config = ChatGlm6bConfig(vocab_size=97, hidden_size=48, num_layers=3, num_attention_heads=2, inner_hidden_size=80,
                             layernorm_epsilon=1e-6, bos_token_id=90, eos_token_id=91, mask_token_id=7,
                             gmask_token_id=93, pad_token_id=0, max_sequence_length=64, initializer_range=0.3,
                             position_encoding_2d=position_encoding_2d)
    torch.manual_seed(0)
    model = ChatGlm6bForCausalLM(config).eval()
    prompts = [
        [11, 12, 13, 14, 15, 93, 90],  # [gMASK] at the end of the context
        [21, 7, 22, 90, 23],  # [MASK] inside the context, and an answer already started
        [31, 32, 33, 34, 35, 36, 37, 38, 93, 90, 39, 40],
    ]
    ids, mask = left_padded(prompts, config.pad_token_id)
    steps = 6
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                             return_dict_in_generate=True, output_scores=True, eos_token_id=None)
    for row, prompt in enumerate(prompts):
        full = out.sequences[row, ids.shape[1] - len(prompt):]  # the row alone, without padding
        with torch.no_grad():
            logits = model(input_ids=full[None], use_cache=False).logits[0]  # (seq, vocab)
        expected = logits[len(prompt) - 1: len(prompt) - 1 + steps]  # the logits that chose each new token
        scores = torch.stack([s[row] for s in out.scores])
        assert (scores - expected).abs().max().item() < 1e-4, row
        assert full[len(prompt):].tolist() == expected.argmax(-1).tolist(), row

    # The same rows, padded and not yet decoded, in one forward; inputs_embeds with explicit positions agree.
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask).logits
        positions = chatglm6b_position_ids(ids, mask, config)
        embedded = model(inputs_embeds=model.get_input_embeddings()(ids), attention_mask=mask,
                         position_ids=positions).logits
    assert (embedded - padded).abs().max().item() < 1e-5
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([prompt])).logits[0]
        assert (padded[row, ids.shape[1] - len(prompt):] - alone).abs().max().item() < 1e-4, row
