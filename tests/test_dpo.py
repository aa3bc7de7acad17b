"""glmtune dpo: preference pairs through prepare's templates, DPO on a LoRA adapter, the reference model, refusals."""

from __future__ import annotations

import json

import pytest
from conftest import adapter_difference, cut_short_copy, stop_with_signal, write_json

ROWS = 8  # preference pairs trained on: all of them in one batch, so the first logged step covers every pair
BETA = 0.1  # TRL's default


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """The first single-question rows of the shared English preference demo, a tiny GLM whose tokenizer was trained on
    their text, and the rows prepared (cut to 96 tokens: enough to differ, fast to train)."""
    from conftest import SHARED

    from glmtune.cli import main
    from glmtune.models.tiny import build_tiny_glm

    source = SHARED / "data" / "preference" / "dpo_en_demo.json"
    if not source.is_file():
        pytest.skip(f"the shared data file {source} is absent")
    rows = [r for r in json.loads(source.read_text(encoding="utf-8")) if len(r["conversations"]) == 1][:ROWS]
    tmp = tmp_path_factory.mktemp("dpo")
    texts = [m["value"] for r in rows for m in (*r["conversations"], r["chosen"], r["rejected"])]
    model = build_tiny_glm(tmp / "model", texts, hidden_size=64, num_layers=1, vocab_size=600)
    data = write_json(tmp / "pairs.json", rows)
    assert main(["prepare", "--jsonl_path", str(data), "--save_path", str(tmp / "data"), "--model", str(model),
                 "--max_seq_length", "96"]) == 0
    return model, tmp / "data", rows


def dpo(cli, data, out, *extra):
    return cli("dpo", "--dataset_path", data, "--output_dir", out, "--per_device_train_batch_size", ROWS,
               "--logging_steps", "1", "--precision", "fp32", "--save_strategy", "no", *extra)


def completion_logp(model, prompt: list[int], completion: list[int]) -> float:
    """log p(completion | prompt), summed over the completion's tokens: a naive full-logits computation."""
    import torch

    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()  # (tokens - 1, vocab)
    logps = logits.log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]  # log p of each next token
    return logps[len(prompt) - 1:].sum().item()


def implicit_margins(policy, reference, rows) -> list[float]:
    """DPO's implicit reward margin of each pair, without beta: log-ratio(chosen) - log-ratio(rejected), each the
    policy's log-prob minus the reference's."""
    margins = []
    for row in rows:
        prompt = row["prompt_ids"]
        ratios = [completion_logp(policy(), prompt, row[k]) - completion_logp(reference(), prompt, row[k])
                  for k in ("chosen_ids", "rejected_ids")]
        margins.append(ratios[0] - ratios[1])
    return margins


def load_with_adapter(model_dir, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(adapter)).eval()


def test_dpo_grows_the_preference_margin_and_saves_a_reloadable_adapter(cli, pairs, tmp_path):
    import torch
    from datasets import load_from_disk

    model_dir, data, _ = pairs
    result = dpo(cli, data, tmp_path / "run", "--max_steps", "6", "--learning_rate", "2e-3")
    assert result.code == 0, result.err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == sorted([
        "README.md", "adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "dpo_config.yaml",
        "loss.png", "manifest.json", "tokenizer.json", "tokenizer_config.json", "training_args.bin"])
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["command"] == "dpo" and manifest["global_step"] == 6
    assert manifest["reference"] == "the base model without any adapter"
    assert set(manifest["last_logged_rewards"]) == {"rewards/accuracies", "rewards/margins", "rewards/chosen",
                                                    "rewards/rejected"}
    assert "'rewards/margins'" in result.out + result.err and "reward accuracy" in result.out

    # Reloaded with peft: the adapter changes the logits, and the pairs' implicit reward margin, zero before training
    # (policy = reference), has grown on average and for most pairs.
    model = load_with_adapter(model_dir, tmp_path / "run")
    rows = load_from_disk(str(data))["train"]
    probe = torch.tensor([rows[0]["prompt_ids"]])
    with torch.no_grad():
        tuned = model(input_ids=probe).logits
        with model.disable_adapter():
            base = model(input_ids=probe).logits
    assert (tuned - base).abs().max() > 1e-3

    def without_adapter():
        return _Disabled(model)

    margins = implicit_margins(lambda: model, without_adapter, rows)
    assert sum(margins) / len(margins) > 1.0, margins
    assert sum(m > 0 for m in margins) >= 0.75 * len(margins), margins

    # The adapter merges like a train one (merge probes with the dataset's chosen sequences).
    merged = cli("merge", "--peft_path", tmp_path / "run", "--output_dir", tmp_path / "merged")
    assert merged.code == 0, merged.err


