"""glmtune serve: answer OpenAI-style chat completion requests (streamed or not) with a base model and an optional
LoRA adapter, several adapters on one base (--adapter NAME=PATH, picked by each request's model), or a merged
model, on http://HOST:PORT/v1. Requests join a running batch and are generated together (up to --max_batch_size
answers, several adapters' in one); a bounded number wait, more are answered 429."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

from glmtune.arguments import API_KEY_ENV, ModelArguments, ServeArguments
from glmtune.config import parse_arguments
from glmtune.serve.network import base_url, listen

if TYPE_CHECKING:
    import uvicorn

logger = logging.getLogger(__name__)


def main(argv: list[str], defaults: dict[str, Any] | None = None) -> None:
    model_args, args = parse_arguments("glmtune serve", [ModelArguments, ServeArguments], argv, defaults,
                                       description=__doc__)
    run(model_args, args)


def run(model_args: ModelArguments, args: ServeArguments) -> None:
    server, listener = build_server(model_args, args)
    try:
        server.run(sockets=[listener])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C once it has shut down: the normal way to stop a server
        pass
    logger.info("Server stopped.")


def build_server(model_args: ModelArguments, args: ServeArguments) -> tuple[uvicorn.Server, socket.socket]:
    """The uvicorn server over the loaded model and the socket it is to serve on; says where, on stdout."""
    import uvicorn

    from glmtune.data.templates import thinking_switch
    from glmtune.inference.engine import Engine
    from glmtune.serve.adapters import load_adapters, parse_adapter_specs, served_models
    from glmtune.serve.app import create_app
    from glmtune.serve.batching import BatchLimits
    from glmtune.serve.intake import RequestLimits

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    listener = listen(args.host, args.port)  # before loading the model: a busy port fails in a second
    engine = Engine(model_args.model, args.peft_path, model_args.trust_remote_code, model_args.quantization_bit)
    thinking_switch(engine.tokenizer, args.enable_thinking)  # a template without the switch refuses the flag now
    name = args.served_model_name or served_name(args.peft_path, engine.model_name)
    specs = parse_adapter_specs(args.adapter or [])
    models = served_models(name, served_name(None, engine.model_name), bool(args.peft_path), specs)
    load_adapters(engine, specs)
    app = create_app(engine, name, api_key, args.max_queue, args.enable_thinking, RequestLimits.from_arguments(args),
                     models, BatchLimits.from_arguments(args))
    host, port = listener.getsockname()[:2]
    served = ", ".join(f"'{n}'" for n in models.names)
    print(f"Serving {served} at {base_url(host, port)} (OpenAI-compatible; Ctrl-C stops)", flush=True)
    if api_key is None and host not in ("127.0.0.1", "::1"):
        logger.warning(f"listening on {host} without an API key: anyone who can reach it can use it "
                       f"(set {API_KEY_ENV} or --api_key)")
    # timeout_graceful_shutdown: Ctrl-C waits this long for answers being streamed, then drops them.
    # uvicorn's access log follows glmtune's level (--log_level / --quiet).
    level = logging.getLevelName(logging.getLogger("glmtune").getEffectiveLevel()).lower()
    return uvicorn.Server(uvicorn.Config(app, log_level=level, timeout_graceful_shutdown=5)), listener


def served_name(peft_path: str | None, model_name: str) -> str:
    """The adapter directory's name, else a local model directory's name, else the hub name as it is."""
    if peft_path:
        return Path(peft_path).resolve().name
    return Path(model_name).resolve().name if Path(model_name).is_dir() else model_name
