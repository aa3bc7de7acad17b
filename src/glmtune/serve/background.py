"""A uvicorn server on a background thread of this process: for tests and benchmarks that talk to `serve`'s app
over real HTTP without a subprocess."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from glmtune.serve.network import listen

if TYPE_CHECKING:
    import uvicorn
    from fastapi import FastAPI


@contextlib.contextmanager
def running(app: FastAPI) -> Iterator[str]:
    """Serve `app` on a free local port; yields its base URL (without /v1)."""
    import uvicorn

    with serving(uvicorn.Server(uvicorn.Config(app, log_level="warning")), listen("127.0.0.1", 0)) as url:
        yield url


@contextlib.contextmanager
def serving(server: uvicorn.Server, listener: socket.socket) -> Iterator[str]:
    """Run a uvicorn server on an already bound socket until the block ends."""
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
