"""Generation throughput: `infer`'s batches against one prompt at a time, and `serve` with 1, 4, 8 and 16 concurrent
clients, in the same run, on the tiny demo GLM (random weights, greedy, a fixed answer length).

    .venv/bin/python bench/generation_speed.py [--prompts 64] [--max_new_tokens 32] [--batch_size 16] [--threads N]
        [--separate_server]

Prints generated tokens per second for each way and, for serve, the time to first token and the p50/p99 request
latency (streamed requests, as a chat client sends them). serve batches concurrent requests (continuous batching,
see glmtune/serve/batching.py): the target is 8 clients at 5x or more one client's tokens/s. Two more rows give the
ceiling for that ratio in the same run: serve's step loop alone (its BatchGenerator, no HTTP) kept at 8 rows and at
1 row, and `infer`'s batches of 8.

The clients are coroutines of one process, each on a kept-alive connection that posts a streamed chat completion and
reads its server-sent events with one JSON parse per event (no HTTP library): the measure is the server's
throughput, and on a 2-core machine every core-second the clients spend is one the server lacks (the openai client,
used before, spent 3 to 4 times as much CPU per token).

`--threads`: torch's intra-op threads (default: torch's own choice, one per core). The demo model's matrices are so
small that on a machine whose cores are busy with other work, two threads waiting on each other cost far more than
they share (measured: 16-row decoding steps 5 to 30 times slower with 2 threads than with 1 at load average 8 on 2
cores), so the printout names the threads and the load average.

`--separate_server`: serve runs as a real `glmtune serve` subprocess instead of a thread of this process. In one
process the benchmark's clients take the same GIL as the server's event loop and its decoding loop, which caps the
concurrent figures below what the server gives clients on other machines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
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


def step_loop_tokens_per_second(engine, prompts: list[str], max_new_tokens: int, rows: int) -> float:
    """serve's step loop without the server: a BatchGenerator kept at `rows` sequences, each finished one replaced
    by the next prompt (prefilled together with the others that join at the same step), as serve's worker runs it."""
    from glmtune.data.conversation import Conversation, Message
    from glmtune.inference.batch_generation import Joining, Sampling
    from glmtune.inference.engine import GenerationSettings

    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    waiting = [engine.prepare(Conversation(messages=[Message("user", p)]), settings)[:2] for p in prompts]
    generator, started = engine.batch_generator(), []
    start = time.perf_counter()
    while waiting or generator.sequences:
        room = min(len(waiting), rows - len(generator.sequences))
        started += generator.add_many([Joining(*waiting.pop(0), Sampling()) for _ in range(room)])
        generator.step()
    return sum(len(s.new_ids) for s in started) / (time.perf_counter() - start)


@dataclass
class ServeRun:
    tokens_per_second: float
    first_token_s: list[float]  # per request
    latency_s: list[float]


def serve_run(url: str, prompts: list[str], max_new_tokens: int, clients: int) -> ServeRun:
    """Every prompt streamed by `clients` concurrent clients (greedy: each answer ends at max_tokens or at its
    stop token, the same whatever the concurrency). Each client sends its next prompt when its answer has ended."""
    return asyncio.run(_serve_run(url, prompts, max_new_tokens, clients))


async def _serve_run(url: str, prompts: list[str], max_new_tokens: int, clients: int) -> ServeRun:
    waiting = list(reversed(prompts))
    results: list[tuple[int, float, float]] = []

    async def client() -> None:
        connection = await Connection.open(url)
        try:
            while waiting:
                results.append(await ask(connection, waiting.pop(), max_new_tokens))
        finally:
            connection.close()

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    seconds = time.perf_counter() - start
    return ServeRun(sum(r[0] for r in results) / seconds, [r[1] for r in results], [r[2] for r in results])


async def ask(connection: Connection, prompt: str, max_new_tokens: int) -> tuple[int, float, float]:
    """One streamed chat completion: (generated tokens, seconds to the first text, seconds to the end)."""
    body = {"model": "bench", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_new_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, tokens = None, 0
    async for event in connection.events(body):
        if event == "[DONE]":
            continue  # the response's last chunk follows: read to the end, the connection serves the next request
        chunk = json.loads(event)
        if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            first = time.perf_counter() - start
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter() - start
    return tokens, first if first is not None else end, end


class Connection:
    """A kept-alive HTTP/1.1 connection that posts a request and reads its server-sent events: the least a streaming
    client can do per token (no HTTP library, one JSON parse per event), so that the clients' share of the machine's
    cores stays small next to the server's."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, path: str):
        self.reader, self.writer, self.host, self.path = reader, writer, host, path

    @classmethod
    async def open(cls, url: str) -> Connection:
        found = re.fullmatch(r"http://([^/:]+):(\d+)(/.*)?", url)
        if not found:
            raise ValueError(f"not an http://host:port URL: {url}")
        reader, writer = await asyncio.open_connection(found.group(1), int(found.group(2)))
        return cls(reader, writer, f"{found.group(1)}:{found.group(2)}", (found.group(3) or "").rstrip("/"))

    async def events(self, body: dict) -> AsyncIterator[str]:
        """POST `body` to /chat/completions; yields each event's data (the response is chunked)."""
        payload = json.dumps(body).encode()
        self.writer.write(f"POST {self.path}/chat/completions HTTP/1.1\r\nHost: {self.host}\r\n"
                          f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
                          + payload)
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        if not head.startswith("HTTP/1.1 200") or "chunked" not in head.lower():
            raise RuntimeError(f"unexpected response: {head.splitlines()[0]}")
        pending = b""
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            data = await self.reader.readexactly(size + 2)  # the chunk and its CRLF
            if size == 0:
                return
            pending += data[:-2]
            *complete, pending = pending.split(b"\n\n")
            for event in complete:
                if event.startswith(b"data: "):
                    yield event[6:].decode()

    def close(self) -> None:
        self.writer.close()


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
                ("infer, batches of 8", infer_tokens_per_second(engine, prompts, args.max_new_tokens, 8)),
                ("infer, one prompt at a time", infer_tokens_per_second(engine, prompts, args.max_new_tokens, 1)),
                *((f"serve's step loop alone, {n} row{'s' * (n > 1)}",
                   step_loop_tokens_per_second(engine, prompts, args.max_new_tokens, n)) for n in (8, 1))]
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
