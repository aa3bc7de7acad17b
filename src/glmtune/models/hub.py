"""Where a `--model` name points: a local directory, the local hub cache, or the hub itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from glmtune.artifacts import read_json_object
from glmtune.errors import UserError
from glmtune.hub import offline_reason

HINT = "pass --model PATH to a local model directory (for example the tiny one `glmtune demo` builds)"


def resolve_model(name: str) -> str:
    """The local path of `name`, or `name` itself when the hub will resolve it; a UserError when nothing can."""
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve())  # absolute: manifests and adapters must work from any directory
    if path.exists():
        raise UserError(f"--model {name} is a file; expected a model directory or a hub name", hint=HINT)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(f"model directory {name} does not exist", hint=HINT)
    snapshot = _cached_snapshot(name)
    if snapshot is not None:
        # The snapshot directory: glmtune reads a checkpoint's config.json itself to pick its native loader
        # (THUDM's ChatGLM layouts), which a bare hub name would hide.
        return str(snapshot)
    why = offline_reason()
    if why:
        raise UserError(f"model '{name}' is not in the local cache and {why}", hint=HINT)
    return name


def local_config(source: str) -> dict[str, Any] | None:
    """config.json of a local model directory, or None (a hub name, or no config)."""
    path = Path(source) / "config.json"
    return read_json_object(path, "model config") if path.is_file() else None


def canonical_model_name(name: str) -> str:
    """What to record of a --model value: the absolute path of a local directory, else the hub name."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name


def _cached_snapshot(repo_id: str) -> Path | None:
    """The local snapshot directory of a hub model whose config.json is in the cache, else None."""
    from huggingface_hub import try_to_load_from_cache

    try:
        config = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an invalid repo id is simply "not cached"
        return None
    return Path(config).parent if isinstance(config, str) else None
