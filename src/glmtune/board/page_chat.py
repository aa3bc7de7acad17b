"""The Chat page: streaming answers from the tuned adapter (glmtune's inference engine), optionally beside the base
model's answer to the same prompt; system prompt and generation settings."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import gradio as gr

from glmtune.board.chat_engine import chat_command, conversation, stream_answer
from glmtune.board.command_line import shell_line
from glmtune.board.context import BoardContext
from glmtune.errors import UserError


def build(ctx: BoardContext, data: dict[str, Any]) -> dict[str, Any]:
    t = ctx.labels
    with gr.Row():
        adapter = t.add(gr.Textbox, "adapter", value="", elem_id="chat-adapter", scale=3)
        compare = t.add(gr.Checkbox, "compare_base", value=False, elem_id="chat-compare")
    system = t.add(gr.Textbox, "system", value="", elem_id="chat-system")
    with gr.Row():
        temperature = t.add(gr.Slider, "temperature", minimum=0, maximum=2, value=0, step=0.05)
        top_p = t.add(gr.Slider, "top_p", minimum=0.05, maximum=1, value=1, step=0.05)
        max_new = t.add(gr.Number, "max_new_tokens", value=128, precision=0, minimum=1, elem_id="chat-max-new")
    command = t.add(gr.Textbox, "command", interactive=False, buttons=["copy"], elem_id="chat-command")
    with gr.Row():
        # Plain text: exactly what the model said, as `glmtune chat` prints it.
        tuned_box = t.add(gr.Chatbot, "tuned", elem_id="chat-tuned", height=320, render_markdown=False)
        base_box = t.add(gr.Chatbot, "base", elem_id="chat-base", height=320, render_markdown=False)
    message = t.add(gr.Textbox, "message", elem_id="chat-message")
    with gr.Row():
        send = t.add(gr.Button, "send", attribute="value", variant="primary", elem_id="chat-send")
        clear = t.add(gr.Button, "clear", attribute="value", elem_id="chat-clear")

    def answer(text: str, tuned: list[dict[str, Any]], base: list[dict[str, Any]], model_name: str, peft_path: str,
               with_base: bool, system_prompt: str, temp: float, p: float, max_new_tokens: float
               ) -> Iterator[tuple[Any, ...]]:
        from glmtune.inference.engine import GenerationSettings

        if not text.strip():
            raise gr.Error("type a message first")
        model_name = model_name.strip() or ctx.default_model()
        peft = peft_path.strip() or None
        settings = GenerationSettings(max_new_tokens=int(max_new_tokens), temperature=temp, top_p=p)
        line = shell_line(chat_command(model_name, peft, system_prompt or None, temp, p, int(max_new_tokens)))
        sides = [(tuned, False)] + ([(base, True)] if with_base and peft else [])
        histories = [list(tuned), list(base)]
        for index, (history, as_base) in enumerate(sides):
            chat = conversation(history, text, system_prompt)
            histories[index] = [*history, {"role": "user", "content": text}, {"role": "assistant", "content": ""}]
            try:
                for so_far in stream_answer(model_name, peft, chat, settings, base=as_base):
                    histories[index][-1] = {"role": "assistant", "content": so_far}
                    yield "", histories[0], histories[1], line
            except UserError as e:
                raise gr.Error(e.render()) from e
        yield "", histories[0], histories[1], line

    inputs = [message, tuned_box, base_box, data["model"], adapter, compare, system, temperature, top_p, max_new]
    outputs = [message, tuned_box, base_box, command]
    send.click(answer, inputs=inputs, outputs=outputs)
    message.submit(answer, inputs=inputs, outputs=outputs)
    clear.click(lambda: ([], []), outputs=[tuned_box, base_box])
    return {"adapter": adapter}
