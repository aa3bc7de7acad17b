"""glmtune eval and train's --eval_generate hook: the metrics against hand counts and the reference libraries, the
perplexity against a plain forward, the command end to end on an adapter trained to answer the demo questions, and
the hook keeping the best checkpoint."""

from __future__ import annotations

import json
import math

import pytest
from conftest import with_thinking_template, write_json

from glmtune.evaluation.metrics import sample_scores

# --- metrics ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction, reference, expected", [
    # Same length (no brevity penalty); character n-gram precisions 5/6, 4/5, 3/4, 2/3.
    ("abcdex", "abcdef", (5 / 6 * 4 / 5 * 3 / 4 * 2 / 3) ** 0.25),
    # Every precision 1, brevity penalty exp(1 - 6/4).
    ("abcd", "abcdef", math.exp(1 - 6 / 4)),
    # Precisions 2/4, 1/3, then 0/2 and 0/1, which method3 (NIST) smooths to 1/(2*2) and 1/(4*1).
    ("abxy", "abcd", (2 / 4 * 1 / 3 * 1 / 4 * 1 / 4) ** 0.25),
])
def test_bleu4_is_sentence_bleu_on_characters_with_nist_smoothing(prediction, reference, expected):
    assert sample_scores(prediction, reference)["bleu-4"] == pytest.approx(100 * expected, abs=1e-9)


def test_rouge_counts_distinct_jieba_words_as_rouge_chinese_does():
    scores = sample_scores("the cat sat on the mat", "the cat is on the mat")
    # rouge_chinese (like pltrdy's rouge) compares SETS of n-grams: 4 of 5 distinct words, 3 of 5 distinct bigrams;
    # ROUGE-L takes the longest common subsequence (the cat on the mat: 5) over the 6 words.
    assert scores["rouge-1"] == pytest.approx(100 * 0.8, abs=1e-5)
    assert scores["rouge-2"] == pytest.approx(100 * 0.6, abs=1e-5)
    assert scores["rouge-l"] == pytest.approx(100 * 5 / 6, abs=1e-5)


def test_chinese_scores_follow_the_p_tuning_and_llama_factory_recipe():
    import jieba
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    prediction, reference = "股票是公司发行的一种有价证券。", "股票是股份公司发行的所有权凭证。"
    hypothesis, words = list(jieba.cut(prediction)), list(jieba.cut(reference))
    rouge = Rouge().get_scores(" ".join(hypothesis), " ".join(words))[0]
    smoothing = SmoothingFunction().method3
    scores = sample_scores(prediction, reference)
    for name in ("rouge-1", "rouge-2", "rouge-l"):
        assert scores[name] == pytest.approx(100 * rouge[name]["f"])
    assert scores["bleu-4"] == pytest.approx(100 * sentence_bleu([list(reference)], list(prediction),
                                                                 smoothing_function=smoothing))
    assert scores["bleu-4-jieba"] == pytest.approx(100 * sentence_bleu([words], hypothesis,
                                                                       smoothing_function=smoothing))
    assert 0 < scores["bleu-4"] < 100 and 0 < scores["rouge-l"] < 100


def test_empty_prediction_scores_zero_and_exact_match_ignores_surrounding_space():
    assert set(sample_scores("", "答案。").values()) == {0.0}
    assert sample_scores(" 答案。\n", "答案。")["exact_match"] == 100
    assert sample_scores("答案", "答案。")["exact_match"] == 0
    assert sample_scores("Bond", "bond")["exact_match"] == 0
    assert sample_scores("答案。", "答案。")["rouge-l"] == pytest.approx(100, abs=1e-5)


# --- samples and perplexity ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_conversations():
    from glmtune.data.prepare import load_data
    from glmtune.demo import demo_data_path

    return load_data([str(demo_data_path())], None).conversations


