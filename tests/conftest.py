"""Shared fixtures: a tiny GLM chat model built once per session, the CLI runner, the shared data folder."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # an accidental download must fail loudly
# A fresh HF_HOME per test session: prepare's cache (HF_HOME/glmtune/prepare) starts empty and stays private.
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="glmtune-test-hf-home-")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from glmtune.cli import main  # noqa: E402
from glmtune.demo import demo_data_path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="session")
def demo_rows() -> list[dict]:
    return json.loads(demo_data_path().read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, demo_rows) -> Path:
    """The demo's tiny random GLM (hidden 256, 4 layers) with a BPE tokenizer trained on the demo data."""
    from glmtune.models.tiny import build_tiny_glm

    texts = [row[k] for row in demo_rows for k in ("instruction", "input", "output") if row[k]] * 4
    return build_tiny_glm(tmp_path_factory.mktemp("tiny") / "model", texts)


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED / "fixtures").is_dir():
        pytest.skip(f"the shared folder {SHARED} is absent")
    return SHARED


@pytest.fixture(scope="session")
def glm45_tokenizer_dir(tmp_path_factory) -> Path:
    """A GLM-4.5 tokenizer directory (GLM-4-9B-chat's ranks + GLM-4.5's special tokens, a glm4_moe config naming
    its stop ids) carrying the official GLM-4.6 chat template: usable as --model for prepare."""
    template, ranks = SHARED / "templates" / "glm-4.6.jinja", SHARED / "tokenizers" / "glm-4-9b-chat"
    if not (template.is_file() and ranks.is_dir()):
        pytest.skip(f"the reference template or GLM-4-9B-chat's tokenizer is absent from {SHARED}")
    from glmtune.models.tiny_glm45 import build_glm45_test_tokenizer

    return build_glm45_test_tokenizer(tmp_path_factory.mktemp("glm45") / "tokenizer", ranks,
                                      template.read_text(encoding="utf-8"))


@pytest.fixture
def shared() -> Path:
    if not (SHARED / "data").is_dir():
        pytest.skip(f"the shared data folder {SHARED} is absent")
    return SHARED


class CliResult:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err


@pytest.fixture
def cli(capsys):
    """Run `glmtune ARGS...` in this process; returns exit code and captured output."""

    def run(*args: str) -> CliResult:
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse's own errors
            code = e.code
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def write_json(path: Path, rows) -> Path:
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def with_thinking_template(model: Path, destination: Path) -> Path:
    """A copy of `model` whose chat template is the official GLM-4.6 one (thinking switch, XML tool calls); skips
    the test when ../shared is absent."""
    import shutil

    template = SHARED / "templates" / "glm-4.6.jinja"
    if not template.is_file():
        pytest.skip(f"{template} is absent (../shared)")
    shutil.copytree(model, destination)
    shutil.copy(template, destination / "chat_template.jinja")
    return destination


def adapter_difference(run: Path, other: Path) -> float:
    """The largest absolute difference between two runs' saved adapters, over every tensor (both must hold the same
    tensors)."""
    from safetensors.torch import load_file

    a, b = (load_file(str(d / "adapter_model.safetensors")) for d in (run, other))
    assert a.keys() == b.keys()
    assert any(t.abs().max() > 0 for k, t in a.items() if "lora_B" in k)  # trained: lora_B starts at zero
    return max((a[k] - b[k]).abs().max().item() for k in a)


def cut_short_copy(run: Path, steps: tuple[int, ...], destination: Path, damage: str) -> None:
    """Copy `run`'s checkpoints at `steps` into `destination`, the last as a kill while writing it leaves it: the
    Trainer writes trainer_state.json last, so it is either missing ("trainer state missing") or cut short."""
    import shutil

    for step in steps:
        shutil.copytree(run / f"checkpoint-{step}", destination / f"checkpoint-{step}")
    state = destination / f"checkpoint-{steps[-1]}" / "trainer_state.json"
    if damage == "trainer state missing":
        state.unlink()
    else:
        state.write_text(state.read_text(encoding="utf-8")[:40], encoding="utf-8")


def stop_with_signal(signal_name: str, *args: str) -> tuple[int, str]:
    """Run `glmtune ARGS...` in a child process, send it `signal_name` once it has logged a loss (it must log every
    step), and wait for it: its exit code and stderr."""
    import signal
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-m", "glmtune", *map(str, args)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    for line in process.stdout:  # the Trainer prints each step's logged loss
        if "'loss'" in line:
            process.send_signal(getattr(signal, signal_name))
            break
    _, err = process.communicate(timeout=300)
    return process.returncode, err

# Small templates written for the tests, each reproducing what one official template does that the code must
# handle (docs/glm-models.md names the official templates they were checked against).
# GLM-Z1-0414: the tools in the system turn, a call written as `<|assistant|>NAME\n{arguments}` from the message's
# `metadata`, results as `observation` turns, reasoning dropped from every assistant turn it writes
# (`content.split('</think>')[-1]`), the think block opened by the prompt.
Z1_LIKE = ("[gMASK]<sop>{% if tools %}<|system|>\n{% for tool in tools %}## {{ tool.function.name }}\n{% endfor %}"
           "{% endif %}{% for m in messages %}{% set meta = m.get('metadata', '') %}"
           "{% set visible = m.content.split('</think>')[-1].strip() %}"
           "{% if m.role == 'user' %}<|user|>\n{{ m.content }}"
           "{% elif m.role == 'assistant' and meta %}<|assistant|>{{ meta }}\n{{ visible }}"
           "{% elif m.role == 'assistant' %}<|assistant|>\n{{ visible }}"
           "{% elif m.role == 'observation' %}<|observation|>\n{{ m.content }}{% endif %}{% endfor %}"
           "{% if add_generation_prompt %}<|assistant|>\n<think>{% endif %}")
# GLM-4.7: calls without newlines, `</think>` alone before an answer without reasoning, the prompt opening the think
# block (`</think>` instead with enable_thinking false).
GLM47_LIKE = ("[gMASK]<sop>{% for m in messages %}{% if m.role == 'user' %}<|user|>{{ m.content }}"
              "{% elif m.role == 'assistant' %}<|assistant|>{% if m.reasoning_content %}<think>"
              "{{ m.reasoning_content }}</think>{% else %}</think>{% endif %}{{ m.content }}"
              "{% for tc in m.tool_calls or [] %}<tool_call>{{ tc.function.name }}"
              "{% for k, v in tc.function.arguments.items() %}<arg_key>{{ k }}</arg_key><arg_value>{{ v }}</arg_value>"
              "{% endfor %}</tool_call>{% endfor %}{% elif m.role == 'tool' %}<|observation|><tool_response>"
              "{{ m.content }}</tool_response>{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>"
              "{{ '</think>' if enable_thinking is defined and not enable_thinking else '<think>' }}{% endif %}")
# GLM-4-9B-0414: the GLM-Z1 template without the think block in the generation prompt (the two share it).
GLM4_0414_LIKE = Z1_LIKE.replace("<|assistant|>\n<think>{% endif %}", "<|assistant|>{% endif %}")
