#!/usr/bin/env bash
# DeepSpeed ZeRO-2 and ZeRO-3 (and their CPU-offload variants) training glmtune's LoRA run on a CPU-only machine,
# two processes, checked against plain two-process DDP. DeepSpeed runs on CPU through its CPU accelerator (chosen
# by itself without CUDA; communication over gloo when oneccl is absent) and accelerate keeps it there (the Trainer's
# Accelerator switches to DeepSpeed whatever the device), so this checks the examples/deepspeed/ configs and
# examples/accelerate/deepspeed_zero3.yaml on any machine.
#
#   bash bench/deepspeed_cpu_check.sh [DATA_FILE]     # default ../shared/data/alpaca/alpaca_zh_demo.json
#
# Needs deepspeed importable (not a glmtune requirement: an sdist needing --no-build-isolation, see docs/install.md), e.g.
#   pip download deepspeed==0.19.8 --no-deps -d /tmp/ds && .venv/bin/python -m pip install --no-build-isolation \
#     --no-deps --target /tmp/ds/site /tmp/ds/deepspeed-0.19.8.tar.gz einops hjson msgpack ninja py-cpuinfo
#   PYTHONPATH=/tmp/ds/site bash bench/deepspeed_cpu_check.sh
# and g++: the first DeepSpeed run JIT-compiles deepspeed_shm_comm (~2.5 min on 2 cores), the first offload run
# cpu_adam (~3 min), into TORCH_EXTENSIONS_DIR. Then about 4 minutes on 2 cores.
#
# Steps (each one's failure is reported, the others still run), a tiny GLM (hidden 64, 2 layers), 2 processes x
# batch 2, 4 steps, learning rate 1e-3 (so the adapter moves well past float noise), checkpoints at 2 and 4:
#   ddp        torchrun --nproc_per_node 2, no DeepSpeed: the reference adapter
#   z3         torchrun ... --deepspeed examples/deepspeed/ds_z3_config.json
#   z3_resume  z3's checkpoint-2 copied to a new directory and resumed to step 4: must equal z3
#   z3_offload ds_z3_offload_config.json (parameters and optimizer state on CPU, DeepSpeedCPUAdam)
#   z2, z2_offload
#   acc_z3     accelerate launch --config_file examples/accelerate/deepspeed_zero3.yaml --num_processes 2
# Checks: every run exits 0 and logs its losses; checkpoint-2 holds DeepSpeed's global_step2 with one ZeRO partition
# per rank (stage read from the optimizer state); the adapter has the reference's tensors, none empty (ZeRO-3
# partitions parameters: a gathered save is the point); max |adapter - DDP adapter| within 1% of the largest LoRA
# change (reduce-scatter and all-reduce sum in different orders; Adam's first steps amplify such differences).
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DATA=$(realpath "${1:-$ROOT/../shared/data/alpaca/alpaca_zh_demo.json}")
PY=${PYTHON:-$ROOT/.venv/bin/python}
WORK=${WORK:-$(mktemp -d /tmp/glmtune-deepspeed-check.XXXXXX)}
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
       HF_HOME=$WORK/hf_home
cd "$ROOT"
mkdir -p "$WORK"
RESULTS=$WORK/results.tsv; : > "$RESULTS"
echo "work directory: $WORK"
$PY -c "import deepspeed, torch, transformers, accelerate, peft
from deepspeed.accelerator import get_accelerator as g
print('deepspeed', deepspeed.__version__, '| accelerator', g()._name, g().communication_backend_name(), '| torch',
      torch.__version__, '| transformers', transformers.__version__, '| accelerate', accelerate.__version__)" \
    2>&1 | grep -v WARNING || { echo "deepspeed does not import (see this script's header)"; exit 1; }

port=29600
step() {  # step NAME COMMAND...: runs it with a time limit, records its exit code and seconds, never stops the script
    local name=$1 start rc; shift
    start=$(date +%s)
    timeout 900 "$@" > "$WORK/$name.log" 2>&1; rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - start ))" >> "$RESULTS"
    echo "== $name: rc $rc in $(( $(date +%s) - start )) s (log: $WORK/$name.log)"
    [ "$rc" = 0 ] || grep -v "FutureWarning\|return func" "$WORK/$name.log" | tail -15 | sed 's/^/   | /'
}
TRAIN=(-m glmtune train --dataset_path "$DATA" --model "$WORK/model" --max_seq_length 256 --learning_rate 1e-3
       --per_device_train_batch_size 2 --max_steps 4 --logging_steps 1 --save_steps 2 --seed 3)
TORCHRUN=($PY -m torch.distributed.run --nproc_per_node 2)

step model $PY - "$DATA" "$WORK/model" <<'EOF'
import sys
from pathlib import Path
from glmtune.models.tiny import build_tiny_glm
try:
    texts = [t for t in Path(sys.argv[1]).read_text(encoding="utf-8").splitlines() if t.strip()]
