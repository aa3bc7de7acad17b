"""The seed's step 2, kept working: `python finetune.py --dataset_path data/alpaca --lora_rank 8
--per_device_train_batch_size 1 --max_steps 52000 --save_steps 1000 --save_total_limit 2 --learning_rate 2e-5
--logging_steps 50 --output_dir output [--fp16]`. It runs `glmtune train` on the model the dataset was
prepared with (THUDM/chatglm-6b when it came from tokenize_dataset_rows.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))  # works from a checkout without install

from glmtune.cli import run_command  # noqa: E402
from glmtune.commands import train  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_command(train.main, sys.argv[1:]))
