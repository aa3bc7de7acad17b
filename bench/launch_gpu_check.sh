#!/usr/bin/env bash
# The launch configs in examples/accelerate/ on one CUDA GPU, through accelerate launch with 1 process: what the
# CPU tests can only load (FSDP needs GPUs; DeepSpeed on CPU is bench/deepspeed_cpu_check.sh). Offline; needs torch
# (CUDA), transformers, peft, datasets, accelerate; NOT deepspeed (its step checks glmtune's message when missing).
#
#   bash bench/launch_gpu_check.sh DATA_FILE      # any format `glmtune prepare` reads, a few rows are enough
#
# Steps (each one's failure is reported, the others still run; about 1-2 minutes on one GPU, 4-5 with DeepSpeed):
#   model       a tiny random GLM (hidden 64, 2 layers) with a tokenizer trained on DATA_FILE's text
#   ddp         accelerate launch --config_file examples/accelerate/ddp.yaml --num_processes 1, from the raw file
#   fsdp        the same with examples/accelerate/fsdp.yaml (FSDP2), saving checkpoint-3
#   fsdp_resume FSDP resumed from that checkpoint-3 to step 6
#   fsdp_torch  torchrun --nproc_per_node 1 ... --fsdp full_shard (the torchrun form in fsdp.yaml's header)
#   zero2/zero3 with deepspeed installed: accelerate launch with deepspeed_zero2.yaml / deepspeed_zero3.yaml, and
#               their _offload variants;
#   deepspeed   without it: torchrun ... --deepspeed examples/deepspeed/ds_z2_config.json, and glmtune must say so
#               (accelerate launch with a DeepSpeed config stops before glmtune, with its own message)
# Then a table: step, result, seconds, global step, final loss; and the DDP vs FSDP adapter difference.
set -u
DATA=${1:?usage: bash bench/launch_gpu_check.sh DATA_FILE}
DATA=$(realpath "$DATA")
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
WORK=${WORK:-$(mktemp -d /tmp/glmtune-launch-check.XXXXXX)}
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" HF_HOME="$WORK/hf_home" HF_HUB_OFFLINE=1 \
       TOKENIZERS_PARALLELISM=false
mkdir -p "$WORK"
RESULTS="$WORK/results.tsv"
: > "$RESULTS"
echo "work directory: $WORK"
nvidia-smi -L 2>&1 | head -4
$PY -c "import torch, transformers, accelerate, peft; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
'| transformers', transformers.__version__, '| accelerate', accelerate.__version__, '| peft', peft.__version__)"

# step NAME EXPECTED COMMAND...: runs it with a time limit, records result and seconds, never stops the script.
# EXPECTED: the exit code, or "fails:TEXT": a failure whose log says TEXT (launchers turn a child's code 2 into 1).
step() {
    local name=$1 expected=$2; shift 2
    local start rc seconds
    start=$(date +%s%N)
    timeout 240 "$@" > "$WORK/$name.log" 2>&1
    rc=$?
    seconds=$(( ($(date +%s%N) - start) / 1000000 ))  # milliseconds
    seconds=$(printf '%d.%01d' $((seconds / 1000)) $((seconds % 1000 / 100)))
    if [ "$rc" = "$expected" ]; then
        result=ok
    elif [[ $expected == fails:* ]] && [ "$rc" != 0 ] && grep -qF "${expected#fails:}" "$WORK/$name.log"; then
        result="ok (refused as expected)"
    else
        result="FAILED (rc $rc, expected $expected)"
    fi
    printf '%s\t%s\t%s\n' "$name" "$result" "$seconds" >> "$RESULTS"
    echo "== $name: $result in ${seconds%.*} s (log: $WORK/$name.log)"
    if [[ $result != ok* ]]; then tail -25 "$WORK/$name.log" | sed 's/^/   | /'; fi
}

step model 0 $PY - "$DATA" "$WORK/model" <<'EOF'
import sys
from pathlib import Path
from glmtune.models.tiny import build_tiny_glm
try:
    texts = Path(sys.argv[1]).read_text(encoding="utf-8").splitlines()
except UnicodeDecodeError:  # parquet: any text trains the tokenizer
    texts = []
texts = [t for t in texts if t.strip()] or ["question answer"]
build_tiny_glm(Path(sys.argv[2]), texts * 5, hidden_size=64, num_layers=2, vocab_size=500)
EOF

TRAIN=(-m glmtune train --dataset_path "$DATA" --model "$WORK/model" --max_seq_length 256
       --per_device_train_batch_size 2 --logging_steps 1 --save_steps 3 --seed 3 --overwrite_output_dir true)