class _Disabled:
    """The PeftModel called with its adapters disabled: the base model."""

    def __init__(self, model):
        self.model = model

    def __call__(self, **inputs):
        with self.model.disable_adapter():
            return self.model(**inputs)


def test_string_and_sharegpt_rows_give_the_same_ids_as_the_template_renders(pairs, tmp_path):
    from transformers import AutoTokenizer

    from glmtune.data.preference import encode_pair
    from glmtune.data.prepare import load_data

    model_dir, _, rows = pairs
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    sharegpt = write_json(tmp_path / "sharegpt.json", rows[:3])
    strings = write_json(tmp_path / "strings.json", [
        {"prompt": r["conversations"][0]["value"], "chosen": r["chosen"]["value"], "rejected": r["rejected"]["value"]}
        for r in rows[:3]])
    eos = tokenizer.eos_token_id
    for path in (sharegpt, strings):
        data = load_data([str(path)], None)
        assert data.format == "preference"
        for pair, row in zip(data.conversations, rows, strict=False):
            prompt, chosen, rejected = encode_pair(tokenizer, pair, [eos])
            question = row["conversations"][0]["value"]
            # The tiny GLM's template: "<|assistant|>" ends the prompt; an answer is "\n" + text, then the end token.
            assert prompt == tokenizer.encode(f"[gMASK]<sop><|user|>\n{question}<|assistant|>",
                                              add_special_tokens=False)
            assert chosen == tokenizer.encode("\n" + row["chosen"]["value"], add_special_tokens=False) + [eos]
            assert rejected == tokenizer.encode("\n" + row["rejected"]["value"], add_special_tokens=False) + [eos]


def test_glm4_pairs_end_each_answer_on_its_end_of_turn_token(shared):
    from glmtune.data.conversation import Message
    from glmtune.data.preference import PreferenceConversation, encode_pair
    from glmtune.models.loading import load_tokenizer, stop_token_ids

    path = shared / "tokenizers" / "glm-4-9b-chat"
    tokenizer = load_tokenizer(str(path))
    stops = stop_token_ids(str(path), tokenizer)
    chosen_text = "你好！有什么可以帮你？"
    pair = PreferenceConversation(messages=[Message("user", "你好"), Message("assistant", chosen_text, True)],
                                  system="Be brief.", rejected="走开。")
    prompt, chosen, rejected = encode_pair(tokenizer, pair, stops)
    official = tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": "你好"}], add_generation_prompt=True,
                                             return_dict=False)
    assert prompt == list(official)
    for answer, text in ((chosen, chosen_text), (rejected, "走开。")):
        assert tokenizer.decode(answer[:-1]) == "\n" + text and answer[-1] in stops


THINKING_PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                   {"role": "assistant", "reasoning_content": "Two and two.", "content": "4"},
                   {"role": "user", "content": "times 3?"}]
