"""A bounded stress test of `glmtune serve`: a real server subprocess on 127.0.0.1 over the tiny demo GLM, many
concurrent raw-socket clients sending valid requests (whole and streamed) mixed with hostile and careless ones
(malformed JSON, wrong types, invalid UTF-8, lone surrogates, huge max_tokens and n, unknown fields, deep nesting,
oversized bodies, no content type, slow senders, clients that vanish mid-stream). It stops after --requests
requests or --seconds seconds, whichever comes first.

    .venv/bin/python bench/serve_stress.py [--requests 3000] [--seconds 90] [--clients 32] [--max_queue 16]

Prints requests sent, the count of each status (per kind of request), p50/p99 latency, and the server's peak
resident memory (VmHWM from /proc/PID/status) against its memory after warming up; fails if any answer is 5xx, if
a request that was not meant to vanish got no answer, or if the server does not answer a valid request at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import select
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

from generation_speed import build_model  # the tiny demo GLM, as the generation bench builds it

MAX_REQUEST_BYTES = 256 * 1024


def valid(**fields) -> dict:
    return {"model": "bench", "messages": [{"role": "user", "content": "What is a bond?"}], "max_tokens": 8,
            "temperature": 0, **fields}


def dumps(body: dict) -> bytes:
    return json.dumps(body).encode()


# kind -> (body bytes, content type, how the client behaves); each request picks a kind at random.
KINDS = {
    "valid": (dumps(valid()), "application/json", "whole"),
    "valid stream": (dumps(valid(stream=True)), "application/json", "whole"),
    "vanishes mid-stream": (dumps(valid(stream=True, max_tokens=200)), "application/json", "vanish"),
    "slow sender": (dumps(valid()), "application/json", "slow"),
    "malformed JSON": (b'{"model": "bench", "messages": [{"role": "user", "content": "hi"', "application/json",
                       "whole"),
    "wrong types": (dumps(valid(temperature="hot", n="2", messages=[{"role": "user", "content": 5}])),
                    "application/json", "whole"),
    "invalid UTF-8": (b'{"model": "bench", "messages": [{"role": "user", "content": "\xc3\x28\xff"}]}',
                      "application/json", "whole"),
    "lone surrogate": (b'{"model": "bench", "messages": [{"role": "user", "content": "\\udc00"}]}',
                       "application/json", "whole"),
    "huge max_tokens": (dumps(valid(max_tokens=10**15)), "application/json", "whole"),
    "huge n": (dumps(valid(n=10**9)), "application/json", "whole"),
    "unknown fields": (dumps(valid(top_k=5, repetition_penalty=1.2)), "application/json", "whole"),
    "deep nesting": (b'{"model": "bench", "messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "application/json",
                     "whole"),
    "deep tool schema": (dumps(valid(tools=[{"type": "function", "function": {
        "name": "f", "parameters": json.loads('{"a":' * 200 + "1" + "}" * 200)}}])), "application/json", "whole"),
    # As curl sends a large body: "Expect: 100-continue", and the body only once the server says to go on. (A client
    # that sends it regardless is answered 413 too, but the server closes without reading the rest, which resets
    # the connection under the answer: uvicorn does not linger.)
    "oversized body": (dumps(valid(messages=[{"role": "user", "content": "x" * (MAX_REQUEST_BYTES + 1)}])),
                       "application/json", "expect"),
    "no content type": (dumps(valid()), None, "whole"),
}


def request_bytes(body: bytes, content_type: str | None, expect: bool) -> tuple[bytes, bytes]:
    head = ["POST /v1/chat/completions HTTP/1.1", "Host: 127.0.0.1", "Connection: close",
            f"Content-Length: {len(body)}"] + ([f"Content-Type: {content_type}"] if content_type else []) + \
        (["Expect: 100-continue"] if expect else [])
    return "\r\n".join(head).encode() + b"\r\n\r\n", body


def one_request(port: int, kind: str) -> tuple[str, float]:
    """Send one request of this kind; its outcome (the status, or what happened instead) and its latency."""
    body, content_type, behaviour = KINDS[kind]
    head, body = request_bytes(body, content_type, behaviour == "expect")
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as conn:
        received = b""
        try:
            conn.sendall(head)
            if behaviour == "expect":
                received = conn.recv(65536)
                if received.startswith(b"HTTP/1.1 100"):
                    received = b""
                    conn.sendall(body)
            elif behaviour == "slow":  # half the body, a pause, the rest unless answered meanwhile (a 429)
                conn.sendall(body[: len(body) // 2])
                time.sleep(0.5)
                if not select.select([conn], [], [], 0)[0]:
                    conn.sendall(body[len(body) // 2:])
            else:
                for i in range(0, len(body), 65536):  # the server may answer 413 and close before the end
                    conn.sendall(body[i:i + 65536])
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                received += chunk
                if behaviour == "vanish" and b'"content":"' in received.partition(b"\r\n\r\n")[2]:
                    # A reset rather than a close: as a client that was killed leaves.
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return "vanished mid-stream", time.perf_counter() - start
        except (ConnectionResetError, TimeoutError) as e:
            return f"no answer ({type(e).__name__})", time.perf_counter() - start
    status = re.match(rb"HTTP/1\.1 (\d{3})", received)
    return (status.group(1).decode() if status else "no answer"), time.perf_counter() - start


def memory_kib(pid: int, field: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", text).group(1))


def start_server(model: Path, max_queue: int) -> tuple[subprocess.Popen, int]:
    command = [sys.executable, "-m", "glmtune", "serve", "--model", str(model), "--served_model_name", "bench",
               "--host", "127.0.0.1", "--port", "0", "--max_queue", str(max_queue),
               "--max_request_bytes", str(MAX_REQUEST_BYTES), "--log_level", "warning"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    line = server.stdout.readline()
    found = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
    if not found:
        server.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    return server, int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--seconds", type=float, default=90)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--max_queue", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="glmtune-stress-") as tmp:
        model, _ = build_model(Path(tmp) / "model")
        server, port = start_server(model, args.max_queue)
        try:
            for _ in range(3):  # warm up: the first answers allocate what every later one reuses
                assert one_request(port, "valid")[0] == "200"
            warm_rss = memory_kib(server.pid, "VmRSS")
            outcomes, latencies = run_clients(port, args)
            final, _ = one_request(port, "valid")
            peak, rss = memory_kib(server.pid, "VmHWM"), memory_kib(server.pid, "VmRSS")
        finally:
            server.terminate()
            server.wait(30)
    report(outcomes, latencies, args, warm_rss, peak, rss)
    server_errors = sum(n for (kind, outcome), n in outcomes.items() if outcome.startswith("5"))
    unanswered = sum(n for (kind, outcome), n in outcomes.items() if outcome.startswith("no answer"))
    assert server_errors == 0, f"{server_errors} answers were 5xx"
    assert unanswered == 0, f"{unanswered} requests got no answer"
    assert final == "200", f"after the stress the server answered a valid request with {final}"
    print("0 answers 5xx; every request answered, refused or left by its client; the server answers afterwards.")


def run_clients(port: int, args: argparse.Namespace) -> tuple[Counter, dict[str, list[float]]]:
    rng = random.Random(args.seed)
    kinds = [rng.choice(list(KINDS)) for _ in range(args.requests)]
    outcomes: Counter = Counter()
    latencies: dict[str, list[float]] = defaultdict(list)
    lock, next_index = threading.Lock(), iter(range(args.requests))
    deadline = time.monotonic() + args.seconds

    def client() -> None:
        while time.monotonic() < deadline:
            with lock:
                index = next(next_index, None)
            if index is None:
                return
            outcome, seconds = one_request(port, kinds[index])
            with lock:
                outcomes[kinds[index], outcome] += 1
                latencies[outcome].append(seconds)

    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes, latencies


def report(outcomes: Counter, latencies: dict[str, list[float]], args: argparse.Namespace, warm_rss: int,
           peak: int, rss: int) -> None:
    sent = sum(outcomes.values())
    print(f"\n{sent} requests sent by {args.clients} concurrent clients (limit {args.requests} requests or "
          f"{args.seconds:.0f} s), --max_queue {args.max_queue}, --max_request_bytes {MAX_REQUEST_BYTES}, "
          f"tiny demo GLM, {os.cpu_count()} CPU cores\n")
    statuses = Counter()
    for (_, outcome), n in outcomes.items():
        statuses[outcome] += n
    print("| outcome | requests | p50 latency | p99 latency |\n|---|---|---|---|")
    for outcome, n in sorted(statuses.items()):
        times = sorted(latencies[outcome])
        print(f"| {outcome} | {n} | {percentile(times, 50) * 1000:.0f} ms | {percentile(times, 99) * 1000:.0f} ms |")
    every = sorted(t for times in latencies.values() for t in times)
    print(f"| all | {sent} | {percentile(every, 50) * 1000:.0f} ms | {percentile(every, 99) * 1000:.0f} ms |\n")
    print("| kind | outcomes |\n|---|---|")
    for kind in KINDS:
        seen = {outcome: n for (k, outcome), n in sorted(outcomes.items()) if k == kind}
        print(f"| {kind} | {', '.join(f'{o}: {n}' for o, n in seen.items())} |")
    print(f"\nserver memory: {warm_rss / 1024:.0f} MiB after warming up, peak (VmHWM) {peak / 1024:.0f} MiB, "
          f"{rss / 1024:.0f} MiB at the end")


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * p / 100))]


if __name__ == "__main__":
    main()
