"""End to end through the CLI: prepare -> train -> infer on the demo's few dozen Q&A pairs. Greedy answers to
the training questions must reproduce the trained answers: proof that the adapter was trained, saved, reloaded
and applied."""

from __future__ import annotations

import json

import pytest

from glmtune.demo import demo_data_path

FAST_TRAIN = ["--per_device_train_batch_size", "16", "--learning_rate", "3e-3", "--lr_scheduler_type", "cosine",
              "--warmup_steps", "10", "--lora_rank", "16", "--lora_dropout", "0", "--save_strategy", "no",
              "--logging_steps", "10"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model):
    """prepare + train once for the module; returns (dataset dir, run dir, training output)."""
    from glmtune.cli import main

    tmp = tmp_path_factory.mktemp("pipeline")
    assert main(["prepare", "--jsonl_path", str(demo_data_path()), "--save_path", str(tmp / "data"),
                 "--model", str(tiny_model)]) == 0
    assert main(["train", "--dataset_path", str(tmp / "data"), "--output_dir", str(tmp / "run"),
                 "--max_steps", "100", *FAST_TRAIN]) == 0
    return tmp / "data", tmp / "run"


@pytest.mark.numeric  # --precision auto: fp32 or bf16 by the CPU; holds either way (CI runs both)
def test_tuned_adapter_answers_the_training_questions(cli, trained, tmp_path, demo_rows):
    _, run = trained
    result = cli("infer", "--peft_path", run, "--input", demo_data_path(), "--output", tmp_path / "answers.jsonl",
                 "--max_new_tokens", "48", "--temperature", "0", "--batch_size", "16")
    assert result.code == 0, result.err
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [{k: v for k, v in a.items() if k != "response"} for a in answers] == demo_rows  # same rows, same order
    exact = sum(a["response"] == a["output"] for a in answers) / len(answers)
    assert exact >= 0.9, [(a["output"], a["response"]) for a in answers if a["response"] != a["output"]]


def test_base_model_alone_does_not_know_the_answers(cli, trained, tiny_model, demo_rows):
    result = cli("infer", "--model", tiny_model, "--prompt", demo_rows[0]["instruction"], "--max_new_tokens", "20")
    assert result.code == 0, result.err
    assert json.loads(result.out)["response"] != demo_rows[0]["output"]


@pytest.mark.numeric
def test_run_directory_holds_a_plain_peft_adapter_and_its_records(trained, tiny_model, demo_rows):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, run = trained
    for name in ["adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "train_config.yaml", "loss.png", "manifest.json"]:
        assert (run / name).is_file(), name
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["command"] == "train" and manifest["global_step"] == 100
    assert manifest["base_model"] == str(tiny_model)
    # Plain peft, without glmtune: the adapter changes the base model's greedy answer to the trained one.
    tokenizer = AutoTokenizer.from_pretrained(run)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), run).eval()
    messages = [{"role": "user", "content": demo_rows[0]["instruction"]}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=40, do_sample=False,
                             eos_token_id=model.generation_config.eos_token_id)
    assert tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip() == demo_rows[0]["output"]


def test_training_on_another_tokenizers_dataset_is_refused(cli, trained, tmp_path, demo_rows):
    from glmtune.models.tiny import build_tiny_glm

    data, _ = trained
    other = build_tiny_glm(tmp_path / "other", ["completely different text"] * 10, hidden_size=64, num_layers=1,
                           vocab_size=300)
    result = cli("train", "--dataset_path", data, "--model", other, "--output_dir", tmp_path / "run",
                 "--max_steps", "1")
    assert result.code == 2
    assert "was tokenized with the tokenizer of" in result.err and str(other) in result.err
    assert not (tmp_path / "run").exists()
