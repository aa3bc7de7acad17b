"""glmtune chat and the engine's streaming: the same answers as `infer` (one-shot, and turn by turn with the
history written as `infer` would read it), /reset, /exit, end of input, Ctrl-C, the system prompt."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys

import pytest
from conftest import write_jsonl

from glmtune.demo import demo_data_path

SHORT_TRAIN = ["--per_device_train_batch_size", "8", "--learning_rate", "3e-3", "--lora_dropout", "0",
               "--save_strategy", "no", "--logging_steps", "2"]
GREEDY = ["--max_new_tokens", "24", "--temperature", "0"]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model):
    """A tiny adapter, trained for a few steps (enough to change the answers)."""
    from glmtune.cli import main

    tmp = tmp_path_factory.mktemp("chat")
    assert main(["prepare", "--jsonl_path", str(demo_data_path()), "--save_path", str(tmp / "data"),
                 "--model", str(tiny_model)]) == 0
    assert main(["train", "--dataset_path", str(tmp / "data"), "--output_dir", str(tmp / "run"),
                 "--max_steps", "4", *SHORT_TRAIN]) == 0
    return tmp / "run"


@pytest.fixture
def asked(monkeypatch):
    """Records each conversation the engine is asked to stream."""
    from glmtune.inference.engine import Engine

    conversations = []
    original = Engine.stream

    def stream(self, conversation, settings):
        conversations.append(conversation)
        return original(self, conversation, settings)

    monkeypatch.setattr(Engine, "stream", stream)
    return conversations


def infer_answer(cli, tmp_path, adapter, messages: list[dict]) -> str:
    """`glmtune infer`'s greedy answer to a conversation given as OpenAI-style messages."""
    data = write_jsonl(tmp_path / "conversation.jsonl", [{"messages": messages}])
    result = cli("infer", "--peft_path", adapter, "--input", data, *GREEDY)
    assert result.code == 0, result.err
    return json.loads(result.out)["response"]


def test_one_shot_prompt_answers_like_infer(cli, adapter, demo_rows):
    question = demo_rows[0]["instruction"]
    chat = cli("chat", "--peft_path", adapter, "--prompt", question, *GREEDY)
    infer = cli("infer", "--peft_path", adapter, "--prompt", question, *GREEDY)
    assert chat.code == infer.code == 0, chat.err
    assert chat.out == json.loads(infer.out)["response"] + "\n"


def test_several_prompts_are_answered_in_turn_as_one_conversation(cli, adapter, demo_rows, asked):
    q1, q2 = (row["instruction"] for row in demo_rows[:2])
    result = cli("chat", "--peft_path", adapter, "--prompt", q1, "--prompt", q2, *GREEDY)
    assert result.code == 0, result.err
    assert len(asked) == 2 and [(m.role, m.content) for m in asked[0].messages] == [("user", q1)]
    a1 = asked[1].messages[1].content  # the first answer, as the history holds it
    assert [(m.role, m.content) for m in asked[1].messages] == [("user", q1), ("assistant", a1), ("user", q2)]
    assert result.out.startswith(f"{a1}\n") and result.out.count("\n") >= 2  # both answers, the first first


def test_piped_session_keeps_the_history_until_reset(cli, adapter, demo_rows, monkeypatch, asked, tmp_path):
    q1, q2, q3 = (row["instruction"] for row in demo_rows[:3])
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{q1}\n{q2}\n/reset\n{q3}\n/exit\nnever asked\n"))
    result = cli("chat", "--peft_path", adapter, *GREEDY)
    assert result.code == 0, result.err
    assert [[m.content for m in c.messages][-1] for c in asked] == [q1, q2, q3]  # /exit: the last line unread
    a1 = infer_answer(cli, tmp_path, adapter, [{"role": "user", "content": q1}])
    assert [(m.role, m.content) for m in asked[1].messages] == [("user", q1), ("assistant", a1), ("user", q2)]
    # The second answer is the one `infer` gives to the same history, so the history reached the prompt.
    a2 = infer_answer(cli, tmp_path, adapter, [{"role": "user", "content": q1}, {"role": "assistant", "content": a1},
                                             {"role": "user", "content": q2}])
    assert a2 != infer_answer(cli, tmp_path, adapter, [{"role": "user", "content": q2}])  # history matters
    a3 = infer_answer(cli, tmp_path, adapter, [{"role": "user", "content": q3}])
    assert [(m.role, m.content) for m in asked[2].messages] == [("user", q3)]  # /reset forgot the rest
    assert result.out == f"{a1}\n{a2}\n{a3}\n"
    assert "[history cleared]" in result.err


