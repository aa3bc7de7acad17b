"""The frozen output layer's chunked loss at several chunk sizes, forward and backward, in interleaved rounds.

    .venv/bin/python bench/loss_chunks.py [--vocabulary 8000] [--hidden 384] [--tokens 552,920] [--chunks 256,512]
                                          [--threads 1,2] [--rounds 5]

glmtune.train.loss.frozen_output_layer_loss_sum over random states, weights and targets, in fp32 and bf16: the
median milliseconds of one forward and backward per chunk size, each round timing every size in turn. Defaults:
the speed scenario's output layer (bench/train_speed.py: 8,000 ids, hidden 384) and a batch's supervised tokens.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocabulary", type=int, default=8000)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--tokens", default="552,920")
    parser.add_argument("--chunks", default="256,512")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=5, help="passes timed together in a round")
    args = parser.parse_args()

    import torch

    from glmtune.train.loss import frozen_output_layer_loss_sum

    chunks = [int(c) for c in args.chunks.split(",")]
    print(f"| dtype | threads | tokens | {' | '.join(f'chunk {c} ms' for c in chunks)} | vs chunk {chunks[0]} |")
    print(f"|---|---|---|{'---|' * len(chunks)}---|")
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        weight = (torch.randn(args.vocabulary, args.hidden) * 0.02).to(dtype)
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            for tokens in (int(t) for t in args.tokens.split(",")):
                states = torch.randn(tokens, args.hidden, requires_grad=True)
                targets = torch.randint(0, args.vocabulary, (tokens,))

                def step(chunk: int, states: torch.Tensor = states, targets: torch.Tensor = targets,
                         weight: torch.Tensor = weight) -> None:
                    frozen_output_layer_loss_sum(states, targets, weight, chunk).backward()
                    states.grad = None

                times: dict[int, list[float]] = {c: [] for c in chunks}
                for chunk in chunks:  # warm-up: oneDNN's primitives for each shape
                    step(chunk)
                for _ in range(args.rounds):
                    for chunk in chunks:
                        start = time.perf_counter()
                        for _ in range(args.repeat):
                            step(chunk)
                        times[chunk].append((time.perf_counter() - start) / args.repeat * 1000)
                medians = [statistics.median(times[c]) for c in chunks]
                ratios = ", ".join(f"{medians[0] / m:.2f}x" for m in medians[1:])
                print(f"| {str(dtype).removeprefix('torch.')} | {threads} | {tokens} | "
                      f"{' | '.join(f'{m:.1f}' for m in medians)} | {ratios} |")


if __name__ == "__main__":
    main()
