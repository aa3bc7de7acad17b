"""Where a server listens: the bound socket `serve` hands to uvicorn, and the base URL it announces."""

from __future__ import annotations

import socket

from glmtune.errors import UserError


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, for uvicorn to serve on (port 0: a free one, whose number is printed).

    Binding before the model loads makes a busy port fail in a second, not after minutes of loading.

    Raises:
        UserError: the host is no address of this machine, or the port is taken or not allowed.
    """
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as e:
        raise UserError(f"--host {host} is not an address this machine can listen on ({e.strerror})",
                        hint="use 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)") from None
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as e:
        listener.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}",
                        hint="choose another --port (0 picks a free one), or stop the program using it") from None
    listener.listen(128)
    return listener


def base_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}/v1" if ":" in host else f"http://{host}:{port}/v1"
