#!/usr/bin/env bash
# Checks on a GPU machine with vLLM installed that vLLM serves glmtune's outputs: a merged directory, and a base with
# two adapters behind --lora-modules. Each must answer /v1/chat/completions; the greedy answers are printed beside
# glmtune's own (`glmtune infer`) for the same prompt. Not run yet (no GPU where it was written).
#
#   bash bench/vllm_check.sh BASE ADAPTER_A ADAPTER_B [PROMPT]
set -euo pipefail
BASE=$1 A=$2 B=$3 PROMPT=${4:-"What is a bond?"}
WORK=$(mktemp -d)
PORT=8765
trap 'kill "${SERVER:-}" 2>/dev/null || true; rm -rf "$WORK"' EXIT

ask() {  # model -> the greedy answer's text
  curl -sf "http://127.0.0.1:$PORT/v1/chat/completions" -H 'Content-Type: application/json' -d "$(python -c '
import json, sys; print(json.dumps({"model": sys.argv[1], "messages": [{"role": "user", "content": sys.argv[2]}],
                                    "temperature": 0, "max_tokens": 32}))' "$1" "$PROMPT")" |
    python -c 'import json, sys; print(json.load(sys.stdin)["choices"][0]["message"]["content"])'
}

wait_ready() {
  for _ in $(seq 600); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && return 0; sleep 1; done
  echo "vLLM did not start" >&2; return 1
}

glmtune merge --peft_path "$A" --output_dir "$WORK/merged"
vllm serve "$WORK/merged" --served-model-name merged --port "$PORT" >"$WORK/merged.log" 2>&1 & SERVER=$!
wait_ready
echo "merged (vLLM):    $(ask merged)"
echo "merged (glmtune): $(glmtune infer --model "$WORK/merged" --prompt "$PROMPT" --max_new_tokens 32 --temperature 0)"
kill "$SERVER"; wait "$SERVER" || true

vllm serve "$BASE" --enable-lora --max-lora-rank 64 --lora-modules "a=$A" "b=$B" --port "$PORT" \
  >"$WORK/lora.log" 2>&1 & SERVER=$!
wait_ready
for name in a b; do
  dir=$A; [ "$name" = b ] && dir=$B
  echo "adapter $name (vLLM):    $(ask "$name")"
  echo "adapter $name (glmtune): $(glmtune infer --peft_path "$dir" --prompt "$PROMPT" --max_new_tokens 32 --temperature 0)"
done
