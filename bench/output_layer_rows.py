"""One position's logits of several rows: the output layer on the slice `hidden[:, -1:]` (what `logits_to_keep=1`
hands it) against the same rows made contiguous first (what glmtune's loaded models do:
glmtune/models/output_layer.py), in fp32 and bf16, in one run.

    .venv/bin/python bench/output_layer_rows.py [--rows 8] [--tokens 64] [--hidden 1024] [--vocab 151552]

Prints seconds per call (median of --repeat) and the growth of the process's peak RSS during the first call.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=151552)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"{args.rows} rows x {args.tokens} tokens, hidden {args.hidden}, vocabulary {args.vocab}, "
          f"{torch.get_num_threads()} threads, no gradients")
    print("| precision | input | s per call (median) | peak RSS growth MiB |")
    print("|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        weight = torch.randn(args.vocab, args.hidden).to(dtype)
        hidden = torch.randn(args.rows, args.tokens, args.hidden).to(dtype)
        # contiguous first: its call does not grow the peak, so the sliced call's growth is its own
        for name, contiguous in (("contiguous", True), ("slice [:, -1:]", False)):
            times, peak = [], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            for _ in range(args.repeat):
                start = time.perf_counter()
                with torch.no_grad():
                    rows = hidden[:, -1:]
                    torch.nn.functional.linear(rows.contiguous() if contiguous else rows, weight)
                times.append(time.perf_counter() - start)
            growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024
            print(f"| {str(dtype).removeprefix('torch.')} | {name} | {statistics.median(times):.3f} | {growth:.0f} |")


if __name__ == "__main__":
    main()
