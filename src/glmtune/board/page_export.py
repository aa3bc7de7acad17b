"""The Evaluate & export page: `glmtune eval` with its metrics table, `glmtune merge` with its proof that the merged
model's logits match, and `glmtune convert`; each run as its command in a subprocess, its output shown live."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from glmtune.board.command_line import glmtune_command, shell_line
from glmtune.board.context import BoardContext
from glmtune.board.oneshot import stream_command
from glmtune.board.progress import log_lines


def build(ctx: BoardContext, data: dict[str, Any], chat: dict[str, Any]) -> None:
    t = ctx.labels
    with gr.Row():
        eval_data = t.add(gr.Textbox, "eval_data", value="", elem_id="export-eval-data", scale=3)
        out_dir = t.add(gr.Textbox, "export_dir", value=str(ctx.folder / "exports"), elem_id="export-dir")
    with gr.Row():
        eval_button = t.add(gr.Button, "eval_button", attribute="value", variant="primary", elem_id="export-eval")
        merge_button = t.add(gr.Button, "merge_button", attribute="value", elem_id="export-merge")
    with gr.Row():
        source = t.add(gr.Textbox, "convert_source", value="", elem_id="export-convert-source", scale=3)
        convert_button = t.add(gr.Button, "convert_button", attribute="value", elem_id="export-convert")
    command = t.add(gr.Textbox, "command", interactive=False, buttons=["copy"], elem_id="export-command")
    metrics = t.add(gr.Dataframe, "metrics", headers=["metric", "value"], interactive=False, elem_id="export-metrics")
    output = t.add(gr.Textbox, "output", lines=12, max_lines=20, autoscroll=True, interactive=False,
                   elem_id="export-output")

    def model_of(name: str) -> str:
        return name.strip() or ctx.default_model()

    def run(argv: list[str], metrics_file: Path | None = None) -> Iterator[tuple[Any, ...]]:
        line = shell_line(argv)
        yield line, gr.skip(), ""  # the previous command's output goes at once
        for printed, code in stream_command(argv):
            table = gr.skip()
            if code is not None and metrics_file is not None and code == 0 and metrics_file.is_file():
                values = json.loads(metrics_file.read_text(encoding="utf-8")).get("metrics", {})
                table = [[k, v] for k, v in values.items()]
            shown = "\n".join(log_lines(printed, last=500))  # each progress bar in its last state
            yield line, table, shown + (f"\n[exit code {code}]" if code is not None else "")

    def evaluate(model_name: str, adapter: str, dataset: str, folder: str) -> Iterator[tuple[Any, ...]]:
        target = Path(folder) / "eval"
        argv = glmtune_command("eval", {"model": model_of(model_name), "peft_path": adapter.strip() or None,
                                        "dataset": dataset.strip() or data_default(), "output_dir": str(target),
                                        "overwrite_output_dir": True})
        yield from run(argv, target / "metrics.json")

    def merge(model_name: str, adapter: str, folder: str) -> Iterator[tuple[Any, ...]]:
        if not adapter.strip():
            raise gr.Error("choose an adapter on the Chat page first")
        argv = glmtune_command("merge", {"model": model_of(model_name), "peft_path": adapter.strip(),
                                         "output_dir": str(Path(folder) / "merged"), "overwrite_output_dir": True})
        yield from run(argv)

    def convert(checkpoint: str, folder: str) -> Iterator[tuple[Any, ...]]:
        if not checkpoint.strip():
            raise gr.Error("name the THUDM checkpoint directory to convert")
        argv = glmtune_command("convert", {"model": checkpoint.strip(),
                                           "output_dir": str(Path(folder) / "converted"), "overwrite_output_dir": True})
        yield from run(argv)

    def data_default() -> str:
        from glmtune.demo import demo_data_path

        return str(demo_data_path())

    outputs = [command, metrics, output]
    eval_button.click(evaluate, inputs=[data["model"], chat["adapter"], eval_data, out_dir], outputs=outputs)
    merge_button.click(merge, inputs=[data["model"], chat["adapter"], out_dir], outputs=outputs)
    convert_button.click(convert, inputs=[source, out_dir], outputs=outputs)
