"""The Plan page: the estimate of `glmtune plan` (run as its command) for the chosen model and options, as a bar chart
of where the memory goes next to the memory there is, with plan's own verdict and suggestions."""

from __future__ import annotations

from typing import Any

import gradio as gr

from glmtune.board.command_line import glmtune_command, shell_line
from glmtune.board.context import BoardContext
from glmtune.board.oneshot import stream_command
from glmtune.board.plan_output import read_plan


def plan_options(model: str, batch_size: int, max_seq_length: int, lora_rank: int, precision: str,
                 gradient_checkpointing: bool, device_memory_gib: float | None) -> dict[str, Any]:
    return {"model": model, "per_device_train_batch_size": batch_size, "max_seq_length": max_seq_length,
            "lora_rank": lora_rank, "precision": precision, "gradient_checkpointing": gradient_checkpointing,
            "device_memory_gib": device_memory_gib}


def build(ctx: BoardContext, data: dict[str, Any]) -> None:
    t = ctx.labels
    with gr.Row():
        batch = t.add(gr.Number, "batch_size", value=8, precision=0, minimum=1)
        rank = t.add(gr.Number, "lora_rank", value=8, precision=0, minimum=1)
        precision = gr.Dropdown(["fp32", "bf16", "fp16"], value="fp32", label="precision")
        checkpointing = gr.Checkbox(False, label="gradient_checkpointing")
        memory = t.add(gr.Number, "device_memory", value=0, minimum=0, elem_id="plan-memory")
    button = t.add(gr.Button, "plan_button", attribute="value", variant="primary", elem_id="plan-button")
    command = t.add(gr.Textbox, "command", interactive=False, buttons=["copy"], elem_id="plan-command")
    chart = t.add(gr.BarPlot, "memory", x="part", y="GiB", color="kind", sort=None, elem_id="plan-chart")
    text = t.add(gr.Textbox, "plan_text", lines=14, interactive=False, elem_id="plan-text")

    def estimate(model_name: str, max_len: float, batch_size: float, lora_rank: float, dtype: str,
                 recompute: bool, budget: float | None) -> tuple[Any, ...]:
        import pandas as pd

        options = plan_options(model_name.strip() or ctx.default_model(), int(batch_size), int(max_len),
                               int(lora_rank), dtype, recompute, budget or None)
        argv = glmtune_command("plan", options)
        *_, (printed, code) = stream_command(argv)  # plan answers at once: its last state is all the page shows
        figures = read_plan(printed)
        if code != 0 or figures.total is None:
            return shell_line(argv), None, printed
        rows = [{"part": part, "GiB": value, "kind": "estimate"} for part, value in figures.parts.items()]
        rows.append({"part": "total (peak)", "GiB": figures.total, "kind": "total"})
        if figures.device is not None:
            rows.append({"part": "device memory", "GiB": figures.device, "kind": "device"})
        chart = gr.BarPlot(value=pd.DataFrame(rows), sort=[row["part"] for row in rows])  # plan's order
        return shell_line(argv), chart, printed.strip()

    button.click(estimate, inputs=[data["model"], data["max_seq_length"], batch, rank, precision, checkpointing,
                                   memory], outputs=[command, chart, text])
