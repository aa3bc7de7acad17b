"""glmtune train against the plain baseline, in the same run, on the same model, data and hyper-parameters.

The baseline is what a user writes without glmtune: transformers' Trainer + PEFT LoRA, batches padded to the
longest sample, the model's own loss, fp32. glmtune runs `glmtune train` with its defaults (packing, the chunked
loss, the automatic precision). Each run is a fresh process, so its peak RSS is its own.

Two scenarios (the targets of issue 6):
- speed: a GLM of ~15M parameters (hidden 384, 6 layers, a BPE vocabulary of 8,000 trained on the data) on the
  first ROWS rows of ../shared/data/alpaca/alpaca_zh_demo.json at --max_seq_length 512, one epoch, batch 8.
- memory: 10 steps at batch 4 x 1,024 tokens of a tiny GLM with GLM-4's real tokenizer (151,552 ids).

    .venv/bin/python bench/train_speed.py [--scenario speed|memory|both] [--rows 256]

Prints a table: real (non-pad) and supervised tokens per second, seconds per step, peak RSS, final loss (mean of
the last five logged), and MFU: the FLOPs the pass needs (glmtune.train.flops.lora_step_flops: the
frozen layers forward and their input gradients, LoRA's products, causal attention, the output layer on supervised
tokens) per second, over this machine's matmul rate in the run's precision, measured here first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # step_profile, beside this file
SHARED = ROOT.parent / "shared"  # --shared overrides (a GPU machine gets the data beside the checkout)
LORA = {"r": 8, "alpha": 32, "dropout": 0.0}

BASELINE = """
import json, resource, sys
from datasets import load_from_disk
from peft import LoraConfig, get_peft_model
from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments,
                          set_seed)
model_dir, data_dir, out, batch, epochs, max_steps, lr, r, alpha, targets = sys.argv[1:11]
set_seed(0)
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir)  # fp32
model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=int(r), lora_alpha=float(alpha), lora_dropout=0.0,
                                         target_modules=targets.split(",")))
args = TrainingArguments(output_dir=out, per_device_train_batch_size=int(batch), num_train_epochs=float(epochs),
                         max_steps=int(max_steps), learning_rate=float(lr), logging_steps=1, save_strategy="no",
                         report_to="none", remove_unused_columns=False, seed=0, dataloader_pin_memory=False)
