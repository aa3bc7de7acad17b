"""GRPO's learning signal on CPU: the tiny random GLM (the demo's, hidden 256, 4 layers) learns, through `glmtune grpo`
alone, to write tokens a reward function favours. The reward is the share of a completion's tokens whose id is even:
about 0.5 for the untrained model, with spread inside every group of completions (what GRPO's advantages need), and
reachable by a LoRA adapter in a few steps. A task in words (a number copied, an answer format) needs a model that
can already write; the tiny random one can't.

    .venv/bin/python bench/grpo_reward.py [--steps 24] [--learning_rate 2e-2] [--seed 42]

Prints the mean reward of each logged step (8 completions: 2 prompts x 4 generations of 6 tokens) and the seconds
each took.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from glmtune.cli import main as glmtune
from glmtune.demo import demo_data_path

REWARD = '''
def even_ids(completion_ids, **kwargs):
    """The share of the completion's tokens whose id is even."""
    return [sum(1 for i in ids if i % 2 == 0) / max(len(ids), 1) for ids in completion_ids]
'''


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--learning_rate", default="2e-2")
    parser.add_argument("--seed", default="42")
    args = parser.parse_args()
    from glmtune.models.tiny import build_tiny_glm

    rows = json.loads(demo_data_path().read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        texts = [row[k] for row in rows for k in ("instruction", "input", "output") if row[k]] * 4
        model = build_tiny_glm(work / "model", texts)
        (work / "reward.py").write_text(REWARD, encoding="utf-8")
        sums = [{"instruction": f"What is {a} plus {b}?", "input": "", "output": str(a + b)}
                for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]]
        (work / "sums.json").write_text(json.dumps(sums), encoding="utf-8")
        start = time.perf_counter()
        code = glmtune(["grpo", "--model", str(model), "--dataset_path", str(work / "sums.json"),
                        "--output_dir", str(work / "run"), "--reward_funcs", f"{work / 'reward.py'}:even_ids",
                        "--num_generations", "4", "--max_completion_length", "6", "--per_device_train_batch_size",
                        "8", "--max_steps", str(args.steps), "--logging_steps", "1", "--precision", "fp32",
                        "--save_steps", str(args.steps), "--learning_rate", args.learning_rate, "--seed", args.seed,
                        "--quiet"])
        seconds = time.perf_counter() - start
        if code != 0:
            raise SystemExit(code)
        state = json.loads((work / "run" / "manifest.json").read_text(encoding="utf-8"))
        history = _history(work / "run", args.steps)
    print(f"\nstep  mean reward  step seconds   (seed {args.seed}, learning rate {args.learning_rate})")
    for step, (reward, step_time) in enumerate(history, start=1):
        print(f"{step:>4}  {reward:>11.3f}  {step_time:>12.1f}")
    print(f"first logged {state['first_logged_rewards']['reward']:.3f}, last logged "
          f"{state['last_logged_rewards']['reward']:.3f}; {seconds:.0f} s in all")


def _history(run: Path, steps: int) -> list[tuple[float, float]]:
    """(mean reward, step time) of each logged step, from the trainer state of the run's last checkpoint."""
    state = json.loads((run / f"checkpoint-{steps}" / "trainer_state.json").read_text(encoding="utf-8"))
    return [(entry["reward"], entry.get("step_time", float("nan"))) for entry in state["log_history"]
            if "reward" in entry]

if __name__ == "__main__":
    main()
