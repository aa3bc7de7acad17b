"""Rows per second of `glmtune prepare`'s tokenizing, against a plain one-row-at-a-time loop, in the same run.

    .venv/bin/python bench/prepare_speed.py [--data FILE] [--model MODEL_DIR] [--num_proc 2] [--rounds 3]

Default data: ../shared/data/alpaca/alpaca_9k.json; default model: the demo's tiny GLM with its BPE tokenizer,
built into a temporary directory. The baseline renders each row's prompt with glmtune's renderer (the chat template,
users' control-token text marked as text) and tokenizes it and the answer in a Python loop, one row at a time (what a
simple script does); a second loop does the same with transformers alone (apply_chat_template tokenizing the prompt,
no marking), independent of glmtune's code. glmtune's numbers include the label masks, the truncation policy, the
per-row statistics and the cache entry written: serial (num_proc 1), parallel, and a cache hit. The methods run in
interleaved rounds (each round runs each once, in the same order) and the table shows each one's median, so that a
change in the machine's load between methods moves all of them alike; the load average is printed beside it. The
process time (CPU seconds of this process, its threads included: the tokenizers library encodes a batch on every
core unless TOKENIZERS_PARALLELISM=false) is shown beside the wall time for the methods that run in this process: on
a machine others load, the wall time follows their load, the process time less.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/alpaca/alpaca_9k.json"))
    parser.add_argument("--model", default=None)
    parser.add_argument("--num_proc", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from glmtune.data.prepare import cache_key, load_data, tokenize_with_cache
    from glmtune.data.templates import encode_prompt
    from glmtune.data.tokenize import TokenizeOptions
    from glmtune.demo import demo_data_path
    from glmtune.models.loading import load_tokenizer, stop_token_ids
    from glmtune.models.tiny import build_tiny_glm

    work = Path(tempfile.mkdtemp(prefix="glmtune-bench-"))
    model = args.model or str(build_tiny_glm(work / "model", [demo_data_path().read_text(encoding="utf-8")] * 4,
                                             hidden_size=64, num_layers=1))
    tokenizer = load_tokenizer(model)
    stop_ids = stop_token_ids(model, tokenizer)
    data = load_data([args.data], None)
    rows = len(data.conversations)
    options = TokenizeOptions(max_seq_length=1024)

    def timed(fn) -> tuple[float, float]:  # (wall seconds, process seconds)
        start, cpu = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - start, time.process_time() - cpu

    def baseline() -> None:
        for conversation in data.conversations:
            prompt = encode_prompt(tokenizer, conversation.prompt_part())
            answer = tokenizer.encode(conversation.messages[-1].content, add_special_tokens=False)
            _ = prompt + answer, [-100] * len(prompt) + answer

    def transformers_loop() -> None:  # the same with transformers alone: its apply_chat_template tokenizes the prompt
        for conversation in data.conversations:
            prompt = tokenizer.apply_chat_template(conversation.prompt_part().to_chat_messages(),
                                                   add_generation_prompt=True, return_dict=False)
            answer = tokenizer.encode(conversation.messages[-1].content, add_special_tokens=False)
            _ = prompt + answer, [-100] * len(prompt) + answer

    baseline_name = "plain loop, one row at a time (baseline)"
    transformers_name = "plain loop, transformers' apply_chat_template"
    cache = work / "cache"
    procs = sorted({1, args.num_proc})
    times: dict[str, list[tuple[float, float]]] = {baseline_name: [], transformers_name: [],
                                                   **{f"glmtune prepare, num_proc {n}": [] for n in procs}}

    loads = [os.getloadavg()[0]]
    for round_ in range(args.rounds):
        times[baseline_name].append(timed(baseline))
        times[transformers_name].append(timed(transformers_loop))
        for num_proc in procs:  # a fresh cache key each time: every run tokenizes
            key = cache_key(data, bench=num_proc, round=round_)
            times[f"glmtune prepare, num_proc {num_proc}"].append(timed(
                lambda n=num_proc, k=key: tokenize_with_cache(data, tokenizer, stop_ids, options, n, cache, k)))
        loads.append(os.getloadavg()[0])
    results = {name: (statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs))
               for name, runs in times.items()}
    results["glmtune prepare, cache hit"] = timed(
        lambda: tokenize_with_cache(data, tokenizer, stop_ids, options, args.num_proc, cache, key))

    base, base_cpu = results[baseline_name]
    print(f"\n{rows} rows of {args.data}, tokenizer of {model}; medians of {args.rounds} interleaved rounds; "
          f"1-minute load average {min(loads):.1f} to {max(loads):.1f} on {os.cpu_count()} CPUs\n")
    print(f"| {'method':<46} | {'seconds':>8} | {'rows/s':>8} | {'vs baseline':>11} | {'process s':>9} | "
          f"{'vs baseline':>11} |")
    print(f"|{'-' * 48}|{'-' * 10}|{'-' * 10}|{'-' * 13}|{'-' * 11}|{'-' * 13}|")
    for name, (seconds, cpu) in results.items():
        # Worker processes' time is not this process's: no process time for num_proc > 1.
        in_process = "num_proc" not in name or name.endswith("num_proc 1")
        cpu_columns = f"{cpu:9.2f} | {base_cpu / cpu:10.2f}x" if in_process and cpu > 0 else f"{'-':>9} | {'-':>11}"
        print(f"| {name:<46} | {seconds:8.2f} | {rows / seconds:8.0f} | {base / seconds:10.2f}x | {cpu_columns} |")


if __name__ == "__main__":
    main()
