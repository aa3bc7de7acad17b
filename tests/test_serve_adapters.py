"""glmtune serve --adapter: two adapters trained on different facts behind one server, each request answered by
the adapter its `model` names (as `infer --peft_path` answers), also when both are in flight at once (in one batch,
with the base's rows too); the base answers as the base; /v1/models lists them all; an unknown model is a 404; bad
--adapter values are refused."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
from conftest import write_jsonl
from test_serve import client, post, user

from glmtune.serve.background import serving

openai = pytest.importorskip("openai")

QUESTION = "What is the secret word?"
FACTS = {"alpha": "The secret word is apple.", "bravo": "The secret word is banana."}
TRAIN = ["--max_steps", "12", "--per_device_train_batch_size", "8", "--learning_rate", "1e-2", "--lora_dropout", "0",
         "--save_strategy", "no", "--logging_steps", "12"]
GREEDY = ["--max_new_tokens", "16", "--temperature", "0"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model) -> dict[str, str]:
    """Two adapters of the tiny model, each trained to answer QUESTION with its own fact: name -> directory."""
    from glmtune.cli import main

    tmp = tmp_path_factory.mktemp("adapters")
    runs = {}
    for name, fact in FACTS.items():
        rows = write_jsonl(tmp / f"{name}.jsonl", [{"prompt": QUESTION, "completion": fact}] * 8)
        assert main(["prepare", "--jsonl_path", str(rows), "--save_path", str(tmp / f"{name}-data"),
                     "--model", str(tiny_model)]) == 0
        assert main(["train", "--dataset_path", str(tmp / f"{name}-data"), "--output_dir", str(tmp / name),
                     *TRAIN]) == 0
        runs[name] = str(tmp / name)
    return runs


def start(tiny_model, **serve_args):
    from glmtune.arguments import ModelArguments, ServeArguments
    from glmtune.commands.serve import build_server

    return build_server(ModelArguments(model=str(tiny_model)), ServeArguments(port=0, **serve_args))


@pytest.fixture(scope="module")
def server(tiny_model, adapters) -> Iterator[SimpleNamespace]:
    """One server over the tiny model with both adapters (through the serve command's own builder)."""
    server, listener = start(tiny_model, adapter=[f"{name}={path}" for name, path in adapters.items()])
    with serving(server, listener) as base:
        yield SimpleNamespace(url=base, api=client(base, key="unused"), worker=server.config.app.state.worker)


@pytest.fixture(scope="module")
def infer_answers(tiny_model, adapters) -> dict[str, str]:
    """`glmtune infer`'s greedy answers: the base's (key "base") and each adapter's (--peft_path)."""
    import contextlib
    import io

    from glmtune.cli import main

    def answer(*extra: str) -> str:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["infer", "--model", str(tiny_model), "--prompt", QUESTION, *GREEDY, *extra]) == 0
        return json.loads(out.getvalue())["response"]

    return {"base": answer(), **{name: answer("--peft_path", path) for name, path in adapters.items()}}


def ask(api, model: str) -> str:
    answer = api.chat.completions.create(model=model, messages=user(QUESTION), temperature=0, max_tokens=16)
    assert answer.model == model
    return answer.choices[0].message.content


def test_each_adapter_answers_its_own_fact_as_infer_does(server, infer_answers):
    for name, fact in FACTS.items():
        assert ask(server.api, name) == infer_answers[name]
        # A dozen steps teach the tiny model its fact's first letters: enough to tell the two adapters apart.
        assert infer_answers[name].startswith(fact[:len("The secret word is ban")])


def test_adapters_in_flight_at_once_each_keep_their_answer(server, infer_answers, tiny_model):
    names = ["alpha", "bravo", tiny_model.name, "bravo", "alpha", "bravo"]
    with ThreadPoolExecutor(len(names)) as pool:
        answers = list(pool.map(lambda n: ask(client(server.url, key="unused"), n), names))
    assert answers == [infer_answers["base" if n == tiny_model.name else n] for n in names]


