"""Kill-and-resume trials: a run killed with SIGKILL at random moments, some of them while a checkpoint is being
written, and restarted with `--resume_from_checkpoint true` until it completes, must end with the adapter of the run
never interrupted (fp32, same seed, same data order: within 1e-6).

    .venv/bin/python bench/kill_resume.py [--method train|dpo] [--trials 8] [--steps 12] [--seed 0]

A tiny GLM (hidden 64, one layer), LoRA with dropout (so the random state must be restored too), batch 4 over 16
rows (4 steps an epoch: resumes land mid-epoch and across epochs), a checkpoint every step. Each trial kills the run
once or twice: at a random moment of a random step (the final save included), or the instant a chosen checkpoint-N
directory appears (then at once or a few milliseconds later: during the checkpoint's write). After each kill the
bench records where it landed (the last complete checkpoint, and the files missing from a checkpoint cut short) by
comparing with a checkpoint of the uninterrupted run, not with glmtune's own checks.

Prints one line per kill, then the trials, kills, kills during a checkpoint write, and the largest difference between
a trial's final adapter and the uninterrupted one. Exits 1 if any trial differs by more than 1e-6.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

TOLERANCE = 1e-6
ROWS = 16
BATCH = 4
# One thread per process: the same arithmetic in every run, whatever else the machine is doing.
# Unbuffered: each logged step reaches the bench as it is printed.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}
PREFERENCE_DEMO = Path(__file__).resolve().parents[2] / "shared" / "data" / "preference" / "dpo_en_demo.json"


def build_inputs(tmp: Path, method: str) -> Path:
    """A tiny GLM and a prepared dataset of ROWS rows (supervised rows for train, preference pairs for dpo)."""
    from glmtune.cli import main
    from glmtune.models.tiny import build_tiny_glm

    if method == "train":
        rows = [{"prompt": f"question {i}", "completion": f"answer {i} is {i * 7 % 13}"} for i in range(ROWS)]
        texts = [r["prompt"] + " " + r["completion"] for r in rows] * 5
    else:
        if not PREFERENCE_DEMO.is_file():
            sys.exit(f"--method dpo needs {PREFERENCE_DEMO} (../shared)")
        rows = [r for r in json.loads(PREFERENCE_DEMO.read_text(encoding="utf-8"))
                if len(r["conversations"]) == 1][:ROWS]
        texts = [m["value"] for r in rows for m in (*r["conversations"], r["chosen"], r["rejected"])]
    model = build_tiny_glm(tmp / "model", texts, hidden_size=64, num_layers=1, vocab_size=600)
    (tmp / "rows.json").write_text(json.dumps(rows), encoding="utf-8")
    with contextlib.redirect_stdout(io.StringIO()):  # the dataset report
        code = main(["prepare", "--jsonl_path", str(tmp / "rows.json"), "--save_path", str(tmp / "data"), "--model",
                     str(model), "--max_seq_length", "96", "--quiet"])
    if code != 0:
        sys.exit("prepare failed")
    return tmp / "data"


class Run:
    """One `glmtune <method>` process, its stdout read by a thread that counts the logged steps."""

    def __init__(self, command: list[str]):
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        self.logged = 0
        self.ended = False
        self.progress = threading.Condition()
        self.stderr: list[str] = []
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=lambda: self.stderr.extend(self.process.stderr), daemon=True).start()

    def _read_stdout(self) -> None:
        for line in self.process.stdout:
            if "'loss'" in line:
                with self.progress:
                    self.logged += 1
                    self.progress.notify_all()
        with self.progress:
            self.ended = True
            self.progress.notify_all()

    def wait_logged(self, count: int) -> None:
        """Until `count` steps were logged (or the process ended)."""
        with self.progress:
            self.progress.wait_for(lambda: self.logged >= count or self.ended)

    def wait(self) -> int:
        code = self.process.wait()
        self.wait_logged(sys.maxsize)  # the pipes drained
        return code


def complete_steps(output_dir: Path, reference: set[str]) -> tuple[int, dict[str, list[str]]]:
    """The last checkpoint holding every file the reference checkpoint holds (trainer_state.json whole), and what
    each checkpoint cut short lacks."""
    last, cut = 0, {}
    for checkpoint in sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])):
        missing = sorted(reference - {p.name for p in checkpoint.iterdir()})
        if not missing:
            try:
                json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
            except ValueError:
                missing = ["trainer_state.json (cut short)"]
        if missing:
            cut[checkpoint.name] = missing
        else:
            last = int(checkpoint.name.split("-")[1])
    return last, cut


def kill_once(command: list[str], output_dir: Path, rng: random.Random, steps: int, step_seconds: float,
              reference: set[str]) -> tuple[str, bool] | None:
    """Start the run, SIGKILL it at a random moment. Where the kill landed and whether it cut a checkpoint short (one
    that was not there, or not so, before this run), or None if the run ended first."""
    done, cut_before = complete_steps(output_dir, reference) if output_dir.is_dir() else (0, {})
    # Past every checkpoint directory already there (one cut short by an earlier kill is rewritten in place).
    written = max((int(p.name.split("-")[1]) for p in output_dir.glob("checkpoint-*")), default=0)
    during_write = rng.random() < 0.5 and written < steps
    run = Run(command)
    if during_write:
        target = output_dir / f"checkpoint-{rng.randint(written + 1, steps)}"
        # At once (nothing in it yet), or within the few milliseconds its files take to write.
        delay = rng.choice([0.0, rng.uniform(0, 0.005), rng.uniform(0.005, 0.03)])
        while not target.exists() and run.process.poll() is None:
            time.sleep(0.0005)
        how = f"as {target.name} appeared" + (f" +{delay * 1000:.1f} ms" if delay else "")
    else:
        logged = rng.randint(1, max(steps - done, 1))
        delay = rng.uniform(0, step_seconds)
        run.wait_logged(logged)
        how = f"{delay:.2f} s after its logged step {done + logged}"
    time.sleep(delay)
    if run.process.poll() is not None:
        return None
    run.process.kill()
    run.wait()
    last, cut = complete_steps(output_dir, reference)
    cut_now = {name: missing for name, missing in cut.items() if cut_before.get(name) != missing}
    landed = f"killed {how}: last complete checkpoint-{last}"
    if cut_now:
        landed += "; cut short: " + "; ".join(f"{n} without {', '.join(m)}" for n, m in cut_now.items())
    if (output_dir / ".final.tmp").exists():
        landed += "; during the final save"
    return landed, bool(cut_now)


def max_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    if x.keys() != y.keys():
        return float("inf")
    return max((x[k] - y[k]).abs().max().item() for k in x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=["train", "dpo"], default="train")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments (training's seed is fixed)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="kill_resume_"))
    data = build_inputs(tmp, args.method)
    flags = ["--dataset_path", str(data), "--max_steps", str(args.steps), "--save_steps", "1", "--seed", "42",
             "--per_device_train_batch_size", str(BATCH), "--logging_steps", "1", "--learning_rate", "5e-3",
             "--precision", "fp32", "--disable_tqdm", "true"]
    glmtune = [sys.executable, "-m", "glmtune", args.method, *flags]

    full = tmp / "full"
    run = Run([*glmtune, "--output_dir", str(full)])
    run.wait_logged(1)
    started = time.perf_counter()
    run.wait_logged(args.steps)
    step_seconds = (time.perf_counter() - started) / max(args.steps - 1, 1)
    if run.wait() != 0:
        sys.exit("the uninterrupted run failed:\n" + "".join(run.stderr)[-3000:])
    reference = {p.name for p in (full / "checkpoint-1").iterdir()}
    print(f"{args.method}: {args.steps} steps of {step_seconds:.2f} s (checkpoint included) in the uninterrupted run; "
          f"a checkpoint holds {', '.join(sorted(reference))}")

    kills = during_write = fresh_starts = 0
    worst = 0.0
    for trial in range(1, args.trials + 1):
        out = tmp / f"trial-{trial}"
        resume = []
        for _ in range(rng.randint(1, 2)):
            killed = kill_once([*glmtune, "--output_dir", str(out), *resume], out, rng, args.steps, step_seconds,
                               reference)
            if killed is None:
                print(f"trial {trial}: the run ended before the kill")
                break
            kills += 1
            during_write += killed[1]
            print(f"trial {trial}: {killed[0]}")
            resume = ["--resume_from_checkpoint", "true"]
            if complete_steps(out, reference)[0] == 0:
                # Killed before its first checkpoint: resume refuses (no complete checkpoint), its hint says to
                # start afresh.
                fresh_starts += 1
                resume = ["--overwrite_output_dir", "true"]
        restart = Run([*glmtune, "--output_dir", str(out), *resume])
        if restart.wait() != 0:
            sys.exit(f"trial {trial}: the restarted run failed:\n" + "".join(restart.stderr)[-3000:])
        difference = max_difference(full, out)
        steps = json.loads((out / "manifest.json").read_text(encoding="utf-8"))["global_step"]
        print(f"trial {trial}: resumed to step {steps}, max |adapter - uninterrupted| = {difference:.3g}")
        worst = max(worst, difference if steps == args.steps else float("inf"))
        shutil.rmtree(out)

    print(f"\ntrials {args.trials}, kills {kills} ({during_write} during a checkpoint write, {fresh_starts} before "
          f"the first checkpoint), largest difference to the uninterrupted adapter {worst:.3g} "
          f"(target {TOLERANCE:g})")
    shutil.rmtree(tmp)
    sys.exit(0 if worst <= TOLERANCE else 1)


if __name__ == "__main__":
    main()
