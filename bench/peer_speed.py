"""glmtune against LLaMA-Factory 0.9.5 and the plain Trainer + PEFT baseline: the same model, data and settings.

LLaMA-Factory is installed once in its own virtual environment (bench/peer/install.py; its pins differ from
glmtune's). Every run is a fresh process and trains one epoch; the runs go in interleaved rounds, so a shared
machine's slow spells hit each alike, and each run's median is compared.

Runs (--only picks some):
- baseline: transformers' Trainer + PEFT LoRA, padded batches, fp32 (bench/train_speed.py's BASELINE)
- glmtune: `glmtune train` with its defaults (packing, the chunked loss), at the round's precision
- lf-padded: LLaMA-Factory, padded batches, gradient checkpointing off
- lf-neat: LLaMA-Factory, `packing: true, neat_packing: true`, gradient checkpointing off
- lf-defaults: LLaMA-Factory's defaults (padded, gradient checkpointing on)

glmtune and LLaMA-Factory run at fp32 and, where the CPU has bf16 units, at bf16 (--precision); the baseline is
the fp32 reference of both. Scenarios:
- speed: bench/train_speed.py's GLM (hidden 384, 6 layers, a BPE vocabulary of 8,000 trained on the data) on the
  first ROWS rows of alpaca_zh_demo.json, length 512, batch 8, LoRA r8 on every linear layer, one epoch.
- memory: train_speed.py's tiny GLM with GLM-4's real tokenizer (151,552 ids), 10 steps of batch 4 x 1,024-token
  samples (an instruction and a long answer), for the peak memory.

    .venv/bin/python bench/peer_speed.py [--scenario speed|memory|both] [--rows 256] [--rounds 2]
                                         [--precision fp32|bf16|both] [--only glmtune,lf-neat] [--markdown FILE]

Reported per run: train seconds per epoch (the Trainer's train_runtime; each round and the median), the real
(non-padding) tokens it trained on and their rate, peak memory (RSS of the run's process tree), the final loss
(mean of the last five logged), the fraction of the machine's matmul rate at the run's precision that
4 x parameters x real tokens per second makes, and the ratios against the baseline and LLaMA-Factory's packed run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import train_speed
from peer.install import DEFAULT_HOME, ensure_llamafactory
from peer.measure import run_measured

ROOT = Path(__file__).resolve().parents[1]
LF_CHILD = Path(__file__).resolve().parent / "peer" / "lf_child.py"
TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_up_proj,down_proj"  # every linear layer of GlmForCausalLM but lm_head
RUNS = ("baseline", "glmtune", "lf-padded", "lf-neat", "lf-defaults")
LABELS = {
    "baseline": "plain Trainer + PEFT, padded (baseline)",
    "glmtune": "glmtune defaults (packing, chunked loss)",
    "lf-padded": "LLaMA-Factory 0.9.5, padded, no gradient checkpointing",
    "lf-neat": "LLaMA-Factory 0.9.5, `neat_packing: true`, no gradient checkpointing",
    "lf-defaults": "LLaMA-Factory 0.9.5 defaults (padded, gradient checkpointing on)",
}
LF_EXTRA = {
    "lf-padded": {"disable_gradient_checkpointing": True},
    "lf-neat": {"disable_gradient_checkpointing": True, "packing": True, "neat_packing": True},
    "lf-defaults": {},
}


@dataclass
class Setup:
    """One scenario's model and data, in the forms both tools read."""

    label: str
    model: Path
    prepared: Path  # glmtune's prepared dataset (also the baseline's)
    lf_dataset_dir: Path  # the same rows for LLaMA-Factory: dataset_info.json + rows.json (alpaca format)
    params: int
    batch: int
    max_steps: int  # -1: one epoch
    cutoff: int
    lr: float = 1e-3

    @property
    def real_tokens(self) -> int:
        """Real tokens of one epoch (or max_steps batches) of glmtune's prepared data: what it and the baseline see."""
        rows = None if self.max_steps < 0 else self.max_steps * self.batch
        return train_speed.dataset_tokens(self.prepared, rows)[0]


def build_speed(tmp: Path, rows: int, hidden_size: int, num_layers: int) -> Setup:
    from glmtune.models.tiny import build_tiny_glm

    source = json.loads((train_speed.SHARED / "data/alpaca/alpaca_zh_demo.json").read_text(encoding="utf-8"))[:rows]
    texts = [r[k] for r in source for k in ("instruction", "input", "output") if r[k]]
    model = build_tiny_glm(tmp / "model", texts, hidden_size=hidden_size, num_layers=num_layers, vocab_size=8000)
    return _setup(tmp, "speed", model, source, batch=8, max_steps=-1, cutoff=512)


