"""The Data page: a data file (the bundled demo data by default, or an upload) and a model; the dataset report of
`glmtune prepare --dry_run`, a length histogram against --max_seq_length, the first samples with their trained spans
highlighted, and the bad rows with their line and field."""

from __future__ import annotations

from typing import Any

import gradio as gr

from glmtune.board.command_line import shell_line
from glmtune.board.context import BoardContext
from glmtune.board.dataset_report import dataset_report, histogram, prepare_command, trained_spans
from glmtune.demo import demo_data_path
from glmtune.errors import UserError


def build(ctx: BoardContext) -> dict[str, Any]:
    """The page's components; returns the ones other pages read (the data file and model)."""
    t = ctx.labels
    with gr.Row():
        data_file = t.add(gr.Textbox, "data_file", value=str(demo_data_path()), elem_id="data-file", scale=3)
        upload = t.add(gr.File, "upload", file_types=[".json", ".jsonl", ".csv", ".parquet"], scale=1, height=120,
                       elem_id="data-upload")
    with gr.Row():
        model = t.add(gr.Textbox, "model", value="", placeholder="demo model", elem_id="data-model", scale=3)
        max_len = t.add(gr.Number, "max_seq_length", value=512, precision=0, minimum=2, elem_id="data-max-len")
        truncation = t.add(gr.Dropdown, "truncation", choices=["right", "left", "drop"], value="right")
    button = t.add(gr.Button, "report_button", attribute="value", variant="primary", elem_id="data-report-button")
    command = t.add(gr.Textbox, "command", interactive=False, buttons=["copy"], elem_id="data-command")
    report = t.add(gr.Textbox, "report", lines=12, interactive=False, elem_id="data-report")
    lengths = t.add(gr.BarPlot, "histogram", x="tokens", y="samples", color="vs max_seq_length", sort=None,
                    elem_id="data-histogram")
    samples = t.add(gr.HighlightedText, "samples", combine_adjacent=True, color_map={"trained": "green"},
                    elem_id="data-samples")
    bad = t.add(gr.Dataframe, "bad_rows", headers=["line", "problem"], interactive=False, elem_id="data-bad-rows")

    upload.upload(lambda f: f, inputs=upload, outputs=data_file)

    def show(path: str, model_name: str, max_seq_length: float, truncation_rule: str) -> tuple[Any, ...]:
        model_name = model_name.strip() or ctx.default_model()
        length = int(max_seq_length)
        line = shell_line(prepare_command(model_name, [path], length, truncation_rule))
        try:
            result = dataset_report(model_name, [path], length, truncation_rule)
        except UserError as e:
            return line, e.render(), None, [], []
        bins = histogram(result.lengths, length)
        import pandas as pd

        frame = pd.DataFrame([{"tokens": label, "samples": n, "vs max_seq_length": "over" if over else "within"}
                              for label, n, over in bins])
        spans: list[tuple[str, str | None]] = []
        for i, sample in enumerate(result.report.samples, start=1):
            spans += [(f"\n--- sample {i}\n", None), *trained_spans(sample)]
        rows = [[b.location, b.problem] for b in result.bad_rows]
        ordered = gr.BarPlot(value=frame, sort=[label for label, _, _ in bins])  # bins in length order, not by name
        return line, result.text, ordered, spans, rows

    button.click(show, inputs=[data_file, model, max_len, truncation],
                 outputs=[command, report, lengths, samples, bad])
    return {"data_file": data_file, "model": model, "max_seq_length": max_len}
