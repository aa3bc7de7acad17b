"""The Train page: the main options with glmtune's defaults, start, stop and resume; the run is the `glmtune METHOD`
command in its own process (runs.py), and the page shows its live log, progress with ETA and loss curve, read from
the files the run writes. Every browser sees the same runs: they live in the runs folder, not in the page."""

from __future__ import annotations

import json
import time
from typing import Any

import gradio as gr

from glmtune.board.command_line import METHODS, resume_command, shell_line, training_command
from glmtune.board.context import BoardContext
from glmtune.board.progress import log_lines, run_progress
from glmtune.board.runs import RUNNING
from glmtune.errors import UserError

LOG_TAIL_BYTES = 20_000
REFRESH_SECONDS = 1.0


def build(ctx: BoardContext, data: dict[str, Any]) -> None:
    t = ctx.labels
    with gr.Row():
        method = t.add(gr.Dropdown, "method", choices=list(METHODS), value="train", elem_id="train-method")
        name = t.add(gr.Textbox, "run_name", value=lambda: time.strftime("run-%Y%m%d-%H%M%S"), elem_id="train-name")
        gr.Textbox(str(ctx.folder), label=t("runs_folder"), interactive=False)
    with gr.Row():
        max_steps = t.add(gr.Number, "max_steps", value=-1, precision=0, elem_id="train-max-steps")
        epochs = t.add(gr.Number, "epochs", value=3, elem_id="train-epochs")
        batch = t.add(gr.Number, "batch_size", value=8, precision=0, minimum=1, elem_id="train-batch")
        lr = t.add(gr.Number, "learning_rate", value=2e-4, elem_id="train-lr")
    with gr.Row():
        rank = t.add(gr.Number, "lora_rank", value=8, precision=0, minimum=1)
        alpha = t.add(gr.Number, "lora_alpha", value=16)
        logging_steps = t.add(gr.Number, "logging_steps", value=10, precision=0, minimum=1, elem_id="train-log-steps")
        save_steps = t.add(gr.Number, "save_steps", value=500, precision=0, minimum=1, elem_id="train-save-steps")
        val_size = t.add(gr.Number, "val_size", value=0, minimum=0, elem_id="train-val-size")
    with gr.Row():
        start = t.add(gr.Button, "start", attribute="value", variant="primary", elem_id="train-start")
        stop = t.add(gr.Button, "stop", attribute="value", variant="stop", elem_id="train-stop")
        resume = t.add(gr.Button, "resume", attribute="value", elem_id="train-resume")
    command = t.add(gr.Textbox, "command", interactive=False, buttons=["copy"], elem_id="train-command")
    with gr.Row():
        runs = t.add(gr.Dropdown, "runs", choices=[], allow_custom_value=False, scale=3, elem_id="train-runs")
        refresh = t.add(gr.Button, "refresh", attribute="value", scale=1, elem_id="train-refresh")
    with gr.Row():
        status = t.add(gr.Textbox, "status", interactive=False, elem_id="train-status")
        progress = t.add(gr.Textbox, "progress", interactive=False, elem_id="train-progress", scale=3)
    curve = t.add(gr.LinePlot, "loss_curve", x="step", y="loss", color="split", elem_id="train-loss")
    log = t.add(gr.Textbox, "log", lines=12, max_lines=12, autoscroll=True, interactive=False, elem_id="train-log")

    def choices(selected: str | None = None) -> dict[str, Any]:
        found = ctx.runs.list()
        names = [r.name for r in found]
        return gr.update(choices=names, value=selected if selected in names else (names[0] if names else None))

    def start_run(method_name: str, run_name: str, data_file: str, model_name: str, max_len: float, steps: float,
                  n_epochs: float, batch_size: float, learning_rate: float, lora_rank: float, lora_alpha: float,
                  log_every: float, save_every: float, validation: float) -> tuple[Any, str]:
        options = {"model": model_name.strip() or ctx.default_model(), "dataset_path": data_file,
                   "output_dir": str(ctx.folder / run_name), "max_seq_length": int(max_len),
                   "max_steps": int(steps), "num_train_epochs": n_epochs,
                   "per_device_train_batch_size": int(batch_size), "learning_rate": learning_rate,
                   "lora_rank": int(lora_rank), "lora_alpha": lora_alpha, "logging_steps": int(log_every),
                   "save_steps": int(save_every), "val_size": validation or None}
        if validation:
            options |= {"eval_strategy": "steps", "eval_steps": int(log_every)}
        argv = training_command(method_name, options)
        try:
            ctx.runs.start(run_name, argv)
        except UserError as e:
            raise gr.Error(e.render()) from e
        return choices(run_name), shell_line(argv)

    def resume_run(run_name: str | None) -> tuple[Any, str]:
        if not run_name:
            raise gr.Error("choose a run to resume")
        try:
            argv = json.loads((ctx.runs.record_dir(run_name) / "command.json").read_text(encoding="utf-8"))["argv"]
        except (OSError, ValueError, KeyError) as e:
            raise gr.Error(f"{run_name} was not started from the board: resume it with its own command") from e
        argv = resume_command(argv)
        try:
            ctx.runs.start(run_name, argv, resume=True)
        except UserError as e:
            raise gr.Error(e.render()) from e
        return choices(run_name), shell_line(argv)

    def stop_run(run_name: str | None) -> str:
        if run_name and ctx.runs.stop(run_name):
            return "stopping: a checkpoint at the end of this step"
        return ctx.runs.status(run_name) if run_name else ""

    def view(run_name: str | None) -> tuple[Any, ...]:
        if not run_name:
            return "", "", None, "", gr.skip()
        run = ctx.runs.run(run_name)
        text = ctx.runs.log(run_name)
        state = run_progress(run.output_dir, text)
        import pandas as pd

        points = [{"step": s, "loss": v, "split": "train"} for s, v in state.train_loss]
        points += [{"step": s, "loss": v, "split": "eval"} for s, v in state.eval_loss]
        frame = pd.DataFrame(points, columns=["step", "loss", "split"])
        log_tail = "\n".join(log_lines(text[-LOG_TAIL_BYTES:]))
        return run.status, state.summary(), frame, log_tail, run.command or gr.skip()

    inputs = [method, name, data["data_file"], data["model"], data["max_seq_length"], max_steps, epochs, batch, lr,
              rank, alpha, logging_steps, save_steps, val_size]
    start.click(start_run, inputs=inputs, outputs=[runs, command])
    resume.click(resume_run, inputs=runs, outputs=[runs, command])
    stop.click(stop_run, inputs=runs, outputs=status)
    refresh.click(lambda selected: choices(selected), inputs=runs, outputs=runs)
    views = [status, progress, curve, log, command]
    runs.change(view, inputs=runs, outputs=views)
    known = gr.State([])  # the run names this browser lists: a run started elsewhere appears without a refresh

    def tick(run_name: str | None, listed: list[str]) -> tuple[Any, ...]:
        found = ctx.runs.list()
        names = [r.name for r in found]
        if names == listed:
            return gr.skip(), listed, *view(run_name)
        selected = run_name if run_name in names else (names[0] if names else None)
        started = [r.name for r in found if r.name not in listed and r.status == RUNNING]
        if started and (selected is None or ctx.runs.status(selected) != RUNNING):
            selected = started[0]  # a run started elsewhere is shown, unless this browser watches one running
        return gr.update(choices=names, value=selected), names, *view(selected)

    gr.Timer(REFRESH_SECONDS).tick(tick, inputs=[runs, known], outputs=[runs, known, *views], show_progress="hidden")
    return {"runs": runs, "choices": choices}