def build_memory(tmp: Path, steps: int = 10) -> Setup:
    from glmtune.models.loading import load_tokenizer

    tokenizer = load_tokenizer(str(train_speed.SHARED / "tokenizers" / "glm-4-9b-chat"))
    model = train_speed._tiny_model_for(tokenizer, tmp / "model-151k")
    # train_speed's memory samples (1,000-token stretches of the answers), as instruction + answer rows, so that
    # every tool trains the same supervised task with its own chat template.
    text = "\n".join(r["output"] for r in
                     json.loads((train_speed.SHARED / "data/alpaca/alpaca_zh_demo.json").read_text(encoding="utf-8")))
    ids = tokenizer.encode(text, add_special_tokens=False)
    source = [{"instruction": "续写下文。", "input": "", "output": tokenizer.decode(ids[i * 1000:(i + 1) * 1000])}
              for i in range(40)]
    return _setup(tmp, "memory", model, source, batch=4, max_steps=steps, cutoff=1024)


def _setup(tmp: Path, label: str, model: Path, source: list[dict], batch: int, max_steps: int, cutoff: int) -> Setup:
    from glmtune.cli import main

    lf_dir = tmp / f"lf-data-{label}"
    lf_dir.mkdir()
    rows = lf_dir / "rows.json"
    rows.write_text(json.dumps(source, ensure_ascii=False), encoding="utf-8")
    (lf_dir / "dataset_info.json").write_text(json.dumps({"bench": {"file_name": "rows.json"}}), encoding="utf-8")
    prepared = tmp / f"data-{label}"
    assert main(["prepare", "--jsonl_path", str(rows), "--save_path", str(prepared), "--model", str(model),
                 "--max_seq_length", str(cutoff), "--truncation", "right"]) == 0
    return Setup(label, model, prepared, lf_dir, train_speed._count(model), batch, max_steps, cutoff)


def runner(setup: Setup, name: str, precision: str, tmp: Path, peer_python: Path | None) -> Callable[[], dict]:
    """A callable doing one fresh-process run: its result dict (runtime, steps, losses, real_tokens, peak_bytes)."""
    import torch

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cuda = torch.cuda.is_available()  # on a CPU, transformers refuses bf16 unless told use_cpu
    out = tmp / f"{setup.label}-{name}-{precision}"
    epochs = 1

    def baseline() -> dict:
        run, _, peak = run_measured([sys.executable, "-c", train_speed.BASELINE, str(setup.model), str(setup.prepared),
                                     str(out), str(setup.batch), str(epochs), str(setup.max_steps), str(setup.lr),
                                     str(train_speed.LORA["r"]), str(train_speed.LORA["alpha"]), TARGETS], env)
        return {**run, "real_tokens": setup.real_tokens, "peak_bytes": peak}

    def glmtune() -> dict:
        flags = ["--dataset_path", setup.prepared, "--per_device_train_batch_size", setup.batch, "--num_train_epochs",
                 epochs, "--max_steps", setup.max_steps, "--learning_rate", setup.lr, "--lora_rank",
                 train_speed.LORA["r"], "--lora_alpha", train_speed.LORA["alpha"], "--lora_dropout", "0",
                 "--logging_steps", "1", "--save_strategy", "no", "--seed", "0", "--target_modules", TARGETS,
                 "--output_dir", out, "--overwrite_output_dir", "true", "--precision", precision]
        run, stdout, peak = run_measured([sys.executable, "-c", train_speed.GLMTUNE, str(out), *map(str, flags)], env)
        return {**run, "losses": train_speed.glmtune_losses(stdout), "real_tokens": setup.real_tokens,
                "peak_bytes": peak}

    def llamafactory() -> dict:
        assert peer_python is not None
        config = {
            "model_name_or_path": str(setup.model), "stage": "sft", "do_train": True, "finetuning_type": "lora",
            "lora_target": "all", "lora_rank": train_speed.LORA["r"], "lora_alpha": train_speed.LORA["alpha"],
            "lora_dropout": 0.0, "dataset": "bench", "dataset_dir": str(setup.lf_dataset_dir), "template": "glm4",
            "cutoff_len": setup.cutoff, "overwrite_cache": True, "output_dir": str(out), "overwrite_output_dir": True,
            "logging_steps": 1, "save_strategy": "no", "plot_loss": False, "report_to": "none",
            "per_device_train_batch_size": setup.batch, "gradient_accumulation_steps": 1,
            "learning_rate": setup.lr, "num_train_epochs": float(epochs), "max_steps": setup.max_steps,
            "lr_scheduler_type": "linear", "warmup_steps": 0, "seed": 0, "dataloader_pin_memory": False,
            "bf16": precision == "bf16", "use_cpu": not cuda, **LF_EXTRA[name],
        }
        out.mkdir(parents=True, exist_ok=True)
        config_file = out.with_suffix(".json")
        config_file.write_text(json.dumps(config), encoding="utf-8")
        # LLaMA-Factory checks its pins against what is installed; its own venv holds exactly those.
        lf_env = {k: v for k, v in env.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        run, _, peak = run_measured([str(peer_python), str(LF_CHILD), str(config_file)], lf_env)
        return {**run, "peak_bytes": peak}

    return {"baseline": baseline, "glmtune": glmtune}.get(name, llamafactory)


def matmul_rate(precision: str) -> float:
    """This machine's matmul rate in GFLOP/s at the precision: train_speed.py's measurement where it has one."""
    import torch

    if precision == "fp32":
        return train_speed.matmul_peak_gflops()[0]
    # The same measurement (2048^2 products, best of five) in bf16, for the bf16 runs.
    n = 2048
    a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
    a @ b
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def bf16_supported() -> bool:
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported())