THINKING_PAIRS = [  # (row, chosen as the template reads it, rejected likewise)
    ({"messages": THINKING_PROMPT,
      "chosen": {"role": "assistant", "reasoning_content": "4*3 is 12.", "content": "12"},
      "rejected": "<think>4+3 is 7.</think>7"},
     {"role": "assistant", "reasoning_content": "4*3 is 12.", "content": "12"},
     {"role": "assistant", "reasoning_content": "4+3 is 7.", "content": "7"}),
    ({"conversations": [{"from": "human", "value": "times 3?"}],
      "chosen": {"from": "gpt", "value": "<think>Times three.</think>\n12"},
      "rejected": {"role": "assistant", "content": "<think>Guess.</think>9"}},
     {"role": "assistant", "reasoning_content": "Times three.", "content": "12"},
     {"role": "assistant", "reasoning_content": "Guess.", "content": "9"}),
    ({"prompt": "times 3?", "chosen": "12", "rejected": "<think>Hmm.</think>9"},
     {"role": "assistant", "content": "12"},
     {"role": "assistant", "reasoning_content": "Hmm.", "content": "9"}),
]


@pytest.mark.parametrize("case", range(len(THINKING_PAIRS)))
def test_reasoning_in_chosen_and_rejected_is_rendered_as_the_template_writes_the_generated_turn(glm45_tokenizer_dir,
                                                                                                case):
    """GLM-4.5+: each answer's reasoning (reasoning_content, or a <think> block opening it) is trained as the
    official template writes the turn it generates: prompt + answer are the template's own rendering of the
    conversation with that answer, then the stop token."""
    from transformers import AutoTokenizer

    from glmtune.data.formats import read_preference
    from glmtune.data.preference import encode_pair
    from glmtune.models.loading import stop_token_ids

    tokenizer = AutoTokenizer.from_pretrained(glm45_tokenizer_dir)
    stops = stop_token_ids(str(glm45_tokenizer_dir), tokenizer)
    row, chosen_message, rejected_message = THINKING_PAIRS[case]
    pair = read_preference(row, need_answer=True)
    prompt, chosen, rejected = encode_pair(tokenizer, pair, stops)
    messages = row.get("messages") or [{"role": "user", "content": "times 3?"}]

    def rendered(extra, add_generation_prompt=False):
        return tokenizer.apply_chat_template(messages + extra, tokenize=True, return_dict=True,
                                             add_generation_prompt=add_generation_prompt)["input_ids"]

    end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert prompt == rendered([], add_generation_prompt=True)
    assert prompt + chosen == rendered([chosen_message]) + [end]
    assert prompt + rejected == rendered([rejected_message]) + [end]
    thought = rejected_message["reasoning_content"]
    assert tokenizer.decode(rejected) == f"\n<think>{thought}</think>\n{rejected_message['content']}<|endoftext|>"


def test_rejected_reasoning_is_refused_where_the_template_has_no_place_for_it(cli, pairs, tmp_path):
    model_dir, _, _ = pairs
    data = write_json(tmp_path / "pairs.json", [{"prompt": "q", "chosen": "a", "rejected": "<think>t</think>b"}])
    result = cli("prepare", "--jsonl_path", data, "--save_path", tmp_path / "out", "--model", model_dir)
    assert result.code == 2 and "carry reasoning" in result.err and "pairs.json row 0" in result.err