trainer = Trainer(model=model, args=args, train_dataset=load_from_disk(data_dir)["train"],
                  data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
result = trainer.train()
losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
import torch
gpu = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
print(json.dumps({"runtime": result.metrics["train_runtime"], "steps": trainer.state.global_step,
                  "losses": losses, "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "gpu_peak_gib": gpu}))
"""

GLMTUNE = """
import json, resource, sys
import torch
from glmtune.cli import main
out = sys.argv[1]
code = main(["train", *sys.argv[2:]])
manifest = json.load(open(out + "/manifest.json"))
gpu = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
print(json.dumps({"code": code, "runtime": manifest["train_runtime"], "steps": manifest["global_step"],
                  "config": {k: manifest["config"][k] for k in ("packing", "chunked_loss", "precision")},
                  "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "gpu_peak_gib": gpu}))
"""


def run_child(code: str, *args: object) -> tuple[dict, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"a child run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stdout


def matmul_peak_gflops(precision: str | None = None) -> tuple[float, str]:
    """The machine's measured matmul rate, GFLOP/s, in `precision` ("fp32" or "bf16"; default: fp32 on the CPU,
    bf16 on a GPU, what glmtune trains in there): the best of 5 square products of 2048 (8192 on a GPU)."""
    import torch

    cuda = torch.cuda.is_available()
    precision = precision or ("bf16" if cuda else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    n, device = (8192, "cuda") if cuda else (2048, "cpu")
    label = f"{torch.cuda.get_device_name()} {precision}" if cuda else precision
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(5):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9, label


def run_flops(model_dir: Path, data_dir: Path, rows: int | None = None, lora_rank: int = LORA["r"],
              targets: str = "q_proj,k_proj,v_proj,o_proj,gate_up_proj,down_proj") -> float:
    """The FLOPs one pass of LoRA training over the prepared split needs (glmtune.train.flops.lora_step_flops):
    the same count for every run of a comparison, whatever each computes besides."""
    from datasets import load_from_disk

    from glmtune.train.flops import ModelShape, lora_step_flops

    config = json.loads((Path(model_dir) / "config.json").read_text())
    train = load_from_disk(str(data_dir))["train"]
    if rows is not None:
        train = train.select(range(min(rows, len(train))))
    lengths = [len(ids) for ids in train["input_ids"]]
    supervised = sum(sum(label != -100 for label in row[1:]) for row in train["labels"])
    return lora_step_flops(ModelShape.from_config(config), sum(lengths), supervised, sum(n * n for n in lengths),
                           lora_rank, targets.split(","))


def dataset_tokens(data_dir: Path, rows: int | None = None) -> tuple[int, int]:
    """(real tokens, supervised tokens) of one pass over the prepared training split."""
    from datasets import load_from_disk

    train = load_from_disk(str(data_dir))["train"]
    if rows is not None:
        train = train.select(range(min(rows, len(train))))
    ids, labels = train["input_ids"], train["labels"]
    return sum(map(len, ids)), sum(sum(label != -100 for label in row[1:]) for row in labels)


def glmtune_losses(stdout: str) -> list[float]:
    return [float(json.loads(line.replace("'", '"'))["loss"]) for line in stdout.splitlines()
            if line.startswith("{'loss'")]


def scenario_speed(tmp: Path, rows: int, hidden_size: int = 384, num_layers: int = 6) -> list[dict]:
    model, data = build_speed_inputs(tmp, rows, hidden_size, num_layers)
    return _compare(tmp, model, data, _count(model), batch=8, epochs=1, max_steps=-1, lr=1e-3, label="speed")


def build_speed_inputs(tmp: Path, rows: int, hidden_size: int = 384, num_layers: int = 6) -> tuple[Path, Path]:
    """The speed scenario's model (a GLM with a BPE vocabulary of 8,000 trained on the rows) and prepared data."""
    from glmtune.cli import main
    from glmtune.models.tiny import build_tiny_glm

    source = json.loads((SHARED / "data/alpaca/alpaca_zh_demo.json").read_text(encoding="utf-8"))[:rows]
    texts = [r[k] for r in source for k in ("instruction", "input", "output") if r[k]]
    model = build_tiny_glm(tmp / "model", texts, hidden_size=hidden_size, num_layers=num_layers, vocab_size=8000)
    (tmp / "rows.json").write_text(json.dumps(source, ensure_ascii=False), encoding="utf-8")
    assert main(["prepare", "--jsonl_path", str(tmp / "rows.json"), "--save_path", str(tmp / "data"), "--model",
                 str(model), "--max_seq_length", "512"]) == 0
    return model, tmp / "data"


def scenario_memory(tmp: Path) -> list[dict]:
    from glmtune.cli import main
    from glmtune.models.loading import load_tokenizer

    tokenizer = load_tokenizer(str(SHARED / "tokenizers" / "glm-4-9b-chat"))
    model = _tiny_model_for(tokenizer, tmp / "model-151k")
    # Samples of exactly 1,024 tokens: alpaca texts joined, as plain text rows.
    text = "\n".join(r["output"] for r in json.loads((SHARED / "data/alpaca/alpaca_zh_demo.json").read_text()))
    ids = tokenizer.encode(text, add_special_tokens=False)
    rows = [{"text": tokenizer.decode(ids[i * 1000:(i + 1) * 1000])} for i in range(40)]
    (tmp / "long.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    assert main(["prepare", "--jsonl_path", str(tmp / "long.json"), "--save_path", str(tmp / "long"), "--model",
                 str(model), "--max_seq_length", "1024", "--truncation", "right"]) == 0
    return _compare(tmp, model, tmp / "long", _count(model), batch=4, epochs=1, max_steps=10, lr=1e-3, label="memory")


def _tiny_model_for(tokenizer, directory: Path) -> Path:
    import torch
    from transformers import GenerationConfig, GlmConfig, GlmForCausalLM

    config = GlmConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=32, pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = GlmForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _count(model_dir: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return sum(_prod(f.get_slice(k).get_shape()) for k in f.keys())


def _prod(shape: list[int]) -> int:
    out = 1
    for n in shape:
        out *= n
    return out


def _describe(run: dict) -> str:
    return f"glmtune ({', '.join(f'{k} {v}' for k, v in run['config'].items())})"


EXTRA_GLMTUNE_RUNS: list[str] = []
REPEAT = 1


def _compare(tmp: Path, model: Path, data: Path, params: int, batch: int, epochs: int, max_steps: int, lr: float,
             label: str) -> list[dict]:
    targets = "q_proj,k_proj,v_proj,o_proj,gate_up_proj,down_proj"
    steps_rows = None if max_steps < 0 else max_steps * batch
    real, supervised = dataset_tokens(data, steps_rows)
    flops = run_flops(model, data, steps_rows)
    ours_args = ["--dataset_path", data, "--per_device_train_batch_size", batch, "--num_train_epochs", epochs,
                 "--max_steps", max_steps, "--learning_rate", lr, "--lora_rank", LORA["r"], "--lora_alpha",
                 LORA["alpha"], "--lora_dropout", "0", "--logging_steps", "1", "--save_strategy", "no", "--seed", "0",
                 "--target_modules", targets]

    def baseline() -> dict:
        run, _ = run_child(BASELINE, model, data, tmp / f"{label}-baseline", batch, epochs, max_steps, lr,
                           LORA["r"], LORA["alpha"], targets)
        return run

    def glmtune(*extra: str) -> Callable[[], dict]:
        def one() -> dict:
            out = tmp / f"{label}-glmtune-{len(extra)}"
            run, stdout = run_child(GLMTUNE, out, *ours_args, "--output_dir", out, "--overwrite_output_dir", "true",
                                    *extra)
            run["losses"] = glmtune_losses(stdout)
            return run
        return one

    runners = [baseline, glmtune()] + [glmtune(*extra.split()) for extra in EXTRA_GLMTUNE_RUNS]
    # Interleaved rounds: a shared machine's slow spells (other tenants; CPU steal) hit every run alike, and the
    # median of each run's times is compared.
    rounds = [[_with_steal(runner) for runner in runners] for _ in range(REPEAT)]
    out = []
    for i, runner in enumerate(runners):
        runs = [r[i] for r in rounds]
        first = runs[0]
        name = "baseline (Trainer + PEFT, padded, plain loss, fp32)" if runner is baseline else _describe(first)
        last = first["losses"][-5:]
        out.append({"scenario": label, "run": name, "params": params, "steps": first["steps"],
                    "seconds": statistics.median(r["runtime"] for r in runs),
                    "all_seconds": [round(r["runtime"], 1) for r in runs],
                    "steal": max(r["steal"] for r in runs), "real_tokens": real, "supervised_tokens": supervised,
                    "flops": flops, "precision": "fp32" if runner is baseline else first["config"]["precision"],
                    "peak_gib": max(r["peak_gib"] for r in runs),
                    "gpu_peak_gib": first.get("gpu_peak_gib"),
                    "final_loss": sum(last) / len(last) if last else float("nan")})
    return out


def _with_steal(runner: Callable[[], dict]) -> dict:
    """The run, with the share of the machine's CPU time the hypervisor gave to others meanwhile (/proc/stat)."""
    before = _cpu_jiffies()
    run = runner()
    after = _cpu_jiffies()
    total = sum(after) - sum(before)
    run["steal"] = (after[7] - before[7]) / total if len(after) > 7 and total else 0.0
    return run


def _cpu_jiffies() -> list[int]:
    stat = Path("/proc/stat")
    if not stat.is_file():
        return []
    return [int(v) for v in stat.read_text().splitlines()[0].split()[1:]]


def profile_speed_step(rows: int, hidden_size: int, num_layers: int) -> None:
    """Print what a glmtune step of the speed scenario is made of, in fp32 and in bf16."""
    from step_profile import print_profile, profile_glmtune_steps

    targets = "q_proj,k_proj,v_proj,o_proj,gate_up_proj,down_proj"
    with tempfile.TemporaryDirectory(prefix="glmtune-profile-") as tmp:
        model, data = build_speed_inputs(Path(tmp), rows, hidden_size, num_layers)
        for precision in ("fp32", "bf16"):
            out = Path(tmp) / f"out-{precision}"
            profile = profile_glmtune_steps(
                ["--dataset_path", str(data), "--per_device_train_batch_size", "8", "--learning_rate", "1e-3",
                 "--lora_rank", str(LORA["r"]), "--lora_alpha", str(LORA["alpha"]), "--lora_dropout", "0",
                 "--save_strategy", "no", "--seed", "0", "--target_modules", targets, "--output_dir", str(out),
                 "--precision", precision, "--quiet"], LORA["r"], 8000)
            print_profile(f"{precision}, load average {os.getloadavg()[0]:.1f}", profile)


def main() -> None:
    from glmtune.train.flops import mfu

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=["speed", "memory", "both"], default="both")
    parser.add_argument("--rows", type=int, default=256, help="alpaca rows for the speed scenario")
    parser.add_argument("--hidden_size", type=int, default=384, help="the speed scenario's GLM width")
    parser.add_argument("--num_layers", type=int, default=6, help="the speed scenario's GLM depth")
    parser.add_argument("--shared", type=Path, default=None, help="the shared data folder (default ../shared)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of runs, interleaved; the median of each run's times is compared")
    parser.add_argument("--profile", action="store_true",
                        help="instead of the comparison: what one glmtune step of the speed scenario is made of, "
                             "fp32 and bf16 (torch.profiler; bench/step_profile.py)")
    parser.add_argument("--also", action="append", default=[],
                        help="glmtune again with these extra flags, e.g. --also '--precision fp32' (repeatable)")
    args = parser.parse_args()
    global SHARED
    SHARED = args.shared or SHARED
    EXTRA_GLMTUNE_RUNS.extend(args.also)
    global REPEAT
    REPEAT = args.repeat
    if args.profile:
        profile_speed_step(args.rows, args.hidden_size, args.num_layers)
        return
    peaks = {precision: matmul_peak_gflops(precision)[0] for precision in ("fp32", "bf16")}
    results = []
    with tempfile.TemporaryDirectory(prefix="glmtune-bench-") as tmp:
        if args.scenario in ("speed", "both"):
            results += scenario_speed(Path(tmp), args.rows, args.hidden_size, args.num_layers)
        if args.scenario in ("memory", "both"):
            results += scenario_memory(Path(tmp))
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    print(f"\nmachine: {cpu}, {os.cpu_count()} cores; matmul rate measured here (2048^2): fp32 {peaks['fp32']:.0f}, "
          f"bf16 {peaks['bf16']:.0f} GFLOP/s; load average {os.getloadavg()[0]:.1f}")
    print("| scenario | run | s/step | real tok/s | supervised tok/s | peak RSS GiB | peak GPU GiB | final loss | "
          "MFU (its precision) | train s, each round | CPU steal |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        tps = r["real_tokens"] / r["seconds"]
        utilisation = mfu(r["flops"], r["seconds"], peaks.get(r["precision"], peaks["fp32"]) * 1e9)
        print(f"| {r['scenario']} | {r['run']} | {r['seconds'] / r['steps']:.2f} | {tps:.0f} | "
              f"{r['supervised_tokens'] / r['seconds']:.0f} | {r['peak_gib']:.2f} | "
              f"{'-' if r['gpu_peak_gib'] is None else format(r['gpu_peak_gib'], '.2f')} | {r['final_loss']:.3f} | "
              f"{utilisation:.1%} | {', '.join(map(str, r['all_seconds']))} | {r['steal']:.0%} |")
    for scenario in sorted({r["scenario"] for r in results}):
        base, ours = [r for r in results if r["scenario"] == scenario][:2]
        print(f"{scenario}: glmtune {base['seconds'] / ours['seconds']:.2f}x the baseline's throughput, "
              f"{ours['peak_gib'] / base['peak_gib']:.2f}x its peak memory, final loss "
              f"{100 * (ours['final_loss'] - base['final_loss']) / base['final_loss']:+.1f}%")


if __name__ == "__main__":
    main()