def attempt(what: str, run: Callable[[], dict]) -> dict | None:
    """The run with its CPU steal, or None when it failed (said on stderr; the other runs go on)."""
    print(f"{what} ...", file=sys.stderr, flush=True)
    try:
        result = train_speed._with_steal(run)
    except RuntimeError as error:
        print(f"{what} FAILED: {error}", file=sys.stderr, flush=True)
        return None
    print(f"{what}: {result['runtime']:.1f} s, {result['steps']} steps, {result['real_tokens']} real tokens, "
          f"peak {result['peak_bytes'] / 2**30:.2f} GiB", file=sys.stderr, flush=True)
    return result


def summarise(setup: Setup, name: str, precision: str, tries: list[dict | None], rate: float) -> dict:
    head = {"scenario": setup.label, "name": name, "run": LABELS[name], "precision": precision}
    runs = [r for r in tries if r is not None]
    if not runs:
        return {**head, "failed": True}
    seconds = statistics.median(r["runtime"] for r in runs)
    real = runs[0]["real_tokens"]
    last = runs[0]["losses"][-5:]
    return {**head, "failed": len(runs) < len(tries), "seconds": seconds,
            "all_seconds": [round(r["runtime"], 1) for r in runs], "steps": runs[0]["steps"], "real_tokens": real,
            "fed_tokens": runs[0].get("fed_tokens"), "tokens_per_s": real / seconds,
            "peak_gib": max(r["peak_bytes"] for r in runs) / 2**30,
            "final_loss": sum(last) / len(last) if last else float("nan"),
            "steal": max(r["steal"] for r in runs), "of_matmul": 4 * setup.params * real / seconds / 1e9 / rate}