def test_starting_from_an_sft_adapter_measures_rewards_against_the_chosen_reference(cli, pairs, tmp_path):
    from datasets import load_from_disk

    model_dir, data, rows = pairs
    sft_rows = write_json(tmp_path / "sft.json", [{"prompt": r["conversations"][0]["value"],
                                                   "completion": r["chosen"]["value"]} for r in rows])
    assert cli("prepare", "--jsonl_path", sft_rows, "--save_path", tmp_path / "sft_data", "--model", model_dir,
               "--max_seq_length", "96").code == 0
    sft = cli("train", "--dataset_path", tmp_path / "sft_data", "--output_dir", tmp_path / "sft", "--max_steps", "3",
              "--learning_rate", "5e-3", "--precision", "fp32", "--save_strategy", "no", "--lora_rank", "4")
    assert sft.code == 0, sft.err

    def first_logged_margin(run):
        return json.loads((run / "manifest.json").read_text())["first_logged_rewards"]["rewards/margins"]

    # --reference start (default): the reference is the starting adapter itself, so the first step's margin is 0.
    start = dpo(cli, data, tmp_path / "start", "--max_steps", "1", "--peft_path", tmp_path / "sft")
    assert start.code == 0, start.err
    assert first_logged_margin(tmp_path / "start") == 0.0
    assert json.loads((tmp_path / "start" / "adapter_config.json").read_text())["r"] == 4  # the SFT adapter's
    assert not (tmp_path / "start" / "ref").exists()  # TRL's frozen copy is not part of the output

    # --reference base: the reference is the base without the adapter, so the first step's margin is the SFT
    # adapter's own implicit margin over the base, computed here with the full logits.
    base = dpo(cli, data, tmp_path / "base", "--max_steps", "1", "--peft_path", tmp_path / "sft",
               "--reference", "base")
    assert base.code == 0, base.err
    sft_model = load_with_adapter(model_dir, tmp_path / "sft")
    margins = implicit_margins(lambda: sft_model, lambda: _Disabled(sft_model), load_from_disk(str(data))["train"])
    expected = BETA * sum(margins) / len(margins)
    assert first_logged_margin(tmp_path / "base") == pytest.approx(expected, rel=1e-3, abs=1e-4)
    assert abs(expected) > 1e-3  # the check can tell the two references apart


def test_an_interrupted_dpo_run_resumes_to_the_uninterrupted_adapter(cli, pairs, tmp_path):
    """SIGTERM saves a checkpoint and exits 130; a checkpoint cut short by a kill is passed over. Either way
    --resume_from_checkpoint true ends within 1e-6 of the run never interrupted (fp32, batches of 2 pairs: the resumed
    run starts mid-epoch, so the data order is restored too)."""
    _, data, _ = pairs
    flags = ("--max_steps", "8", "--save_strategy", "steps", "--save_steps", "2", "--per_device_train_batch_size",
             "2", "--learning_rate", "2e-3", "--disable_tqdm", "true")
    assert dpo(cli, data, tmp_path / "full", *flags).code == 0

    cut = tmp_path / "cut"
    cut_short_copy(tmp_path / "full", (2, 4), cut, "trainer state cut short")
    result = dpo(cli, data, cut, *flags, "--resume_from_checkpoint", "true")
    assert result.code == 0, result.err
    assert "checkpoint-4: incomplete" in result.err and "resuming from checkpoint-2" in result.err
    assert adapter_difference(tmp_path / "full", cut) <= 1e-6

    stopped = tmp_path / "stopped"
    code, err = stop_with_signal("SIGTERM", "dpo", "--dataset_path", data, "--output_dir", stopped, "--logging_steps",
                                 "1", "--precision", "fp32", *flags)
    assert code == 130, err[-2000:]
    step = int(err.split("stopped by SIGTERM at step ")[1].split(":")[0])
    assert 1 <= step < 8 and (stopped / f"checkpoint-{step}" / "trainer_state.json").is_file()
    assert not (stopped / "adapter_model.safetensors").exists()
    result = dpo(cli, data, stopped, *flags, "--resume_from_checkpoint", "true")
    assert result.code == 0, result.err
    assert adapter_difference(tmp_path / "full", stopped) <= 1e-6


def test_supervised_data_is_refused_by_dpo_and_pairs_by_train(cli, pairs, tmp_path):
    model_dir, data, _ = pairs
    sft_rows = write_json(tmp_path / "sft.json", [{"prompt": "q", "completion": "a"}])
    prepared = cli("prepare", "--jsonl_path", sft_rows, "--save_path", tmp_path / "sft_data", "--model", model_dir)
    assert prepared.code == 0, prepared.err
    refused = dpo(cli, tmp_path / "sft_data", tmp_path / "run", "--max_steps", "1")
    assert refused.code == 2 and "holds supervised rows" in refused.err and "glmtune train" in refused.err
    refused = cli("train", "--dataset_path", data, "--output_dir", tmp_path / "run", "--max_steps", "1")
    assert refused.code == 2 and "holds preference pairs" in refused.err and "glmtune dpo" in refused.err
    assert not (tmp_path / "run").exists()