def test_prepared_rows_give_the_samples_their_conversations_give(tiny_model, tokenizer, demo_conversations):
    """train's hook reads the validation split's token ids; `glmtune eval` reads conversations: same samples."""
    from glmtune.data.tokenize import TokenizeOptions, process_conversation
    from glmtune.evaluation.run import samples_from_conversations, samples_from_tokenized
    from glmtune.models.loading import stop_token_ids

    stops = stop_token_ids(str(tiny_model), tokenizer)
    rows = [process_conversation(c, tokenizer, stops, TokenizeOptions(512)) for c in demo_conversations]
    from_rows = samples_from_tokenized(tokenizer, stops, rows)
    from_conversations = samples_from_conversations(tokenizer, stops, demo_conversations)
    assert [(s.prompt_ids, s.reference, s.input_ids, s.labels) for s in from_rows] == \
        [(s.prompt_ids, s.reference, s.input_ids, s.labels) for s in from_conversations]
    first = from_conversations[0]
    assert first.reference == demo_conversations[0].messages[-1].content
    scored = [token for token, label in zip(first.input_ids, first.labels, strict=True) if label != -100]
    assert tokenizer.decode(scored) == "\n" + first.reference + "<|endoftext|>"  # the answer and its stop token


def test_perplexity_of_a_padded_batch_equals_a_plain_forward_per_sample(tiny_model, tokenizer, demo_conversations):
    import torch
    from transformers import AutoModelForCausalLM

    from glmtune.evaluation.run import reference_nll, samples_from_conversations
    from glmtune.models.loading import stop_token_ids

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    samples = samples_from_conversations(tokenizer, stop_token_ids(str(tiny_model), tokenizer), demo_conversations[:6])
    assert len({len(s.input_ids) for s in samples}) > 1  # the batch is padded
    batched = reference_nll(model, tokenizer.pad_token_id, samples, batch_size=6, progress=False)
    for sample, (nll, count) in zip(samples, batched, strict=True):
        ids = torch.tensor([sample.input_ids])
        with torch.no_grad():
            log_probs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)  # (seq, vocab)
        positions = [t for t, label in enumerate(sample.labels) if label != -100]
        expected = -sum(float(log_probs[t - 1, sample.input_ids[t]]) for t in positions)
        assert count == len(positions)
        assert nll == pytest.approx(expected, rel=1e-4)


# --- a tuned adapter, with train's hook on ------------------------------------------------------------------------

HOOK_TRAIN = ["--per_device_train_batch_size", "16", "--learning_rate", "3e-3", "--lr_scheduler_type", "cosine",
              "--warmup_steps", "10", "--lora_rank", "16", "--lora_dropout", "0", "--logging_steps", "10",
              "--max_steps", "80", "--save_steps", "20", "--save_total_limit", "2",
              "--precision", "fp32",  # the hook's scores are compared with a fresh fp32 evaluation's
              "--eval_generate", "true", "--eval_generate_metric", "rouge-l", "--eval_generate_max_new_tokens", "40"]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, tiny_model, demo_rows):
    """prepare (every demo row twice, 8 rows held out: their twins are trained on, so validation scores climb) and
    train with --eval_generate; returns the run directory."""
    from glmtune.cli import main

    tmp = tmp_path_factory.mktemp("eval")
    data = write_json(tmp / "twice.json", demo_rows * 2)
    assert main(["prepare", "--jsonl_path", str(data), "--save_path", str(tmp / "data"), "--model", str(tiny_model),
                 "--val_size", "8"]) == 0
    assert main(["train", "--dataset_path", str(tmp / "data"), "--output_dir", str(tmp / "run"), *HOOK_TRAIN]) == 0
    return tmp / "run"


@pytest.fixture(scope="module")
def validation(tuned):
    from datasets import load_from_disk

    return load_from_disk(str(tuned.parent / "data"))["validation"]


