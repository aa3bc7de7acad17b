"""Quantized LoRA training (`glmtune train --quantization_bit 8 / 4`) against fp32 and bf16 in the same run, on a tiny
random GLM, each with an evaluation before training and one in the middle (the evaluation that used to break 4-bit
training on CPUs with AVX512-BF16).

    .venv/bin/python bench/quantization_gpu_check.py [DATA.json] [--steps 40] [--hidden 512] [--layers 4]
    .venv/bin/python bench/quantization_gpu_check.py --device-agnostic   # no GPU: the same runs on the CPU

DATA.json: rows `glmtune prepare` reads (default: the demo's finance Q&A). Each configuration trains in its own
process (a clean peak-memory count), through the CLI, and the table shows: training steps per second (evaluation
time left out), peak memory (CUDA: torch.cuda.max_memory_allocated; CPU: the process's peak RSS), the evaluation
loss before and after, the last logged training loss, and the 4-bit layers left in full precision. A configuration
that fails prints its last lines and the script goes on; the exit status is 1 if any failed. On a CPU the
evaluation loss comes from the log only when the Trainer prints it (it does: --logging_steps 1).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Runs in each child process: train through the CLI, timing the evaluations inside training apart.
CHILD = r"""
import json, resource, sys, time
import torch, transformers
from glmtune.cli import main

evals, inside = [], [False]
train, evaluate = transformers.Trainer.train, transformers.Trainer.evaluate

def timed_train(self, *a, **k):
    inside[0] = True
    start = time.perf_counter()
    try:
        return train(self, *a, **k)
    finally:
        inside[0] = False
        evals.append(("train", time.perf_counter() - start))

def timed_evaluate(self, *a, **k):
    start = time.perf_counter()
    result = evaluate(self, *a, **k)
    if inside[0]:
        evals.append(("eval", time.perf_counter() - start))
    return result

transformers.Trainer.train, transformers.Trainer.evaluate = timed_train, timed_evaluate
if torch.cuda.is_available():
    torch.cuda.reset_peak_memory_stats()
code = main(["train", *sys.argv[1:]])
peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
train_s = sum(s for kind, s in evals if kind == "train")
eval_s = sum(s for kind, s in evals if kind == "eval")
print("BENCH " + json.dumps({"code": code, "peak": peak, "train_s": train_s, "eval_s": eval_s,
                             "evals": sum(kind == "eval" for kind, _ in evals)}))
"""


def run(argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="?", default=None, help="JSON file of rows (default: the demo data)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 40 on GPU, 8 on CPU)")
    parser.add_argument("--hidden", type=int, default=None, help="hidden size (default 512 on GPU, 256 on CPU)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device-agnostic", action="store_true", help="run on the CPU when there is no GPU")
    parser.add_argument("--timeout", type=float, default=240, help="seconds per configuration")
    args = parser.parse_args()

    import torch

    from glmtune.demo import demo_data_path
    from glmtune.models.tiny import build_tiny_glm

    cuda = torch.cuda.is_available()
    if not cuda and not args.device_agnostic:
        print("no CUDA GPU here; pass --device-agnostic to run the same comparison on the CPU", file=sys.stderr)
        return 2
    steps = args.steps or (40 if cuda else 8)
    hidden = args.hidden or (512 if cuda else 256)
    device = torch.cuda.get_device_name() if cuda else "CPU"
    data = Path(args.data) if args.data else demo_data_path()
    rows = json.loads(data.read_text(encoding="utf-8"))
    texts = [str(v) for row in rows for v in (row.values() if isinstance(row, dict) else [row]) if v] * 4

    work = Path(tempfile.mkdtemp(prefix="glmtune-quant-bench-"))
    start = time.perf_counter()
    model = build_tiny_glm(work / "model", texts, hidden_size=hidden, num_layers=args.layers)
    prepared = run([sys.executable, "-m", "glmtune", "prepare", "--model", str(model), "--jsonl_path", str(data),
                    "--save_path", str(work / "data"), "--val_size", "8", "--max_seq_length", "256"], args.timeout)
    if prepared.returncode != 0:
        print(prepared.stdout[-3000:], prepared.stderr[-3000:], sep="\n")
        return 1
    print(f"{device}: tiny GLM hidden {hidden}, {args.layers} layers; {steps} steps of batch {args.batch}, "
          f"data {data.name} (setup {time.perf_counter() - start:.0f} s)")

    configs = [("fp32", ["--precision", "fp32"])]
    if cuda and torch.cuda.is_bf16_supported():
        configs.append(("bf16", ["--precision", "bf16"]))
    configs += [("8-bit", ["--quantization_bit", "8"]), ("4-bit", ["--quantization_bit", "4"])]
    common = ["--dataset_path", str(work / "data"), "--max_steps", str(steps), "--per_device_train_batch_size",
              str(args.batch), "--learning_rate", "2e-3", "--logging_steps", "1", "--save_strategy", "no",
              "--eval_on_start", "true", "--eval_strategy", "steps", "--eval_steps", str(max(1, steps // 2)),
              "--seed", "0"]
    results, failed = [], False
    for name, flags in configs:
        out = work / f"run-{name}"
        done = run([sys.executable, "-c", CHILD, *common, *flags, "--output_dir", str(out)], args.timeout)
        line = next((x for x in done.stdout.splitlines() if x.startswith("BENCH ")), None)
        measured = json.loads(line[6:]) if line else None
        if done.returncode != 0 or not measured or measured["code"] not in (0, None):
            failed = True
            print(f"\n{name}: FAILED (exit {done.returncode})\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
            continue
        manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
        history = [float(x) for x in _eval_losses(done.stdout)]
        results.append({
            "name": name, "precision": manifest["config"]["precision"],
            "steps_per_s": manifest["global_step"] / max(1e-9, measured["train_s"] - measured["eval_s"]),
            "peak_gib": measured["peak"] / 2**30, "eval_first": history[0] if history else None,
            "eval_last": manifest.get("eval_loss"), "loss": manifest.get("last_logged_loss"),
            "evals": measured["evals"]})

    memory = "peak CUDA memory" if cuda else "peak RSS"
    header = f"| config | compute | steps/s | vs fp32 | {memory} GiB | eval loss before -> after | last loss | evals |"
    print("\n" + header + "\n|" + "---|" * (header.count("|") - 1))
    base = next((r for r in results if r["name"] == "fp32"), None)
    for r in results:
        ratio = f"{r['steps_per_s'] / base['steps_per_s']:.2f}x" if base else "-"
        before = f"{r['eval_first']:.3f}" if r["eval_first"] is not None else "-"
        print(f"| {r['name']} | {r['precision']} | {r['steps_per_s']:.2f} | {ratio} | {r['peak_gib']:.3f} | "
              f"{before} -> {r['eval_last']:.3f} | {r['loss']:.3f} | {r['evals']} |")
    print(f"\ntotal {time.perf_counter() - start:.0f} s; runs kept in {work}")
    return 1 if failed else 0


def _eval_losses(stdout: str) -> list[str]:
    """The eval_loss values the Trainer logged, in order ({'eval_loss': '7.964', ...} lines)."""
    import re

    return re.findall(r"'eval_loss': '?([0-9.]+)", stdout)


if __name__ == "__main__":
    raise SystemExit(main())
