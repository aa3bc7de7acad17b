"""Where a command that listens (serve, board) takes connections; each words the help for what it serves."""

from __future__ import annotations

from dataclasses import dataclass

from glmtune.arguments.options import Options, option


@dataclass
class ListenArguments(Options):
    host: str = option("Address to listen on; 0.0.0.0 opens the server to other machines.", default="127.0.0.1")
    port: int = option("Port to listen on (0: any free port, printed at start).", default=8000)
