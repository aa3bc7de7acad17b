"""The numerical health guard: a run whose loss turns NaN stops with a diagnosis and saves no adapter of NaNs;
--nan_policy skip drops the non-finite updates, counts them and saves finite weights."""

from __future__ import annotations

import json

import pytest
from conftest import write_json
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A very small GLM (hidden 64, 1 layer) whose embedding of the word "poison" is NaN, and a dataset of 4 clean rows
    then 8 rows with that word: read in order 4 rows a step, step 1 is finite and steps 2-3 are NaN, and so on."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from glmtune.cli import main
    from glmtune.models.tiny import build_tiny_glm

    tmp = tmp_path_factory.mktemp("health")
    rows = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(4)]
    rows += [{"prompt": f"question {i}", "completion": f"poison {i}"} for i in range(4, 12)]
    model = build_tiny_glm(tmp / "model", [r["prompt"] + " " + r["completion"] for r in rows] * 5, hidden_size=64,
                           num_layers=1, vocab_size=400)
    tokenizer = AutoTokenizer.from_pretrained(model)

    def ids(part: list[dict]) -> set[int]:  # each field alone and after a newline, as the template writes them
        return {i for r in part for text in (r["prompt"], r["completion"]) for form in (text, "\n" + text, " " + text)
                for i in tokenizer.encode(form, add_special_tokens=False)}

    poison = ids(rows[4:]) - ids(rows[:4])  # "poison" and the numbers 4-11
    assert poison
    weights = load_file(str(model / "model.safetensors"))
    weights["model.embed_tokens.weight"][sorted(poison)] = float("nan")
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    data = write_json(tmp / "rows.json", rows)
    assert main(["prepare", "--data", str(data), "--save_path", str(tmp / "data"), "--model", str(model)]) == 0
    assert torch.isnan(weights["model.embed_tokens.weight"]).any()
    return tmp / "data"


def diverging(cli, data, out, *extra):
    """Steps 1 and 4 see clean rows; 2, 3, 5 and 6 rows whose loss is NaN."""
    return cli("train", "--dataset_path", data, "--output_dir", out, "--per_device_train_batch_size", "4",
               "--train_sampling_strategy", "sequential", "--logging_steps", "1", "--precision", "fp32",
               "--max_steps", "6", "--save_steps", "1", *extra)


def finite(path):
    import torch

    return all(bool(torch.isfinite(t).all()) for t in load_file(str(path)).values())


def test_a_diverging_run_stops_with_a_diagnosis_and_saves_no_adapter(cli, small, tmp_path):
    result = diverging(cli, small, tmp_path / "run")
    assert result.code == 2
    assert "training diverged at step 2:" in result.err and "learning rate 0.000167" in result.err  # linear decay
    assert "precision fp32" in result.err and "--nan_policy skip" in result.err
    run = tmp_path / "run"
    assert not (run / "manifest.json").exists() and not (run / "adapter_model.safetensors").exists()
    checkpoints = sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert checkpoints, "the checkpoints before the divergence are kept"
    assert all(finite(c / "adapter_model.safetensors") for c in checkpoints)  # no checkpoint of NaNs either
    assert [c.name for c in checkpoints] == ["checkpoint-1"]


def test_skip_drops_the_non_finite_updates_counts_them_and_saves_finite_weights(cli, small, tmp_path):
    result = diverging(cli, small, tmp_path / "run", "--nan_policy", "skip", "--nan_max_skips", "10")
    assert result.code == 0, result.err
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["global_step"] == 6 and manifest["nonfinite_updates_skipped"] == 4  # steps 2, 3, 5 and 6
    assert result.err.count("update skipped") == 4
    assert finite(tmp_path / "run" / "adapter_model.safetensors")


def test_skip_stops_after_too_many_non_finite_updates_in_a_row(cli, small, tmp_path):
    result = diverging(cli, small, tmp_path / "run", "--nan_policy", "skip", "--nan_max_skips", "1")
    assert result.code == 2 and "training diverged at step 3:" in result.err and "2 update(s) in a row" in result.err


def test_a_healthy_run_is_untouched(cli, small, tmp_path):
    result = cli("train", "--dataset_path", small, "--output_dir", tmp_path / "run", "--max_steps", "1",
                 "--per_device_train_batch_size", "4", "--train_sampling_strategy", "sequential", "--precision",
                 "fp32")  # the clean rows alone
    assert result.code == 0, result.err
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text(encoding="utf-8"))
    assert "nonfinite_updates_skipped" not in manifest and "diverged" not in result.err


def test_weights_that_are_not_finite_are_never_saved():
    import torch

    from glmtune.train.health import TrainingDiverged, check_finite_weights

    model = torch.nn.Linear(2, 2)
    check_finite_weights(model)
    with torch.no_grad():
        model.weight[0, 1] = float("nan")
    with pytest.raises(TrainingDiverged, match="1 tensors, e.g. weight"):
        check_finite_weights(model)
    model.weight.requires_grad_(False)  # frozen (base) weights are not the run's to judge
    check_finite_weights(model)