except UnicodeDecodeError:  # parquet: any text trains the tokenizer
    texts = []
build_tiny_glm(Path(sys.argv[2]), (texts or ["question answer"]) * 5, hidden_size=64, num_layers=2, vocab_size=500)
EOF
step ddp "${TORCHRUN[@]}" --master_port $((port + 1)) "${TRAIN[@]}" --output_dir "$WORK/ddp"
step z3 "${TORCHRUN[@]}" --master_port $((port + 2)) "${TRAIN[@]}" --output_dir "$WORK/z3" \
    --deepspeed examples/deepspeed/ds_z3_config.json
mkdir -p "$WORK/z3_resume" && cp -r "$WORK/z3/checkpoint-2" "$WORK/z3_resume/"
step z3_resume "${TORCHRUN[@]}" --master_port $((port + 3)) "${TRAIN[@]}" --output_dir "$WORK/z3_resume" \
    --resume_from_checkpoint true --deepspeed examples/deepspeed/ds_z3_config.json
step z3_offload "${TORCHRUN[@]}" --master_port $((port + 4)) "${TRAIN[@]}" --output_dir "$WORK/z3_offload" \
    --deepspeed examples/deepspeed/ds_z3_offload_config.json
step z2 "${TORCHRUN[@]}" --master_port $((port + 5)) "${TRAIN[@]}" --output_dir "$WORK/z2" \
    --deepspeed examples/deepspeed/ds_z2_config.json
step z2_offload "${TORCHRUN[@]}" --master_port $((port + 6)) "${TRAIN[@]}" --output_dir "$WORK/z2_offload" \
    --deepspeed examples/deepspeed/ds_z2_offload_config.json
step acc_z3 $PY -m accelerate.commands.launch --config_file examples/accelerate/deepspeed_zero3.yaml \
    --num_processes 2 --main_process_port $((port + 9)) "${TRAIN[@]}" --output_dir "$WORK/acc_z3"

$PY - "$WORK" <<'EOF'
import re, sys
from pathlib import Path
import torch
from safetensors.torch import load_file
work, ok = Path(sys.argv[1]), True
ref = load_file(str(work / "ddp" / "adapter_model.safetensors"))
# lora_B starts at zero: its values are the change itself
moved = max(v.abs().max().item() for k, v in ref.items() if "lora_B" in k)
print(f"\nlargest LoRA B value after 4 steps (DDP): {moved:.3g}")
print(f"{'run':<11} {'rc':>3} {'s':>4} {'losses':<29} {'checkpoint-2/global_step2':<26} {'adapter':<16} "
      "max|diff| vs DDP (relative)")
z3 = None
for line in (work / "results.tsv").read_text().splitlines():
    name, rc, seconds = line.split("\t")
    if name == "model":
        continue
    log = (work / f"{name}.log").read_text(errors="replace")
    losses = re.findall(r"'loss': '?([0-9.]+)", log)
    ckpt = work / name / "checkpoint-2" / "global_step2"
    zero = sorted(p.name for p in ckpt.glob("*optim_states.pt")) if ckpt.is_dir() else []
    stage = "-"
    if zero:
        states = torch.load(ckpt / zero[0], map_location="cpu", weights_only=False)
        stage = f"ZeRO {int(states['optimizer_state_dict']['zero_stage'])}, {len(zero)} partitions"
    try:
        a = load_file(str(work / name / "adapter_model.safetensors"))
    except Exception:  # noqa: BLE001 - a missing or unreadable adapter is reported as such
        a = {}
    shapes_ok = a.keys() == ref.keys() and all(a[k].shape == ref[k].shape and a[k].numel() > 0 for k in ref)
    diff = max((a[k] - ref[k]).abs().max().item() for k in ref) if shapes_ok else float("nan")
    good = (rc == "0" and len(losses) >= (2 if name == "z3_resume" else 4) and shapes_ok
            and diff <= 0.01 * moved and (len(zero) == 2) == (name != "ddp"))
    ok &= good
    extra = ""
    if name == "z3":
        z3 = a
    if name == "z3_resume" and z3 and shapes_ok:
        resumed = max((a[k] - z3[k]).abs().max().item() for k in z3)
        extra = f"; vs uninterrupted z3: {resumed:.3g}"
        good &= resumed <= 1e-6 * max(moved, 1.0)
        ok &= good
    print(f"{name:<11} {rc:>3} {seconds:>4} {' '.join(losses):<29} {stage:<26} "
          f"{(f'{len(a)} tensors' if shapes_ok else 'MISSING/BAD'):<16} {diff:.3g} ({diff / moved:.2g}){extra}  "
          f"{'ok' if good else 'FAIL'}")
print("\nall checks passed" if ok else "\nSOME CHECKS FAILED")
sys.exit(0 if ok else 1)
EOF