def table(results: list[dict]) -> list[str]:
    lines = ["| scenario | run | precision | train s (median) | each round | real tokens | real tok/s | "
             "steps | peak RSS GiB | final loss | of matmul rate | vs baseline | vs LF packed | CPU steal |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "seconds" not in r:
            lines.append(f"| {r['scenario']} | {r['run']} | {r['precision']} | failed (see the log) |" + " |" * 10)
            continue
        same = [o for o in results if o["scenario"] == r["scenario"] and "seconds" in o]
        base = next((o for o in same if o["name"] == "baseline"), None)
        packed = next((o for o in same if o["name"] == "lf-neat" and o["precision"] == r["precision"]), None)
        memory = r["scenario"] == "memory"

        def ratio(ref: dict | None, r: dict = r, memory: bool = memory) -> str:
            if ref is None:
                return "-"
            # Speed: how many times faster (their seconds over ours); memory: our peak over theirs.
            return f"{r['peak_gib'] / ref['peak_gib']:.2f}x mem" if memory else f"{ref['seconds'] / r['seconds']:.2f}x"

        tokens = f"{r['real_tokens']}" + (f" (fed {r['fed_tokens']})" if r["fed_tokens"] else "")
        each = ", ".join(map(str, r["all_seconds"])) + (" (a round failed)" if r["failed"] else "")
        lines.append(f"| {r['scenario']} | {r['run']} | {r['precision']} | {r['seconds']:.1f} | {each} | {tokens} | "
                     f"{r['tokens_per_s']:.0f} | {r['steps']} | "
                     f"{r['peak_gib']:.2f} | {r['final_loss']:.3f} | {r['of_matmul']:.1%} | {ratio(base)} | "
                     f"{ratio(packed)} | {r['steal']:.0%} |")
    return lines


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                platform.processor())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=["speed", "memory", "both"], default="both")
    parser.add_argument("--rows", type=int, default=256, help="alpaca rows for the speed scenario")
    parser.add_argument("--rounds", type=int, default=2,
                        help="interleaved rounds of the speed scenario, each run's median compared (memory: one)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "both"], default=None,
                        help="glmtune's and LLaMA-Factory's precision (default: both where the CPU has bf16 units, "
                             "else fp32); the baseline is always fp32")
    parser.add_argument("--only", default=",".join(RUNS), help=f"a subset of {','.join(RUNS)}")
    parser.add_argument("--memory_steps", type=int, default=10, help="the memory scenario's steps")
    parser.add_argument("--hidden_size", type=int, default=384, help="the speed scenario's GLM width")
    parser.add_argument("--num_layers", type=int, default=6, help="the speed scenario's GLM depth")
    parser.add_argument("--shared", type=Path, default=None, help="the shared data folder (default ../shared)")
    parser.add_argument("--peer_home", type=Path, default=DEFAULT_HOME, help="LLaMA-Factory's virtual environment")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table to this file")
    args = parser.parse_args()
    only = [n for n in args.only.split(",") if n]
    if unknown := set(only) - set(RUNS):
        parser.error(f"unknown runs {sorted(unknown)}; choose from {','.join(RUNS)}")
    train_speed.SHARED = args.shared or train_speed.SHARED
    bf16 = bf16_supported()
    precisions = {"fp32": ["fp32"], "bf16": ["bf16"], "both": ["fp32", "bf16"]}[args.precision or
                                                                              ("both" if bf16 else "fp32")]
    if "bf16" in precisions and not bf16:
        print("note: this CPU has no AVX512-BF16 units; bf16 runs are emulated and slow", file=sys.stderr)
    peer_python = ensure_llamafactory(args.peer_home) if any(n.startswith("lf-") for n in only) else None

    load_before = os.getloadavg()
    rates = {p: matmul_rate(p) for p in dict.fromkeys(["fp32", *precisions])}  # the baseline is fp32
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="glmtune-peer-") as tmp_name:
        tmp = Path(tmp_name)
        setups = []
        if args.scenario in ("speed", "both"):
            setups.append(build_speed(tmp, args.rows, args.hidden_size, args.num_layers))
        if args.scenario in ("memory", "both"):
            setups.append(build_memory(tmp, args.memory_steps))
        for setup in setups:
            plan = [(name, p) for p in precisions for name in only if not (name == "baseline" and p != "fp32")]
            if "baseline" in only and "fp32" not in precisions:
                plan.insert(0, ("baseline", "fp32"))
            runners = [runner(setup, name, p, tmp, peer_python) for name, p in plan]
            # Peak memory varies little between rounds; the memory scenario's runs are the bench's longest.
            count = 1 if setup.label == "memory" else args.rounds
            rounds = [[attempt(f"{setup.label} round {i + 1}/{count}: {name} {p}", run)
                       for (name, p), run in zip(plan, runners, strict=True)] for i in range(count)]
            results += [summarise(setup, name, p, [r[j] for r in rounds], rates[p])
                        for j, (name, p) in enumerate(plan)]
        models = "; ".join(f"{st.label}: {st.params / 1e6:.1f}M parameters, {st.real_tokens} real tokens in glmtune's "
                           "data" for st in setups)
    load_after = os.getloadavg()

    head = [f"machine: {cpu_model()}, {os.cpu_count()} cores, AVX512-BF16 {'yes' if bf16 else 'no'}; "
            f"matmul rate measured here: " + ", ".join(f"{p} {v:.0f} GFLOP/s" for p, v in rates.items()),
            f"load average before {'/'.join(f'{v:.2f}' for v in load_before)}, "
            f"after {'/'.join(f'{v:.2f}' for v in load_after)} (1/5/15 min)",
            f"models: {models}", f"command: bench/peer_speed.py {' '.join(sys.argv[1:])}", ""]
    text = "\n".join([*head, *table(results)])
    print("\n" + text)
    if args.markdown:
        args.markdown.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
