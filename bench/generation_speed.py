"""Generation throughput: `infer`'s batches against one prompt at a time, and `serve` with 1, 4, 8 and 16 concurrent
clients, in the same run, on the tiny demo GLM (random weights, greedy, a fixed answer length).

    .venv/bin/python bench/generation_speed.py [--prompts 64] [--max_new_tokens 32] [--batch_size 16] [--threads N]
        [--separate_server]

Prints generated tokens per second for each way and, for serve, the time to first token and the p50/p99 request
latency (streamed requests, as a chat client sends them). serve batches concurrent requests (continuous batching,
see glmtune/serve/batching.py): the target is 8 clients at 5x or more one client's tokens/s.

`--threads`: torch's intra-op threads (default: torch's own choice, one per core). The demo model's matrices are so
small that on a machine whose cores are busy with other work, two threads waiting on each other cost far more than
they share (measured: 16-row decoding steps 5 to 30 times slower with 2 threads than with 1 at load average 8 on 2
cores), so the printout names the threads and the load average.

`--separate_server`: serve runs as a real `glmtune serve` subprocess instead of a thread of this process. In one
process the benchmark's own client threads (the openai client parsing one server-sent event per token per client)
take the same GIL as the server's event loop and its decoding loop, which caps the concurrent figures below what the
server gives clients on other machines.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

CLIENTS = (1, 4, 8, 16)


def build_model(directory: Path) -> tuple[Path, list[str]]:
    from glmtune.demo import demo_data_path
    from glmtune.models.tiny import build_tiny_glm

    rows = json.loads(demo_data_path().read_text(encoding="utf-8"))
    texts = [row[k] for row in rows for k in ("instruction", "input", "output") if row[k]] * 4
    return build_tiny_glm(directory, texts), [row["instruction"] for row in rows]


def infer_tokens_per_second(engine, prompts: list[str], max_new_tokens: int, batch_size: int) -> float:
    from glmtune.data.conversation import Conversation, Message
    from glmtune.inference.engine import GenerationSettings

    conversations = [Conversation(messages=[Message("user", p)]) for p in prompts]
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    start = time.perf_counter()
    completions = engine.complete(conversations, settings, batch_size=batch_size, progress=False)
    seconds = time.perf_counter() - start
    return sum(c.completion_tokens for c in completions) / seconds


@dataclass
class ServeRun:
    tokens_per_second: float
    first_token_s: list[float]  # per request
    latency_s: list[float]


def serve_run(url: str, prompts: list[str], max_new_tokens: int, clients: int) -> ServeRun:
    """Every prompt streamed by `clients` concurrent clients (greedy: each answer ends at max_tokens or at its
    stop token, the same whatever the concurrency)."""
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)

    def ask(prompt: str) -> tuple[int, float, float]:
        start = time.perf_counter()
        first, tokens = None, 0
        for chunk in client.chat.completions.create(model="bench", messages=[{"role": "user", "content": prompt}],
                                                    max_tokens=max_new_tokens, temperature=0, stream=True,
                                                    stream_options={"include_usage": True}):
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - start
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        end = time.perf_counter() - start
        return tokens, first if first is not None else end, end

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(ask, prompts))
    seconds = time.perf_counter() - start
    return ServeRun(sum(r[0] for r in results) / seconds, [r[1] for r in results], [r[2] for r in results])


@contextmanager
def separate_server(model: Path, threads: int | None) -> Iterator[str]:
    """`glmtune serve` over `model` in its own process (its own GIL); yields its base URL."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    server = subprocess.Popen([sys.executable, "-m", "glmtune", "serve", "--model", str(model), "--served_model_name",
                               "bench", "--host", "127.0.0.1", "--port", "0", "--max_queue", str(max(CLIENTS)),
                               "--log_level", "warning"], stdout=subprocess.PIPE, text=True, env=env)
    try:
        found = re.search(r"(http://127\.0\.0\.1:\d+)/v1", server.stdout.readline())
        if not found:
            raise SystemExit("the server did not start")
        yield found.group(1)
    finally:
        server.terminate()
        server.wait(30)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch's intra-op threads (default: torch's)")
    parser.add_argument("--separate_server", action="store_true", help="serve in a subprocess (see above)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    from glmtune.inference.engine import Engine
    from glmtune.serve.app import create_app
    from glmtune.serve.background import running

    with tempfile.TemporaryDirectory(prefix="glmtune-bench-") as tmp:
        model, questions = build_model(Path(tmp) / "model")
        prompts = (questions * (args.prompts // len(questions) + 1))[: args.prompts]
        engine = Engine(str(model))
        rows = [(f"infer, batches of {args.batch_size}",
                 infer_tokens_per_second(engine, prompts, args.max_new_tokens, args.batch_size)),
                ("infer, one prompt at a time", infer_tokens_per_second(engine, prompts, args.max_new_tokens, 1))]
        serve_rows = []
        server = separate_server(model, args.threads) if args.separate_server else \
            running(create_app(engine, "bench", max_queue=max(CLIENTS)))
        with server as base:
            serve_run(base + "/v1", prompts[:4], args.max_new_tokens, 4)  # warm-up: first-call costs out of the way
            for clients in CLIENTS:
                serve_rows.append((clients, serve_run(base + "/v1", prompts, args.max_new_tokens, clients)))
    print(f"\n{args.prompts} prompts, up to {args.max_new_tokens} new tokens each, tiny demo GLM, "
          f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads, load average {load:.1f} at the start "
          f"and {os.getloadavg()[0]:.1f} at the end, serve in "
          f"{'its own process' if args.separate_server else 'this process'}")
    print("| way | generated tokens/s |\n|---|---|")
    for name, rate in rows:
        print(f"| {name} | {rate:.0f} |")
    one = serve_rows[0][1].tokens_per_second
    print("\n| serve, concurrent clients | generated tokens/s | x one client | time to first token p50 / p99 (s) "
          "| latency p50 / p99 (s) |\n|---|---|---|---|---|")
    for clients, run in serve_rows:
        print(f"| {clients} | {run.tokens_per_second:.0f} | {run.tokens_per_second / one:.1f} | "
              f"{percentile(run.first_token_s, 50):.2f} / {percentile(run.first_token_s, 99):.2f} | "
              f"{percentile(run.latency_s, 50):.2f} / {percentile(run.latency_s, 99):.2f} |")


if __name__ == "__main__":
    main()
