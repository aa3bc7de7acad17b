"""glmtune chat: talk in the terminal to a base model with an optional LoRA adapter, or to a merged model.
Answers stream as they are generated and the conversation is kept: /reset clears it, /exit or Ctrl-D leaves,
Ctrl-C stops an answer. --prompt TEXT answers once and exits (for scripts); several --prompt are answered in turn,
as one conversation."""

from __future__ import annotations

import json
import sys
from typing import IO, TYPE_CHECKING, Any

from glmtune.arguments import ChatArguments, ModelArguments
from glmtune.config import parse_arguments
from glmtune.data.conversation import Conversation, Message
from glmtune.errors import UserError

if TYPE_CHECKING:
    from glmtune.inference.answers import AnswerDelta
    from glmtune.inference.engine import Engine, GenerationSettings
    from glmtune.inference.streaming import Completion

MARKER = ">>> "
EXIT_COMMANDS = {"/exit", "/quit"}
DIM, RESET = "\033[2m", "\033[0m"  # ANSI: faint text, then back to normal
HELP = "/reset clears the history, /exit or Ctrl-D leaves, Ctrl-C stops an answer"


def main(argv: list[str], defaults: dict[str, Any] | None = None) -> None:
    model_args, args = parse_arguments("glmtune chat", [ModelArguments, ChatArguments], argv, defaults,
                                       description=__doc__)
    run(model_args, args)


def run(model_args: ModelArguments, args: ChatArguments) -> None:
    from transformers import set_seed

    from glmtune.inference.engine import Engine, GenerationSettings

    set_seed(args.seed)
    engine = Engine(model_args.model, args.peft_path, model_args.trust_remote_code, model_args.quantization_bit)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                  enable_thinking=args.enable_thinking)
    session = ChatSession(engine, settings, args.system)
    if args.prompt is not None:
        for prompt in args.prompt:
            session.ask(prompt, sys.stdout)
        return
    interact(session)


class ChatSession:
    """The conversation so far, and one answer at a time streamed to a text stream."""

    def __init__(self, engine: Engine, settings: GenerationSettings, system: str | None):
        self.engine, self.settings, self.system = engine, settings, system
        self.history: list[Message] = []
        if system or settings.enable_thinking is not None:
            self._check_prompt()

    def conversation(self, text: str) -> Conversation:
        """What the model is asked when the user says `text` next."""
        return Conversation(messages=[*self.history, Message("user", text)], system=self.system)

    def ask(self, text: str, out: IO[str]) -> None:
        """Stream the answer to `out`; the exchange joins the history once the answer is complete (an answer
        stopped by Ctrl-C is left out: the model never finished it)."""
        stream = self.engine.stream(self.conversation(text), self.settings)
        view = AnswerView(out)
        deltas = stream.deltas()
        try:
            for delta in deltas:
                view.show(delta)
        finally:
            deltas.close()  # a KeyboardInterrupt between two pieces stops the generation too
        view.end()
        completion = stream.completion
        calls = [{"name": c.name, "arguments": json.loads(c.arguments), "id": c.id} for c in completion.tool_calls]
        answer = Message("assistant", completion.text, reasoning=completion.reasoning, tool_call=calls or None)
        self.history += [Message("user", text), answer]
        self._warn_if_context_full(completion)

    def reset(self) -> None:
        self.history = []

    def _check_prompt(self) -> None:
        """Fail at start, not at the first question, when the chat template takes no system prompt or has no
        thinking switch."""
        from glmtune.data.templates import encode_prompt, thinking_switch

        thinking_switch(self.engine.tokenizer, self.settings.enable_thinking)
        try:
            encode_prompt(self.engine.tokenizer, self.conversation("?"))
        except UserError as e:
            raise UserError(f"--system: {e.message}", hint="leave --system out for this model") from None

    def _warn_if_context_full(self, completion: Completion) -> None:
        limit = getattr(self.engine.model.config, "max_position_embeddings", None)
        used = completion.prompt_tokens + completion.completion_tokens
        if limit and used >= 0.9 * limit:
            print(f"[the conversation uses {used} of the model's {limit} positions: /reset to start afresh]",
                  file=sys.stderr)


class AnswerView:
    """Writes a streamed answer: its text to `out`; its reasoning before it, dimmed on a terminal, else to stderr
    (so that piped output holds the answer alone); a tool call as one bracketed line."""

    def __init__(self, out: IO[str]):
        self.out, self.terminal = out, out.isatty()
        self._in_reasoning, self._wrote = False, False

    def show(self, delta: AnswerDelta) -> None:
        if delta.reasoning:
            if self.terminal:
                self._write(("" if self._in_reasoning else DIM) + delta.reasoning)
            else:
                sys.stderr.write(delta.reasoning)
            self._in_reasoning = True
            return
        self._close_reasoning()
        if delta.tool_call:
            call = delta.tool_call
            self._write(("\n" if self._wrote else "") + f"[tool call {call.name} {call.arguments}]")
        else:
            self._write(delta.content)

    def end(self) -> None:
        self._close_reasoning()
        self._write("\n")

    def _close_reasoning(self) -> None:
        if self._in_reasoning:
            if self.terminal:
                self._write(RESET + "\n")
            else:
                sys.stderr.write("\n")
            self._in_reasoning = False

    def _write(self, text: str) -> None:
        self._wrote = True
        self.out.write(text)
        self.out.flush()


def interact(session: ChatSession) -> None:
    """Read lines from stdin until /exit or its end. On a terminal a marker prompts for each line; from a pipe
    nothing but the answers is written to stdout."""
    stdin, stdout = sys.stdin, sys.stdout
    terminal = stdin.isatty()
    if terminal:
        import readline  # noqa: F401  # line editing and history for input()
    print(f"[{HELP}]", file=sys.stderr)
    while True:
        try:
            if terminal:
                line = input(MARKER)
            else:
                line = stdin.readline()
                if not line:
                    raise EOFError
        except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt leaves
            if terminal:
                stdout.write("\n")
            return
        text = line.strip()
        if text in EXIT_COMMANDS:
            return
        if text == "/reset":
            session.reset()
            print("[history cleared]", file=sys.stderr)
            continue
        if not text:
            continue
        if text.startswith("/") and " " not in text:
            print(f"[unknown command {text}: {HELP}]", file=sys.stderr)
            continue
        try:
            session.ask(text, stdout)
        except KeyboardInterrupt:
            stdout.write("\n")
            print("[answer stopped; it is left out of the history]", file=sys.stderr)
        except UserError as e:  # a problem with this one message: say so and keep the conversation going
            print(e.render(), file=sys.stderr)
