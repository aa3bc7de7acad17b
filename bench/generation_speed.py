"""Generation throughput: `infer`'s batches against one prompt at a time, and `serve` with 8 concurrent clients
against one client, in the same run, on the tiny demo GLM (random weights, greedy, a fixed answer length).

    .venv/bin/python bench/generation_speed.py [--prompts 64] [--max_new_tokens 32] [--batch_size 16]

Prints generated tokens per second for each way. The server answers one request at a time (one worker, a
bounded queue: see glmtune/serve), so concurrency there buys no throughput; the table shows it.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


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


def serve_tokens_per_second(url: str, prompts: list[str], max_new_tokens: int, clients: int) -> float:
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key="unused")

    def ask(prompt: str) -> int:
        answer = client.chat.completions.create(model="bench", messages=[{"role": "user", "content": prompt}],
                                                max_tokens=max_new_tokens, temperature=0)
        return answer.usage.completion_tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        tokens = sum(pool.map(ask, prompts))
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=16)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
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
        with running(create_app(engine, "bench")) as base:
            url = base + "/v1"
            rows += [("serve, 8 concurrent clients", serve_tokens_per_second(url, prompts, args.max_new_tokens, 8)),
                     ("serve, 1 client", serve_tokens_per_second(url, prompts, args.max_new_tokens, 1))]
    print(f"\n{args.prompts} prompts, up to {args.max_new_tokens} new tokens each, tiny demo GLM, "
          f"{os.cpu_count()} CPU cores")
    print("| way | generated tokens/s |\n|---|---|")
    for name, rate in rows:
        print(f"| {name} | {rate:.0f} |")


if __name__ == "__main__":
    main()
