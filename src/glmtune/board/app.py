"""The board's page: one tab per step of the job, and the language switch above them."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any

from glmtune.errors import UserError

AUTH_ENV = "GLMTUNE_BOARD_AUTH"  # USER:PASS, so that a password need not appear in the process list


def parse_auth(value: str | None) -> tuple[str, str] | None:
    """USER:PASS as (user, password); None for none.

    Raises:
        UserError: no colon, or an empty user or password.
    """
    if not value:
        return None
    user, colon, password = value.partition(":")
    if not colon or not user or not password:
        found = "an empty user or password" if colon else "no colon"
        raise UserError(f"--auth (or {AUTH_ENV}): expected USER:PASS, got {found}", hint="--auth alice:s3cret")
    return user, password


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_exposure(host: str, auth: tuple[str, str] | None) -> None:
    """Listening beyond this machine needs a password: anyone who reaches the page can run commands here.

    Raises:
        UserError: a host that is not loopback, without --auth or GLMTUNE_BOARD_AUTH.
    """
    if auth is None and not is_loopback(host):
        raise UserError(f"--host {host} listens beyond this machine, and the board runs commands for whoever "
                        "reaches it: a password is required",
                        hint=f"pass --auth USER:PASS (or set {AUTH_ENV}), or keep --host 127.0.0.1")


def build_app(folder: Path, lang: str = "en") -> Any:
    """The Blocks app over the runs folder `folder`."""
    import gradio as gr

    from glmtune.board import page_chat, page_data, page_export, page_plan, page_train
    from glmtune.board.context import BoardContext
    from glmtune.board.i18n import LANGUAGES, Labeller
    from glmtune.board.runs import RunManager

    folder.mkdir(parents=True, exist_ok=True)
    labels = Labeller(lang)
    ctx = BoardContext(folder, RunManager(folder), labels)
    with gr.Blocks(title="glmtune board", analytics_enabled=False) as app:
        with gr.Row():
            labels.add(gr.Markdown, "title", attribute="value")
            language = labels.add(gr.Radio, "language", choices=list(LANGUAGES), value=lang, elem_id="language",
                                  scale=0, min_width=200)
        with labels.add(gr.Tab, "tab_data", elem_id="tab-data"):
            data = page_data.build(ctx)
        with labels.add(gr.Tab, "tab_train", elem_id="tab-train"):
            train = page_train.build(ctx, data)
        with labels.add(gr.Tab, "tab_chat", elem_id="tab-chat"):
            chat = page_chat.build(ctx, data)
        with labels.add(gr.Tab, "tab_plan", elem_id="tab-plan"):
            page_plan.build(ctx, data)
        with labels.add(gr.Tab, "tab_export", elem_id="tab-export"):
            page_export.build(ctx, data, chat)
        language.change(labels.relabel, inputs=language, outputs=labels.components())
        app.load(lambda: train["choices"](), outputs=train["runs"])
    return app


def launch(folder: Path, host: str, port: int, auth: tuple[str, str] | None, lang: str) -> None:
    """Serve the board until interrupted (never through a public share link)."""
    check_exposure(host, auth)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from an offline machine
    app = build_app(folder, lang)
    app.queue(default_concurrency_limit=4).launch(server_name=host, server_port=port, auth=auth, share=False,
                                                  inbrowser=False, show_error=True)