def test_train_keeps_the_best_checkpoint_by_the_chosen_metric(tuned):
    from safetensors.torch import load_file

    records = [json.loads(p.read_text()) for p in sorted(tuned.glob("checkpoint-*/generation_eval.json"))]
    manifest = json.loads((tuned / "manifest.json").read_text())["generation_eval"]
    assert manifest["metric"] == "rouge-l" and manifest["validation_rows"] == 8
    # All four evaluations are in the manifest, even those whose checkpoint --save_total_limit deleted.
    assert [c["step"] for c in manifest["checkpoints"]] == [20, 40, 60, 80]
    scores = {c["step"]: c["metrics"]["rouge-l"] for c in manifest["checkpoints"]}
    best = min(step for step, value in scores.items() if value == max(scores.values()))  # a tie: the earlier
    assert manifest["best_step"] == best and manifest["best_checkpoint"] == f"checkpoint-{best}"
    assert scores[best] > scores[20]  # the validation twins were learnt
    assert (tuned / f"checkpoint-{best}").is_dir()  # never deleted by --save_total_limit (kept as the best)
    assert {r["step"]: r["metrics"]["rouge-l"] for r in records}.items() <= scores.items()
    final, chosen = load_file(tuned / "adapter_model.safetensors"), load_file(tuned / f"checkpoint-{best}" /
                                                                              "adapter_model.safetensors")
    assert final.keys() == chosen.keys() and all((final[k] == chosen[k]).all() for k in final)
    if best != 80:
        last = load_file(tuned / "checkpoint-80" / "adapter_model.safetensors")
        assert any((final[k] != last[k]).any() for k in final)


def test_hook_scores_are_those_of_the_checkpoint_evaluated_afresh(tuned, validation):
    from glmtune.evaluation.run import generate_answers, reference_nll, samples_from_tokenized, score
    from glmtune.inference.engine import Engine

    manifest = json.loads((tuned / "manifest.json").read_text())["generation_eval"]
    engine = Engine(None, str(tuned / manifest["best_checkpoint"]))
    samples = samples_from_tokenized(engine.tokenizer, engine.stop_ids, validation)
    predictions = generate_answers(engine.model, engine.tokenizer, engine.stop_ids, samples, 40, 8, progress=False)
    fresh = score(samples, predictions, reference_nll(engine.model, engine.tokenizer.pad_token_id, samples, 8,
                                                      progress=False)).metrics
    recorded = {c["step"]: c["metrics"] for c in manifest["checkpoints"]}[manifest["best_step"]]
    assert fresh == pytest.approx(recorded, rel=1e-4)


def test_hook_generation_gives_the_inference_engines_answers(tuned, demo_conversations):
    from glmtune.evaluation.run import generate_answers, samples_from_conversations
    from glmtune.inference.engine import Engine, GenerationSettings

    engine = Engine(None, str(tuned))
    conversations = demo_conversations[:12]
    samples = samples_from_conversations(engine.tokenizer, engine.stop_ids, conversations)
    ours = generate_answers(engine.model, engine.tokenizer, engine.stop_ids, samples, 40, batch_size=5,
                            progress=False)
    theirs = engine.generate([c.prompt_part() for c in conversations], GenerationSettings(max_new_tokens=40),
                             batch_size=5, progress=False)
    assert ours == theirs