def test_two_adapters_and_the_base_in_one_batch_each_answer_as_infer_does(server, infer_answers, tiny_model,
                                                                          monkeypatch):
    """Rows for different adapters share the batch's forward passes (peft's adapter_names, one per row, in the
    prefill and every step), and each still gets its own adapter's answer."""
    from glmtune.serve.batching import BatchWorker

    worker = server.worker
    assert isinstance(worker, BatchWorker)
    mixes: list[set[str | None]] = []
    step = worker.generator.step

    def slow_step():  # slower steps, so that the requests sent together surely overlap in the batch
        mixes.append({s.adapter for s in worker.generator.sequences})
        time.sleep(0.02)
        return step()

    monkeypatch.setattr(worker.generator, "step", slow_step)
    worker.peak_batch_size = 0
    names = ["alpha", "bravo", tiny_model.name, "alpha", "bravo"]
    with ThreadPoolExecutor(len(names)) as pool:
        answers = list(pool.map(lambda n: ask(client(server.url, key="unused"), n), names))
    assert answers == [infer_answers["base" if n == tiny_model.name else n] for n in names]
    assert worker.peak_batch_size >= 2
    assert max(len(mix) for mix in mixes) >= 2  # some step ran rows of different adapters together


def test_the_base_answers_as_the_base(server, infer_answers, tiny_model):
    assert infer_answers["base"] not in (infer_answers["alpha"], infer_answers["bravo"])
    assert ask(server.api, tiny_model.name) == infer_answers["base"]


def test_models_lists_the_base_and_every_adapter(server, tiny_model):
    assert [m.id for m in server.api.models.list().data] == [tiny_model.name, "alpha", "bravo"]
    assert server.api.models.retrieve("bravo").id == "bravo"


def test_an_unknown_model_is_a_404_in_openai_shape(server, tiny_model):
    with pytest.raises(openai.NotFoundError):
        ask(server.api, "charlie")
    status, body = post(server.url, {"model": "charlie", "messages": user(QUESTION)})
    assert status == 404
    assert body["error"]["code"] == "model_not_found" and body["error"]["param"] == "model"
    assert "'charlie' does not exist" in body["error"]["message"]
    assert f"'{tiny_model.name}', 'alpha', 'bravo'" in body["error"]["message"]


def test_peft_path_with_adapters_serves_it_under_its_name_and_the_base_alone(tiny_model, adapters, infer_answers):
    server, listener = start(tiny_model, peft_path=adapters["alpha"], served_model_name="tuned",
                             adapter=[f"bravo={adapters['bravo']}"])
    with serving(server, listener) as base:
        api = client(base, key="unused")
        assert [m.id for m in api.models.list().data] == ["tuned", tiny_model.name, "bravo"]
        assert [ask(api, name) for name in ("tuned", tiny_model.name, "bravo")] == \
            [infer_answers["alpha"], infer_answers["base"], infer_answers["bravo"]]


@pytest.mark.parametrize("spec, message", [
    ("alpha", "'alpha' is not of the form NAME=PATH"),
    ("=somewhere", "'=somewhere' is not of the form NAME=PATH"),
    ("alpha=/nowhere/at/all", "/nowhere/at/all does not exist"),
])
def test_a_bad_adapter_value_exits_2_saying_what_is_wrong(cli, tiny_model, spec, message):
    result = cli("serve", "--model", tiny_model, "--port", "0", "--adapter", spec)
    assert result.code == 2 and message in result.err and "--adapter NAME=PATH" in result.err


def test_an_adapter_name_given_twice_exits_2(cli, tiny_model, adapters):
    result = cli("serve", "--model", tiny_model, "--port", "0", "--adapter", f"alpha={adapters['alpha']}",
                 "--adapter", f"alpha={adapters['bravo']}")
    assert result.code == 2 and "the name 'alpha' is given twice" in result.err


def test_an_adapter_named_like_the_base_exits_2(cli, tiny_model, adapters):
    result = cli("serve", "--model", tiny_model, "--port", "0", "--adapter", f"{tiny_model.name}={adapters['alpha']}")
    assert result.code == 2 and f"the name '{tiny_model.name}' is already served" in result.err


def test_an_adapter_of_another_base_exits_2_naming_that_base(cli, tiny_model, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from glmtune.models.tiny import build_tiny_glm

    other = build_tiny_glm(tmp_path / "other", ["some words to train a tokenizer on"] * 20, hidden_size=64,
                           num_layers=1, vocab_size=300)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(other), LoraConfig(target_modules=["q_proj"], r=2))
    model.save_pretrained(tmp_path / "foreign")
    result = cli("serve", "--model", tiny_model, "--port", "0", "--adapter", f"foreign={tmp_path / 'foreign'}")
    assert result.code == 2, result.err
    assert f"--adapter foreign={tmp_path / 'foreign'} does not fit the model" in result.err
    assert f"trained on '{other}'" in result.err
