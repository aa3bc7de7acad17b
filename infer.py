"""The seed's step 3, kept working: `python infer.py --peft_path DIR --max_length 512 --temperature 0`.
It runs `glmtune infer`. As in the seed, without --prompt/--input it answers the seed's own four questions,
and without --model it uses the adapter's base model (THUDM/chatglm-6b when there is no adapter)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))  # works from a checkout without install

import yaml  # noqa: E402

from glmtune.arguments import SEED_MODEL  # noqa: E402
from glmtune.cli import run_command  # noqa: E402
from glmtune.commands import infer  # noqa: E402

SEED_PROMPTS = ["你能做什么呢？", "你是谁？", "可以写一首诗吗？", "你是谁开发的？"]


def given_options(argv: list[str]) -> set[str]:
    """The options set on the command line or in its --config YAML file."""
    flags = {arg.split("=")[0] for arg in argv}
    if "--config" in argv and argv.index("--config") + 1 < len(argv):
        config = Path(argv[argv.index("--config") + 1])
        values = yaml.safe_load(config.read_text(encoding="utf-8")) if config.is_file() else None
        flags |= {f"--{key}" for key in values} if isinstance(values, dict) else set()
    return flags


def seed_defaults(argv: list[str]) -> dict:
    defaults = {}
    flags = given_options(argv)
    if not {"--prompt", "--input"} & flags:
        defaults["prompt"] = SEED_PROMPTS
    if not {"--model", "--peft_path"} & flags:
        defaults["model"] = SEED_MODEL
    return defaults


if __name__ == "__main__":
    sys.exit(run_command(infer.main, sys.argv[1:], defaults=seed_defaults(sys.argv[1:])))