def test_end_of_input_leaves_with_exit_code_0(cli, adapter, demo_rows, monkeypatch, asked):
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{demo_rows[0]['instruction']}\n\n/unknown\n"))  # no /exit
    result = cli("chat", "--peft_path", adapter, *GREEDY)
    assert result.code == 0, result.err
    assert len(asked) == 1  # the empty line and the unknown command ask nothing
    assert "unknown command /unknown" in result.err


def test_system_prompt_reaches_the_model(cli, adapter, demo_rows, asked, tmp_path):
    from glmtune.data.templates import encode_prompt
    from glmtune.models.loading import load_tokenizer

    question, system = demo_rows[0]["instruction"], "You are a terse financial assistant."
    result = cli("chat", "--peft_path", adapter, "--system", system, "--prompt", question, *GREEDY)
    assert result.code == 0, result.err
    prompt = load_tokenizer(str(adapter)).decode(encode_prompt(load_tokenizer(str(adapter)), asked[0]))
    assert prompt == f"[gMASK]<sop><|system|>\n{system}<|user|>\n{question}<|assistant|>"
    expected = infer_answer(cli, tmp_path, adapter, [{"role": "system", "content": system},
                                                     {"role": "user", "content": question}])
    assert result.out == expected + "\n"


def test_streamed_pieces_join_to_the_batched_answer_with_its_token_counts(adapter, demo_rows):
    import torch

    from glmtune.data.conversation import Conversation, Message
    from glmtune.data.templates import encode_prompt
    from glmtune.inference.engine import Engine, GenerationSettings

    engine = Engine(None, str(adapter))
    settings = GenerationSettings(max_new_tokens=32)
    conversations = [Conversation(messages=[Message("user", row["instruction"])]) for row in demo_rows[:4]]
    batched = engine.complete(conversations, settings, batch_size=4, progress=False)
    for conversation, expected in zip(conversations, batched, strict=True):
        stream = engine.stream(conversation, settings)
        pieces = list(stream)
        assert "".join(pieces) == expected.text  # Chinese answers: no character split between pieces
        assert stream.completion == expected
        assert expected.prompt_tokens == len(encode_prompt(engine.tokenizer, conversation))
        # Reference count: generate on this prompt alone stops right after its stop token (no padding).
        prompt = encode_prompt(engine.tokenizer, conversation)
        with torch.no_grad():
            new = engine.model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                        eos_token_id=engine.stop_ids)[0, len(prompt):].tolist()
        assert expected.completion_tokens == len(new)
        assert expected.finish_reason == ("stop" if new[-1] in engine.stop_ids else "length")


def test_ctrl_c_stops_the_answer_and_the_chat_goes_on(tiny_model):
    # The random base model's greedy answer runs to its budget without a stop token: long enough to interrupt.
    chat = subprocess.Popen([sys.executable, "-m", "glmtune", "chat", "--model", str(tiny_model),
                             "--max_new_tokens", "1500"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    chat.stdin.write("What is a bond?\n")
    chat.stdin.flush()
    assert chat.stdout.read(1)  # the answer has started streaming
    chat.send_signal(signal.SIGINT)
    out, err = chat.communicate("/exit\n", timeout=120)
    assert chat.returncode == 0, err
    assert "[answer stopped; it is left out of the history]" in err
    assert "Traceback" not in err


class TerminalOut(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_reasoning_is_shown_dimmed_on_a_terminal_and_kept_off_piped_output(capsys):
    from types import SimpleNamespace

    from glmtune.commands.chat import DIM, RESET, ChatSession
    from glmtune.inference.answers import AnswerParser
    from glmtune.inference.engine import GenerationSettings
    from glmtune.inference.streaming import count_completion

    answer = "\n<think>Two and two.</think>\nFour."

    class Stream:
        def __init__(self):
            self.parser, self.completion = AnswerParser("tagged"), None

        def deltas(self):
            splitter = self.parser.splitter()
            yield from splitter.deltas(answer[i:i + 4] for i in range(0, len(answer), 4))
            self.completion = count_completion(splitter.parts, 5, [1, 0], [0])

    engine = SimpleNamespace(stream=lambda conversation, settings: Stream(),
                             model=SimpleNamespace(config=SimpleNamespace(max_position_embeddings=4096)))
    session = ChatSession(engine, GenerationSettings(), None)
    terminal = TerminalOut()
    session.ask("2+2?", terminal)
    assert terminal.getvalue() == f"{DIM}Two and two.{RESET}\nFour.\n"
    assert session.history[-1].content == "Four." and session.history[-1].reasoning == "Two and two."
    piped = io.StringIO()
    session.ask("2+2?", piped)
    assert piped.getvalue() == "Four.\n" and capsys.readouterr().err == "Two and two.\n"


def test_enable_thinking_is_refused_at_start_for_a_template_without_the_switch(cli, tiny_model):
    result = cli("chat", "--model", tiny_model, "--prompt", "hi", "--enable_thinking", "true")
    assert result.code == 2 and "has no thinking switch" in result.err
