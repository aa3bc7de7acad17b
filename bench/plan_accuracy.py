"""How close `glmtune plan`'s estimate is to the peak RSS of real LoRA training runs on CPU.

    .venv/bin/python bench/plan_accuracy.py

Each configuration runs in a fresh subprocess (so its peak RSS is its own): a randomly initialised GlmForCausalLM,
peft LoRA with glmtune's defaults (r 8, dropout 0.1, every linear layer), AdamW, a few steps over random tokens,
the loss computed as `glmtune train` computes it (chunked from the final hidden states, or transformers' own).
The peak is the process's VmHWM; the estimate is glmtune.plan's for the same config.json and settings.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from glmtune.plan.memory import GIB, Setup, estimate
from glmtune.plan.shape import resolve_targets, shape_from_config

STEPS = 2  # AdamW's states appear at the first step: the later steps run with everything allocated

# (name, model dims, batch, seq, gradient checkpointing, chunked loss)
CONFIGS = [
    ("55M, 4 x 512", dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                          num_key_value_heads=2, vocab_size=32000), 4, 512, False, True),
    ("55M, 2 x 1024, ckpt", dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                                 num_attention_heads=8, num_key_value_heads=2, vocab_size=32000), 2, 1024, True, True),
    ("30M, 1 x 256", dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                          num_key_value_heads=2, vocab_size=32000), 1, 256, False, True),
    ("80M GLM-4 vocab, 4 x 1024", dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                                       num_attention_heads=8, num_key_value_heads=2, vocab_size=151552),
     4, 1024, False, True),
    ("80M GLM-4 vocab, 1 x 1024, plain loss", dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                                                   num_attention_heads=8, num_key_value_heads=2, vocab_size=151552),
     1, 1024, False, False),
]


def worker(config_path: str, batch: int, seq: int, checkpointing: bool, chunked: bool) -> None:
    """One training run; prints the peak RSS (GiB) as JSON. Imports torch only here, in the subprocess."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GlmConfig, GlmForCausalLM

    from glmtune.models.lora import resolve_target_modules
    from glmtune.train.loss import chunked_causal_lm_loss

    torch.manual_seed(0)
    model = GlmForCausalLM(GlmConfig(**json.loads(Path(config_path).read_text())))
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=32, lora_dropout=0.1,
                                             target_modules=resolve_target_modules("glm", None)))
    if checkpointing:  # what the Trainer does for --gradient_checkpointing with a peft model
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab = model.config.vocab_size
    for _ in range(STEPS):
        ids = torch.randint(0, vocab, (batch, seq))
        if chunked:
            outputs = model(input_ids=ids, output_hidden_states=True, logits_to_keep=1, use_cache=False)
            loss = chunked_causal_lm_loss(outputs.hidden_states[-1], model.get_output_embeddings(), ids)
            del outputs
        else:  # the Trainer keeps only the loss of transformers' own: the logits are freed before backward
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    print(json.dumps({"peak_gib": _vm_hwm_kib() / 1024**2}))


def _vm_hwm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, dims, batch, seq, checkpointing, chunked in CONFIGS:
            config = {"model_type": "glm", "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 1,
                      "head_dim": dims["hidden_size"] // dims["num_attention_heads"], **dims}
            path = Path(tmp) / "config.json"
            path.write_text(json.dumps(config))
            shape = shape_from_config(config)
            setup = Setup(seq, batch, 8, tuple(resolve_targets(shape, None)), checkpointing, chunked_loss=chunked)
            planned = estimate(shape, setup)
            result = subprocess.run([sys.executable, __file__, "--worker", str(path), str(batch), str(seq),
                                     str(int(checkpointing)), str(int(chunked))],
                                    capture_output=True, text=True)
            if result.returncode:
                sys.exit(f"{name}: the training run failed:\n{result.stderr[-3000:]}")
            measured = json.loads(result.stdout.strip().splitlines()[-1])["peak_gib"]
            est = planned.total / GIB
            rows.append((name, planned.parameters, est, measured))
            print(f"  {name}: estimate {est:.2f} GiB, measured {measured:.2f} GiB", file=sys.stderr)
    print(f"\nmachine: {os.cpu_count()}-core CPU, {platform.machine()}, torch threads default; "
          f"LoRA r8 all-linear, dropout 0.1, fp32, sdpa, AdamW, {STEPS} steps\n")
    print("| config | params | estimate GiB | measured peak RSS GiB | error |")
    print("|---|---|---|---|---|")
    for name, params, est, measured in rows:
        error = 100 * (est - measured) / measured
        print(f"| {name} | {params / 1e6:.0f}M | {est:.2f} | {measured:.2f} | {error:+.0f}% |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), bool(int(sys.argv[5])), bool(int(sys.argv[6])))
    else:
        main()
