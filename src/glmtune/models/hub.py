"""Where a `--model` name points: a local directory, the local hub cache, or the hub itself.

The gap this fills: offline, transformers retries the hub for about a minute before failing with a generic
message. We tell at once that the model is neither local nor reachable, and what to pass instead.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from glmtune.errors import UserError

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
    if _in_hub_cache(name):
        return name
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
    if offline or not _hub_reachable():
        why = "HF_HUB_OFFLINE is set" if offline else "the hub can't be reached"
        raise UserError(f"model '{name}' is not in the local cache and {why}", hint=HINT)
    return name


def canonical_model_name(name: str) -> str:
    """What to record of a --model value: the absolute path of a local directory, else the hub name."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an invalid repo id is simply "not cached"
        return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False
