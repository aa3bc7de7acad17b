"""Scores of a generated answer against its reference, defined as THUDM's P-Tuning evaluation (ChatGLM-6B and
ChatGLM2-6B `ptuning/main.py`) and LLaMA-Factory (`train/sft/metric.py`) define them, so numbers compare with theirs:

- rouge-1, rouge-2, rouge-l: the F-scores of `rouge_chinese.Rouge().get_scores(' '.join(jieba.cut(prediction)),
  ' '.join(jieba.cut(reference)))`; 0 when either side has no word (rouge_chinese raises on an empty text).
- bleu-4: `nltk sentence_bleu([list(reference)], list(prediction), smoothing_function=SmoothingFunction().method3)`,
  cumulative 4-gram BLEU on CHARACTERS (that is what both of them compute, despite the jieba words beside it).
- bleu-4-jieba: the same on jieba words (`[list(jieba.cut(reference))]`, `list(jieba.cut(prediction))`), as
  ChatGLM3's finetune_demo computes it.
- exact_match: 100 when prediction.strip() == reference.strip(), else 0.

Every score is per sample, times 100, and averaged over samples (sentence level, not corpus BLEU). They keep
each sample's score rounded to 4 decimals before averaging; we don't (a difference below 1e-4).
"""

from __future__ import annotations

import logging
from functools import cache
from typing import Any

TEXT_METRICS = ("bleu-4", "bleu-4-jieba", "rouge-1", "rouge-2", "rouge-l", "exact_match")


def sample_scores(prediction: str, reference: str) -> dict[str, float]:
    """Every text metric of one prediction, in percent."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    hypothesis_words, reference_words = _words(prediction), _words(reference)
    smoothing = SmoothingFunction().method3
    scores = {
        "bleu-4": 100 * sentence_bleu([list(reference)], list(prediction), smoothing_function=smoothing),
        "bleu-4-jieba": 100 * sentence_bleu([reference_words], hypothesis_words, smoothing_function=smoothing),
        **_rouge(hypothesis_words, reference_words),
        "exact_match": 100.0 if prediction.strip() == reference.strip() else 0.0,
    }
    return {name: float(value) for name, value in scores.items()}


def mean_scores(per_sample: list[dict[str, float]]) -> dict[str, float]:
    """The average of each text metric over the samples."""
    if not per_sample:
        return {name: 0.0 for name in TEXT_METRICS}
    return {name: sum(s[name] for s in per_sample) / len(per_sample) for name in TEXT_METRICS}


def _rouge(hypothesis: list[str], reference: list[str]) -> dict[str, float]:
    hypothesis_text, reference_text = " ".join(hypothesis), " ".join(reference)
    if not hypothesis_text.split() or not reference_text.split():
        return {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    result = _rouge_scorer().get_scores(hypothesis_text, reference_text)[0]
    return {name: 100 * result[name]["f"] for name in ("rouge-1", "rouge-2", "rouge-l")}


def _words(text: str) -> list[str]:
    return list(_jieba().cut(text))


@cache
def _jieba() -> Any:
    import jieba

    # jieba logs "Building prefix dict ..." at DEBUG level to stderr on its first cut: noise for a CLI.
    jieba.setLogLevel(logging.WARNING)
    return jieba


@cache
def _rouge_scorer() -> Any:
    from rouge_chinese import Rouge

    return Rouge()
