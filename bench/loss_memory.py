"""Peak memory and time of one forward + backward with transformers' own loss against glmtune's chunked loss,
each in a fresh process, on a tiny GLM with GLM-4's vocabulary (151,552).

    .venv/bin/python bench/loss_memory.py [--batch 4] [--seq 1024] [--vocab 151552]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = """
import json, resource, sys, time, torch
from transformers import GlmConfig, GlmForCausalLM
from glmtune.train.loss import chunked_causal_lm_loss
mode, batch, seq, vocab = sys.argv[1], *map(int, sys.argv[2:5])
torch.manual_seed(0)
model = GlmForCausalLM(GlmConfig(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=64, pad_token_id=0,
                                 eos_token_id=1))
ids = torch.randint(2, vocab, (batch, seq))
labels = ids.clone()
labels[:, : seq // 4] = -100
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
if mode == "plain":
    loss = model(input_ids=ids, labels=labels, use_cache=False).loss
else:
    out = model(input_ids=ids, output_hidden_states=True, logits_to_keep=1, use_cache=False)
    loss = chunked_causal_lm_loss(out.hidden_states[-1], model.lm_head, labels)
loss.backward()
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"loss": loss.item(), "seconds": seconds, "peak_gib": peak / 2**20,
                  "added_gib": (peak - before) / 2**20}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=151552)
    args = parser.parse_args()
    results = {}
    for mode in ("plain", "chunked"):
        out = subprocess.run([sys.executable, "-c", CHILD, mode, str(args.batch), str(args.seq), str(args.vocab)],
                             capture_output=True, text=True, check=True).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
    plain, chunked = results["plain"], results["chunked"]
    print(f"\nbatch {args.batch} x {args.seq} tokens, vocabulary {args.vocab}, hidden 256, 2 layers, fp32, CPU\n")
    print("| loss | value | peak RSS GiB | added by forward+backward GiB | seconds |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['loss']:.6f} | {r['peak_gib']:.2f} | {r['added_gib']:.2f} | {r['seconds']:.2f} |")
    print(f"\nchunked / plain: memory added {chunked['added_gib'] / plain['added_gib']:.2f}x, "
          f"time {chunked['seconds'] / plain['seconds']:.2f}x; |loss difference| "
          f"{abs(chunked['loss'] - plain['loss']):.2e}")


if __name__ == "__main__":
    main()