def test_a_row_missing_rejected_is_named(cli, pairs, tmp_path):
    model_dir, _, rows = pairs
    broken = [rows[0], {"conversations": rows[1]["conversations"], "chosen": rows[1]["chosen"]}]
    path = write_json(tmp_path / "pairs.json", broken)
    result = cli("prepare", "--jsonl_path", path, "--save_path", tmp_path / "out", "--model", model_dir)
    assert result.code == 2
    assert f"{path} row 1: field 'rejected' is missing" in result.err
    assert not (tmp_path / "out").exists()


def test_mixed_preference_and_supervised_files_are_refused(cli, pairs, tmp_path):
    model_dir, _, rows = pairs
    pairs_file = write_json(tmp_path / "pairs.json", rows[:2])
    sft_file = write_json(tmp_path / "sft.json", [{"prompt": "q", "completion": "a"}])
    result = cli("prepare", "--jsonl_path", pairs_file, sft_file, "--save_path", tmp_path / "out", "--model", model_dir)
    assert result.code == 2 and "mixes 2 preference pairs" in result.err


def test_help_shows_the_dpo_options_with_trl_s_defaults(cli):
    import dataclasses

    from glmtune.commands.dpo import COMMON_DPO_OPTIONS, DPO_DEFAULTS

    # (that --help imports neither torch nor TRL: tests/test_cli.py, for every command)
    result = cli("dpo", "--help")
    assert result.code == 0
    assert "--beta" in result.out and "--peft_path" in result.out and "--reference" in result.out

    from trl import DPOConfig

    fields = {f.name: f for f in dataclasses.fields(DPOConfig)}
    for name, default, _ in COMMON_DPO_OPTIONS:
        field = fields[name]
        trl_default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        assert DPO_DEFAULTS.get(name, trl_default) == default, name


def test_dpo_under_torchrun_tokenizes_a_data_file_once_and_trains_as_two_ranks(pairs, tmp_path):
    """torchrun with two processes (gloo, CPU): the preference file is prepared by the main process alone, both
    ranks train, one writes the adapter."""
    import os
    import subprocess
    import sys

    model_dir, _, rows = pairs
    data = write_json(tmp_path / "pairs.json", rows)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf_home")}  # an empty prepare cache
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "glmtune",
                           "dpo", "--dataset_path", str(data), "--model", str(model_dir), "--max_seq_length", "96",
                           "--output_dir", str(tmp_path / "run"), "--per_device_train_batch_size", str(ROWS // 2),
                           "--max_steps", "2", "--logging_steps", "1", "--precision", "fp32",
                           "--save_strategy", "no"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout + done.stderr
    assert out.count("Dataset report") == 1 and out.count("tokenized once, by this process") == 1
    assert done.stdout.count("Adapter saved") == 1  # the main process reports
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["global_step"] == 2
    assert "rewards/margins" in manifest["last_logged_rewards"]


def test_dpo_trains_on_a_4bit_base(cli, pairs, tmp_path):
    """QLoRA DPO: the reference pass (adapters disabled, no grad) runs between training steps on the same 4-bit
    layers, which must keep their training layout (see glmtune.models.quantization.keep_training_layout)."""
    _, data, _ = pairs
    result = dpo(cli, data, tmp_path / "run", "--max_steps", "3", "--learning_rate", "2e-3", "--quantization_bit", "4")
    assert result.code == 0, result.err
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["config"]["quantization"]["bits"] == 4 and manifest["global_step"] == 3
    assert manifest["last_logged_rewards"]["rewards/margins"] > manifest["first_logged_rewards"]["rewards/margins"]
