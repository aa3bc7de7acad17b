"""The first ChatGLM-6B end to end: a checkpoint directory as THUDM publishes it (config.json `model_type: chatglm`,
`.bin` shards with an index, the real ice_text tokenizer, remote-code files that must not run) through prepare ->
train -> infer, and the seed's three scripts on its default model `THUDM/chatglm-6b` from the hub cache."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

from conftest import ROOT, write_json

VOCAB = 130528  # the real model's embedding rows (the tokenizer has 130,344 ids)
REMOTE_CODE = "raise RuntimeError('glmtune must not run the repository code')\n"


def thudm_chatglm6b(directory, shared_dir, hidden: int = 128):
    import torch

    from glmtune.models.chatglm6b.configuration import config_from_official
    from glmtune.models.chatglm6b.modeling import ChatGlm6bForCausalLM

    config = json.loads((shared_dir / "fixtures/chatglm/v1/config.json").read_text())
    config.update({"vocab_size": VOCAB, "hidden_size": hidden, "inner_hidden_size": 2 * hidden, "num_layers": 2,
                   "num_attention_heads": 4, "max_sequence_length": 2048, "bos_token_id": 130004,
                   "eos_token_id": 130005, "mask_token_id": 130000, "gmask_token_id": 130001, "pad_token_id": 3})
    torch.manual_seed(0)
    # Non-linear enough for LoRA to memorise a few answers (see the tiny demo model).
    model = ChatGlm6bForCausalLM(config_from_official({**config, "initializer_range": 1.3 / math.sqrt(hidden)}))
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    directory.mkdir(parents=True)
    names = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    for shard, keys in shards.items():
        torch.save({k: state[k] for k in keys}, directory / shard)
    index = {"metadata": {"total_size": sum(t.numel() * 4 for t in state.values())},
             "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    (directory / "config.json").write_text(json.dumps(config))
    for name in ("ice_text.model", "tokenizer_config.json"):
        shutil.copy(shared_dir / "tokenizers" / "chatglm-6b" / name, directory / name)
    for name in ("modeling_chatglm.py", "configuration_chatglm.py", "tokenization_chatglm.py"):
        (directory / name).write_text(REMOTE_CODE)
    return directory


def test_lora_through_prepare_train_infer(cli, tmp_path, shared_dir, demo_rows):
    model = thudm_chatglm6b(tmp_path / "chatglm-6b", shared_dir)
    # Every linear layer: the fused attention alone (the default) is too little for a model this small to learn.
    targets = "query_key_value,dense,dense_h_to_4h,dense_4h_to_h"
    rows = demo_rows[:8]
    data = write_json(tmp_path / "data.json", rows)
    assert cli("prepare", "--jsonl_path", data, "--save_path", tmp_path / "data", "--model", model).code == 0
    result = cli("train", "--dataset_path", tmp_path / "data", "--output_dir", tmp_path / "run", "--max_steps", "80",
                 "--per_device_train_batch_size", "8", "--learning_rate", "1e-2", "--lora_rank", "16",
                 "--lora_dropout", "0", "--logging_steps", "10", "--save_strategy", "no", "--target_modules", targets)
    assert result.code == 0, result.err
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["config"]["packing"] is False  # its attention comes from the ids: padded batches instead
    result = cli("infer", "--peft_path", tmp_path / "run", "--input", data, "--output", tmp_path / "out.jsonl",
                 "--max_new_tokens", "40")
    assert result.code == 0, result.err
    answers = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    exact = sum(a["response"] == a["output"] for a in answers)
    assert exact >= 6, [(a["output"], a["response"]) for a in answers]


def test_seed_scripts_on_their_default_model_from_the_hub_cache(tmp_path, shared_dir):
    """No --model anywhere: the seed's default THUDM/chatglm-6b, found in the local hub cache as a download
    leaves it."""
    hf_home = tmp_path / "hf"
    repo = hf_home / "hub" / "models--THUDM--chatglm-6b"
    thudm_chatglm6b(repo / "snapshots" / "0123456789abcdef", shared_dir)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123456789abcdef")
    write_json(tmp_path / "alpaca_data.json", [{"instruction": f"问题{i}", "input": "", "output": f"回答{i}"}
                                               for i in range(4)])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home)}

    def run(script: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)

    step1 = run("tokenize_dataset_rows.py", "--jsonl_path", "alpaca_data.json", "--save_path", "data/alpaca",
                "--max_seq_length", "512")
    assert step1.returncode == 0, step1.stderr
    step2 = run("finetune.py", "--dataset_path", "data/alpaca", "--lora_rank", "8", "--lora_alpha", "32",
                "--lora_dropout", "0.1", "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "1",
                "--max_steps", "2", "--save_steps", "1000", "--save_total_limit", "2", "--learning_rate", "2e-5",
                "--logging_steps", "50", "--output_dir", "output")
    assert step2.returncode == 0, step2.stderr
    manifest = json.loads((tmp_path / "output" / "manifest.json").read_text())
    assert manifest["base_model"] == "THUDM/chatglm-6b"
    adapter = json.loads((tmp_path / "output" / "adapter_config.json").read_text())
    assert adapter["target_modules"] == ["query_key_value"]  # the default for ChatGLM-6B
    step3 = run("infer.py", "--peft_path", "output", "--max_length", "512", "--temperature", "0",
                "--max_new_tokens", "4")
    assert step3.returncode == 0, step3.stderr
    # The seed's own four questions, in order, each answered (a string of at most 4 new tokens: any text).
    answers = [json.loads(line) for line in step3.stdout.splitlines()]
    assert [a["prompt"] for a in answers] == ["你能做什么呢？", "你是谁？", "可以写一首诗吗？", "你是谁开发的？"]
    assert all(isinstance(a["response"], str) for a in answers)
