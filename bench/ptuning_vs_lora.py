"""P-Tuning v2 against LoRA on AdvertiseGen-style rows (../shared/data/advertisegen: content -> summary, Chinese
ad copy), same tiny GLM, same data, steps, batch and seed; each method at its own default learning rate (P-Tuning
v2: THUDM's 2e-2; LoRA: glmtune's 2e-4, r8 on every linear layer). The prefix is --pre_seq_len 32 (THUDM's 128
would be longer than most of these samples on a model this small), without projection, as THUDM's recipe.

    .venv/bin/python bench/ptuning_vs_lora.py [--steps 60] [--rounds 2] [--hidden 256] [--layers 4]

Each training is a fresh `glmtune train` process that reports its own peak RSS (VmHWM, read as it exits); the two
methods alternate, round after round, so that the machine's load falls on both alike. Then `glmtune eval` scores
each method's first-round output (greedy answers, BLEU-4 and ROUGE-1/2/L on jieba words, as THUDM's ptuning scripts
compute them) on the training rows (what a tiny model can learn: memorisation) and on the held-out dev rows.

Prints the load average, a table per round and the medians: tokens/s (non-pad tokens seen / train_runtime), peak
RSS, last logged loss, trainable parameters, and the scores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# `python -m glmtune ...` that prints its own peak RSS on exit (bench/moe_lora.py says why not getrusage).
CHILD = ("import atexit, re, runpy, sys\n"
         "atexit.register(lambda: print('peak_kib', re.search(r'VmHWM:\\s+(\\d+)', "
         "open('/proc/self/status').read()).group(1), file=sys.stderr))\n"
         "sys.argv = ['glmtune', *sys.argv[1:]]\n"
         "runpy.run_module('glmtune', run_name='__main__')")
PRE_SEQ_LEN = 32
METHODS = {"P-Tuning v2": ["--finetuning_type", "ptuning", "--pre_seq_len", str(PRE_SEQ_LEN)],
           "LoRA": ["--finetuning_type", "lora", "--lora_dropout", "0"]}
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "advertisegen"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    from glmtune.models.tiny import build_tiny_glm

    train_file, dev_file = args.data / "train_sample.jsonl", args.data / "dev_sample.jsonl"
    rows = [json.loads(line) for f in (train_file, dev_file) for line in f.read_text(encoding="utf-8").splitlines()]
    tmp = Path(tempfile.mkdtemp(prefix="ptuning_vs_lora_"))
    model = build_tiny_glm(tmp / "model", [r["content"] + r["summary"] for r in rows] * 4,
                           hidden_size=args.hidden, num_layers=args.layers)
    glmtune = [sys.executable, "-m", "glmtune"]
    subprocess.run([*glmtune, "prepare", "--jsonl_path", str(train_file), "--save_path", str(tmp / "data"),
                    "--model", str(model), "--quiet"], check=True, capture_output=True)
    tokens = _tokens(tmp / "data", args.steps, args.batch)
    print(f"load average at start: {os.getloadavg()[0]:.2f}; {args.steps} steps x {args.batch} rows, "
          f"{tokens} tokens; tiny GLM hidden {args.hidden}, {args.layers} layers")
    results: dict[str, list[dict]] = {name: [] for name in METHODS}
    for round_ in range(args.rounds):
        for name, extra in METHODS.items():
            out = tmp / f"{name.split()[0].lower()}-{round_}"
            log = subprocess.run([sys.executable, "-c", CHILD, "train", "--dataset_path", str(tmp / "data"),
                                  "--output_dir", str(out), "--max_steps", str(args.steps),
                                  "--per_device_train_batch_size", str(args.batch), "--save_strategy", "no",
                                  "--logging_steps", "5", "--seed", "1", "--precision", "fp32", *extra],
                                 check=True, capture_output=True, text=True)
            manifest = json.loads((out / "manifest.json").read_text())
            results[name].append({"out": out, "tokens_s": tokens / manifest["train_runtime"],
                                  "peak_mb": int(log.stderr.rsplit("peak_kib ", 1)[1].split()[0]) / 1024,
                                  "loss": manifest["last_logged_loss"], "trainable": _trainable(log.stderr)})
            r = results[name][-1]
            print(f"round {round_ + 1}  {name:<12} {r['tokens_s']:8.0f} tokens/s {r['peak_mb']:7.0f} MB peak RSS  "
                  f"loss {r['loss']:.3f}  trainable {r['trainable']}", flush=True)
    print(f"\nload average at the end of training: {os.getloadavg()[0]:.2f}")
    header = (f"{'method':<12} {'tokens/s':>9} {'peak RSS':>9} {'loss':>6} {'trainable':>10}  "
              f"{'train BLEU-4':>12} {'ROUGE-1':>7} {'ROUGE-L':>7}  {'dev BLEU-4':>10} {'ROUGE-1':>7} {'ROUGE-L':>7}")
    lines = [header]
    for name, runs in results.items():
        scores = [_scores(glmtune, runs[0]["out"], f, tmp / f"eval-{name.split()[0]}-{f.stem}", args.max_new_tokens)
                  for f in (train_file, dev_file)]
        cells = "  ".join(f"{s['bleu-4']:12.1f} {s['rouge-1']:7.1f} {s['rouge-l']:7.1f}" for s in scores)
        lines.append(f"{name:<12} {statistics.median(r['tokens_s'] for r in runs):9.0f} "
                     f"{statistics.median(r['peak_mb'] for r in runs):6.0f} MB "
                     f"{statistics.median(r['loss'] for r in runs):6.3f} {runs[0]['trainable']:>10}  {cells}")
    ratio = (statistics.median(r["tokens_s"] for r in results["LoRA"])
             / statistics.median(r["tokens_s"] for r in results["P-Tuning v2"]))
    print(f"\nmedians over {args.rounds} rounds (scores: round 1's outputs, greedy, "
          f"--max_new_tokens {args.max_new_tokens}):")
    print("\n".join(lines))
    print(f"LoRA / P-Tuning v2 tokens/s: {ratio:.2f}x")


def _scores(glmtune: list[str], run: Path, data: Path, out: Path, max_new_tokens: int) -> dict[str, float]:
    subprocess.run([*glmtune, "eval", "--peft_path", str(run), "--dataset", str(data), "--output_dir", str(out),
                    "--max_new_tokens", str(max_new_tokens), "--batch_size", "8", "--quiet"],
                   check=True, capture_output=True)
    return json.loads((out / "metrics.json").read_text())["metrics"]


def _trainable(log: str) -> str:
    import re

    found = re.findall(r"trainable params: ([\d,]+)", log)
    return found[-1] if found else "?"


def _tokens(data: Path, steps: int, batch: int) -> int:
    """Non-pad tokens the run saw: the dataset's tokens per epoch, times the epochs the steps cover."""
    from datasets import load_from_disk

    train = load_from_disk(str(data))["train"]
    return int(sum(len(ids) for ids in train["input_ids"]) * steps * batch / len(train))


if __name__ == "__main__":
    main()
