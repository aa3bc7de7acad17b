"""The seed's step 1, kept working: `python tokenize_dataset_rows.py --jsonl_path DATA --save_path DIR
--max_seq_length 512` (--data is the same as --jsonl_path). It runs `glmtune prepare`; the model defaults to
THUDM/chatglm-6b, as in the seed."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))  # works from a checkout without install

from glmtune.arguments import SEED_MODEL  # noqa: E402
from glmtune.cli import run_command  # noqa: E402
from glmtune.commands import prepare  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_command(prepare.main, sys.argv[1:], defaults={"model": SEED_MODEL}))
