"""Whether the Hugging Face hub can be used right now.

The gap this fills: offline, transformers and datasets retry the hub for about a minute before failing with a
generic message. We tell at once that the hub is off, so the caller can say what to pass instead.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse


def offline_reason(timeout: float = 3.0) -> str | None:
    """None when the hub can be reached, else why not (for an error message)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}:
        return "HF_HUB_OFFLINE is set"
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
        return None
    except OSError:
        return "the hub can't be reached"
