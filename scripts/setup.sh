#!/usr/bin/env bash
# Sets up glmtune's Python environment in .venv and installs glmtune into it (editable).
#
# - torch comes first, and the CPU build where there is no NVIDIA GPU: a plain `torch` requirement pulls a
#   multi-GB CUDA build from PyPI, which a CPU-only machine can't use.
# - The dependencies live in a shared environment keyed by a hash of the dependency lists, the Python version
#   and the torch variant, under ~/.cache/glmtune/envs (GLMTUNE_ENV_CACHE overrides). An unchanged dependency
#   list reuses the one built before (CI clones the project afresh each run); a changed one builds a new one.
# - .venv is this checkout's own small environment: it sees the shared one's packages through a .pth file
#   and holds glmtune installed in editable mode, so two checkouts never point one environment at each other.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_VERSION=$(grep -E '^torch==' requirements.txt | cut -d= -f3)

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  torch_variant=cuda
else
  torch_variant=cpu
fi

install_torch() {  # $1: the environment's python
  if [ "$torch_variant" = cuda ]; then
    "$1" -m pip install -q "torch==$TORCH_VERSION"  # PyPI's Linux build is the CUDA one
    return
  fi
  # CPU build: a wheel this machine's pip configuration already provides (find-links), else PyTorch's CPU
  # index. --no-deps: torch's own dependencies then come from PyPI with requirements.txt.
  "$1" -m pip install -q --no-deps --no-index "torch==$TORCH_VERSION" 2>/dev/null \
    || "$1" -m pip install -q --no-deps "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
}

key=$( { cat requirements.txt requirements-dev.txt requirements-board.txt; "$PYTHON" --version; echo "$torch_variant"; } \
       | sha256sum | cut -c1-16)
cache=${GLMTUNE_ENV_CACHE:-$HOME/.cache/glmtune/envs}
env_dir=$cache/$key

if [ ! -f "$env_dir/.complete" ]; then
  echo "setup: building the environment $env_dir (torch $TORCH_VERSION, $torch_variant build)"
  rm -rf "$env_dir"
  mkdir -p "$cache"
  "$PYTHON" -m venv "$env_dir"
  "$env_dir/bin/python" -m pip install -q --upgrade pip setuptools wheel
  install_torch "$env_dir/bin/python"
  "$env_dir/bin/python" -m pip install -q -r requirements.txt -r requirements-dev.txt -r requirements-board.txt
  touch "$env_dir/.complete"
else
  echo "setup: reusing the environment $env_dir (dependency lists unchanged)"
fi

shared_site=$("$env_dir/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ -L .venv ] || [ ! -f .venv/.glmtune-deps ] || [ "$(cat .venv/.glmtune-deps)" != "$env_dir" ]; then
  rm -rf .venv
  "$PYTHON" -m venv --without-pip .venv
  local_site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # addsitedir (not a plain path line) so that the shared environment's own .pth files are processed too.
  echo "import site; site.addsitedir('$shared_site')" > "$local_site/_glmtune_shared_env.pth"
  echo "$env_dir" > .venv/.glmtune-deps
fi
# pip runs from the shared environment but installs into .venv (--prefix), editable and without dependencies.
.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
echo "setup: ready (.venv/bin/glmtune; dependencies from $env_dir)"