def test_eval_scores_the_tuned_adapter_above_the_base_model(cli, tuned, tiny_model, tmp_path, demo_rows):
    from glmtune.demo import demo_data_path

    result = cli("eval", "--peft_path", tuned, "--dataset", demo_data_path(), "--output_dir", tmp_path / "tuned",
                 "--max_new_tokens", "40", "--batch_size", "16")
    assert result.code == 0, result.err
    assert sorted(p.name for p in (tmp_path / "tuned").iterdir()) == ["manifest.json", "metrics.json",
                                                                       "predictions.jsonl"]
    assert "exact_match" in result.out and "perplexity" in result.out
    tuned_metrics = json.loads((tmp_path / "tuned" / "metrics.json").read_text())
    predictions = [json.loads(line) for line in (tmp_path / "tuned" / "predictions.jsonl").read_text().splitlines()]
    assert [p["reference"] for p in predictions] == [row["output"] for row in demo_rows]
    exact = 100 * sum(p["prediction"] == p["reference"] for p in predictions) / len(predictions)
    assert tuned_metrics["metrics"]["exact_match"] == pytest.approx(exact)
    assert tuned_metrics["counts"]["samples"] == len(demo_rows) == 48
    assert exact >= 80, [(p["reference"], p["prediction"]) for p in predictions if p["prediction"] != p["reference"]]

    base = cli("eval", "--model", tiny_model, "--dataset", demo_data_path(), "--output_dir", tmp_path / "base",
               "--max_new_tokens", "16", "--batch_size", "16")
    assert base.code == 0, base.err
    base_metrics = json.loads((tmp_path / "base" / "metrics.json").read_text())["metrics"]
    assert base_metrics["exact_match"] < exact
    assert base_metrics["rouge-l"] < tuned_metrics["metrics"]["rouge-l"]
    assert base_metrics["perplexity"] > 10 * tuned_metrics["metrics"]["perplexity"]

    # A non-empty output directory is refused; replaced with --overwrite_output_dir, the metrics are identical.
    again = cli("eval", "--peft_path", tuned, "--dataset", demo_data_path(), "--output_dir", tmp_path / "tuned",
                "--max_new_tokens", "40", "--batch_size", "16")
    assert again.code == 2 and "--overwrite_output_dir" in again.err
    again = cli("eval", "--peft_path", tuned, "--dataset", demo_data_path(), "--output_dir", tmp_path / "tuned",
                "--max_new_tokens", "40", "--batch_size", "16", "--overwrite_output_dir")
    assert again.code == 0, again.err
    assert json.loads((tmp_path / "tuned" / "metrics.json").read_text())["metrics"] == tuned_metrics["metrics"]


def test_eval_refuses_rows_without_an_answer_and_train_hook_without_validation(cli, tiny_model, tmp_path):
    data = write_json(tmp_path / "text.json", [{"text": "no prompt, no answer"}])
    result = cli("eval", "--model", tiny_model, "--dataset", data, "--output_dir", tmp_path / "out")
    assert result.code == 2 and "no reference answer" in result.err
    assert not (tmp_path / "out").exists()

    qa = write_json(tmp_path / "qa.json", [{"prompt": "q", "response": "a"}] * 4)
    assert cli("prepare", "--jsonl_path", qa, "--save_path", tmp_path / "data", "--model", tiny_model).code == 0
    result = cli("train", "--dataset_path", tmp_path / "data", "--output_dir", tmp_path / "run", "--max_steps", "1",
                 "--eval_generate", "true")
    assert result.code == 2 and "--eval_generate needs a validation split" in result.err
    result = cli("train", "--dataset_path", tmp_path / "data", "--output_dir", tmp_path / "run",
                 "--eval_generate_metric", "bleu")
    assert result.code == 2 and "--eval_generate_metric bleu is unknown" in result.err


def test_eval_scores_the_answer_alone_and_writes_its_reasoning_beside_it(cli, tiny_model, tmp_path, monkeypatch):
    from glmtune.inference.engine import Engine
    from glmtune.inference.streaming import Completion

    refused = cli("eval", "--model", tiny_model, "--dataset", write_json(tmp_path / "qa.json", [
        {"prompt": "2+2?", "response": "4"}]), "--output_dir", tmp_path / "refused", "--enable_thinking", "false")
    assert refused.code == 2 and "has no thinking switch" in refused.err
    model = with_thinking_template(tiny_model, tmp_path / "thinking")
    asked = []

    def complete(self, conversations, settings, batch_size=8, progress=True):
        asked.append(settings)
        return [Completion("4", 10, 5, "stop", reasoning="Two and two.") for _ in conversations]

    monkeypatch.setattr(Engine, "complete", complete)
    result = cli("eval", "--model", model, "--dataset", tmp_path / "qa.json", "--output_dir", tmp_path / "out",
                 "--enable_thinking", "false")
    assert result.code == 0, result.err
    (record,) = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert (record["prediction"], record["reasoning"], record["metrics"]["exact_match"]) == ("4", "Two and two.", 100.0)
    assert asked[0].enable_thinking is False
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["settings"]["enable_thinking"] is False and metrics["counts"]["stopped"] == 1
