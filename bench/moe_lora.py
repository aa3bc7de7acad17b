"""Expert LoRA on a tiny glm4_moe (8 routed experts, 2 active, one shared; first layer dense): attention-only LoRA
against the default glm4_moe adapter (attention + routed experts + shared experts + dense MLP), same data, steps
and seed. Each run is a fresh `glmtune train` process that reports its own peak RSS (VmHWM, read as it exits).

    .venv/bin/python bench/moe_lora.py [--steps 40] [--hidden 256] [--layers 4]

Prints a table: tokens per second (packed, non-pad), seconds per step, peak RSS, last logged loss, trainable
parameters. Also the experts implementation transformers picked for the model (grouped_mm: one grouped matmul
for all experts; eager: a loop over the experts a batch hits).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from glmtune.demo import demo_data_path

# `python -m glmtune ...` that prints its own peak RSS on exit: a parent's getrusage(RUSAGE_CHILDREN) is the largest
# of ALL its finished children, and a child's ru_maxrss counts what its parent held when it forked.
CHILD = ("import atexit, re, runpy, sys\n"
         "atexit.register(lambda: print('peak_kib', re.search(r'VmHWM:\\s+(\\d+)', "
         "open('/proc/self/status').read()).group(1), file=sys.stderr))\n"
         "sys.argv = ['glmtune', *sys.argv[1:]]\n"
         "runpy.run_module('glmtune', run_name='__main__')")
RUNS = {"attention only": ["--target_modules", "q_proj,k_proj,v_proj,o_proj"], "experts included (default)": []}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    from transformers import AutoConfig

    from glmtune.models.tiny import build_tiny_glm
    from glmtune.models.tiny_moe import build_tiny_glm4_moe

    tmp = Path(tempfile.mkdtemp(prefix="moe_lora_"))
    rows = json.loads(demo_data_path().read_text(encoding="utf-8"))
    texts = [row[k] for row in rows for k in ("instruction", "input", "output") if row[k]] * 4
    model = build_tiny_glm4_moe(tmp / "moe", build_tiny_glm(tmp / "glm", texts, hidden_size=64, num_layers=1),
                                hidden_size=args.hidden, num_layers=args.layers)
    print(f"experts implementation: {AutoConfig.from_pretrained(model)._experts_implementation or 'default'}")
    glmtune = [sys.executable, "-m", "glmtune"]
    subprocess.run([*glmtune, "prepare", "--jsonl_path", str(demo_data_path()), "--save_path", str(tmp / "data"),
                    "--model", str(model), "--quiet"], check=True)
    print(f"{'LoRA':<28} {'tokens/s':>9} {'s/step':>7} {'peak RSS':>9} {'loss':>6} {'trainable':>10}")
    for name, extra in RUNS.items():
        out = tmp / name.split()[0]
        start = time.perf_counter()
        log = subprocess.run([sys.executable, "-c", CHILD, "train", "--dataset_path", str(tmp / "data"),
                              "--output_dir", str(out),
                              "--max_steps", str(args.steps), "--per_device_train_batch_size", "8",
                              "--learning_rate", "3e-3", "--lora_dropout", "0", "--save_strategy", "no",
                              "--logging_steps", "5", "--seed", "1", "--precision", "fp32", *extra],
                             check=True, capture_output=True, text=True)
        elapsed = time.perf_counter() - start
        peak = int(log.stderr.rsplit("peak_kib ", 1)[1].split()[0])
        manifest = json.loads((out / "manifest.json").read_text())
        runtime = manifest.get("train_runtime") or elapsed
        tokens = _tokens(tmp / "data", args.steps)
        trainable = _trainable(log.stderr + log.stdout)
        print(f"{name:<28} {tokens / runtime:9.0f} {runtime / args.steps:7.3f} "
              f"{peak / 1024:7.0f} MB {manifest['last_logged_loss']:6.3f} {trainable:>10}")


def _trainable(log: str) -> str:
    import re

    found = re.findall(r"trainable params: ([\d,]+)", log)
    return found[-1] if found else "?"


def _tokens(data: Path, steps: int) -> int:
    """Non-pad tokens the run saw: the dataset's tokens per epoch, times the epochs the steps cover."""
    from datasets import load_from_disk

    train = load_from_disk(str(data))["train"]
    per_epoch = sum(len(ids) for ids in train["input_ids"])
    return int(per_epoch * steps * 8 / len(train))


if __name__ == "__main__":
    main()
