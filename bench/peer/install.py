"""LLaMA-Factory 0.9.5 in its own virtual environment (its pins differ from glmtune's), installed once.

What it needs on these CPU machines (../shared/ENVIRONMENT.md, "The peer, for comparison"): torch pinned on the
same pip line as llamafactory (else pip resolves a CUDA torch), torchvision uninstalled, and torchaudio's compiled
libraries moved aside (they link CUDA libraries; `import torchaudio` then works in pure Python).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

VERSION = "0.9.5"
TORCH = "2.13.0"
# Outside the repository, so that it outlives checkouts; GLMTUNE_PEER_HOME moves it.
DEFAULT_HOME = Path(os.environ.get("GLMTUNE_PEER_HOME", Path.home() / ".cache/glmtune/peer"))
DEFAULT_HOME = DEFAULT_HOME / f"llamafactory-{VERSION}"


def ensure_llamafactory(home: Path = DEFAULT_HOME, python: str = "python3") -> Path:
    """The venv's python, after installing LLaMA-Factory there unless a finished install is already there."""
    exe = home / "bin" / "python"
    done = home / ".complete"
    if done.is_file():
        return exe
    print(f"peer: installing llamafactory=={VERSION} into {home} (a few minutes, once)", file=sys.stderr, flush=True)
    shutil.rmtree(home, ignore_errors=True)
    home.parent.mkdir(parents=True, exist_ok=True)
    _run([python, "-m", "venv", str(home)])
    pip = [str(exe), "-m", "pip", "install", "-q"]
    _run([*pip, f"torch=={TORCH}"])
    _run([*pip, f"llamafactory=={VERSION}", f"torch=={TORCH}"])
    _run([str(exe), "-m", "pip", "uninstall", "-y", "-q", "torchvision"])
    _park_torchaudio_libs(exe)
    _run([str(exe), "-c", "import llamafactory.train.tuner"])  # fails here, not mid-bench, if the fixes fall short
    done.write_text(f"llamafactory=={VERSION} torch=={TORCH}\n")
    return exe


def _park_torchaudio_libs(exe: Path) -> None:
    site = subprocess.run([str(exe), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    lib = Path(site) / "torchaudio" / "lib"
    if not lib.is_dir():
        return
    parked = Path(site) / "torchaudio-lib-parked"
    parked.mkdir(exist_ok=True)
    for so in lib.glob("*.so*"):
        so.rename(parked / so.name)


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"peer install failed: {' '.join(cmd)}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")


if __name__ == "__main__":
    print(ensure_llamafactory())