LAUNCH=($PY -m accelerate.commands.launch --num_processes 1)
step ddp 0 "${LAUNCH[@]}" --config_file examples/accelerate/ddp.yaml "${TRAIN[@]}" --max_steps 6 \
    --output_dir "$WORK/ddp"
step fsdp 0 "${LAUNCH[@]}" --config_file examples/accelerate/fsdp.yaml "${TRAIN[@]}" --max_steps 3 \
    --output_dir "$WORK/fsdp"
step fsdp_resume 0 "${LAUNCH[@]}" --config_file examples/accelerate/fsdp.yaml "${TRAIN[@]}" --max_steps 6 \
    --output_dir "$WORK/fsdp" --resume_from_checkpoint true
step fsdp_torch 0 $PY -m torch.distributed.run --nproc_per_node 1 "${TRAIN[@]}" --max_steps 6 --fsdp full_shard \
    --output_dir "$WORK/fsdp_torchrun"
if $PY -c "import deepspeed" >/dev/null 2>&1; then  # installed: the ZeRO configs train for real
    step zero2 0 "${LAUNCH[@]}" --config_file examples/accelerate/deepspeed_zero2.yaml "${TRAIN[@]}" --max_steps 6 \
        --output_dir "$WORK/zero2"
    step zero3 0 "${LAUNCH[@]}" --config_file examples/accelerate/deepspeed_zero3.yaml "${TRAIN[@]}" --max_steps 6 \
        --output_dir "$WORK/zero3"
    # Offload: accelerate swaps the Trainer's AdamW for DeepSpeedCPUAdam, compiled on first use (about a minute).
    for variant in zero2_offload zero3_offload; do
        step $variant 0 "${LAUNCH[@]}" --config_file examples/accelerate/deepspeed_$variant.yaml "${TRAIN[@]}" \
            --max_steps 6 --output_dir "$WORK/$variant"
    done
else
    step deepspeed "fails:needs the deepspeed package" $PY -m torch.distributed.run --nproc_per_node 1 "${TRAIN[@]}" \
        --max_steps 2 --deepspeed examples/deepspeed/ds_z2_config.json --output_dir "$WORK/deepspeed"
    grep -h "^error:\|^hint:" "$WORK/deepspeed.log" | sed 's/^/   deepspeed said: /'
fi
# FSDP's checkpoints differ from DDP's (the Trainer saves FSDP optimizer states with accelerate: no optimizer.pt).
for run in ddp fsdp; do echo "   $run checkpoint-3: $(ls "$WORK/$run/checkpoint-3" 2>&1 | tr '\n' ' ')"; done

$PY - "$WORK" "$RESULTS" <<'EOF'
import json, sys
from pathlib import Path
work, rows = Path(sys.argv[1]), [line.split("\t") for line in Path(sys.argv[2]).read_text().splitlines()]
runs = {"ddp": "ddp", "fsdp": "fsdp", "fsdp_resume": "fsdp", "fsdp_torch": "fsdp_torchrun", "zero2": "zero2",
        "zero3": "zero3", "zero2_offload": "zero2_offload", "zero3_offload": "zero3_offload"}
print(f"\n{'step':<12} {'result':<34} {'seconds':>8} {'steps':>6} {'world':>6} {'precision':>9} {'train loss':>10}")
for name, result, seconds in rows:
    manifest = work / runs.get(name, "-") / "manifest.json"
    m = json.loads(manifest.read_text()) if name in runs and manifest.is_file() and result.startswith("ok") else {}
    loss = m.get("train_loss")
    print(f"{name:<12} {result:<34} {float(seconds):>8.1f} {m.get('global_step', '-')!s:>6} "
          f"{m.get('world_size', '-')!s:>6} {m.get('config', {}).get('precision', '-')!s:>9} "
          f"{(f'{loss:.4f}' if loss is not None else '-'):>10}")
try:
    from safetensors.torch import load_file
    a = load_file(str(work / "ddp" / "adapter_model.safetensors"))
    for other in ("fsdp", "zero2", "zero3", "zero2_offload", "zero3_offload"):
        if not (work / other / "adapter_model.safetensors").is_file():
            continue
        b = load_file(str(work / other / "adapter_model.safetensors"))
        diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
        print(f"\nDDP vs {other} adapter after 6 steps, same seed and data: max |difference| {diff:.3g} "
              f"(largest weight {max(v.abs().max().item() for v in a.values()):.3g})")
except Exception as e:  # noqa: BLE001 - a missing adapter is reported above
    print(f"\nDDP vs FSDP adapter comparison not possible: {type(e).__name__}: {e}")
EOF
