"""The dataset report: what was read, kept, cut and dropped, how long the rows are, and the first samples with
their trained spans marked, so a user sees exactly what the model will learn."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from glmtune.data.labelled import weight_advice
from glmtune.data.templates import IGNORE_INDEX

SAMPLES_IN_REPORT = 3
MARK_OPEN, MARK_CLOSE = "⟦", "⟧"  # around trained spans in the rendered samples


@dataclass
class PrepareReport:
    format: str
    max_seq_length: int
    rows_read: int = 0
    bad_rows_skipped: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> rows
    truncated: dict[str, int] = field(default_factory=dict)  # rule -> rows kept after being cut
    prompt_tokens_cut: dict[str, int] = field(default_factory=dict)  # rule -> prompt tokens it cut from kept rows
    answer_tokens_cut: dict[str, int] = field(default_factory=dict)  # rule -> trained answer tokens it cut from them
    supervised_tokens_lost: int = 0  # by truncation, in kept and dropped rows
    length_percentiles: dict[str, int] = field(default_factory=dict)  # before truncation
    rows_over_max: int = 0
    history_untrained: int = 0  # rows whose template writes earlier answers as history: only the last one trained
    rows_split: int = 0  # rows trained as one sample per assistant turn (data/turns.py)
    split_samples: int = 0  # the samples those rows became (counted in kept/dropped as rows)
    tokens: int = 0
    supervised_tokens: int = 0
    validation_rows: int = 0
    desirable: int = 0  # labelled rows (KTO): kept answers labelled true
    undesirable: int = 0  # and false
    reused_cache: bool = False
    samples: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        share = self.supervised_tokens / self.tokens if self.tokens else 0.0
        dropped = sum(self.dropped.values())
        lengths = ", ".join(f"{k} {v}" for k, v in self.length_percentiles.items())
        lines = [
            f"format:            {self.format}",
            f"rows read:         {self.rows_read}" + (f" ({self.bad_rows_skipped} bad rows skipped)"
                                                       if self.bad_rows_skipped else ""),
            f"rows kept:         {self.kept}" + (f" ({self.validation_rows} of them in the validation split)"
                                                  if self.validation_rows else ""),
            f"rows dropped:      {dropped}" + (" (" + ", ".join(f"{n} {r}" for r, n in self.dropped.items()) + ")"
                                                if dropped else ""),
            f"rows truncated:    {sum(self.truncated.values())}" + (
                " (" + ", ".join(f"{n} cut {rule}" + (f": {self.prompt_tokens_cut[rule]} prompt tokens, "
                                                      f"{self.answer_tokens_cut.get(rule, 0)} answer tokens"
                                                      if rule in self.prompt_tokens_cut else "")
                                 for rule, n in self.truncated.items()) + ")"
                if self.truncated else "") + f"; supervised tokens lost: {self.supervised_tokens_lost}",
            f"lengths (tokens):  {lengths}; {self.rows_over_max} rows over --max_seq_length {self.max_seq_length}",
            f"tokens:            {self.tokens}",
            f"supervised tokens: {self.supervised_tokens} ({share:.1%} of all tokens)",
        ]
        if self.desirable or self.undesirable:
            advice = weight_advice(self.desirable, self.undesirable)
            lines.append(f"labels:            {self.desirable} desirable, {self.undesirable} undesirable"
                         + (f" (with equal weights: {advice})" if advice else ""))
        if self.history_untrained:
            lines.append(f"last answer only:  {self.history_untrained} rows (the chat template writes their earlier "
                         "answers as history, so only the last one is trained)")
        if self.rows_split:
            lines.append(f"split by turn:     {self.rows_split} rows into {self.split_samples} samples, one per "
                         "assistant turn (the chat template drops earlier turns' reasoning from history, so each "
                         "turn is trained as the model generates it); counted as rows above")
        if self.reused_cache:
            lines.append("tokenized:         reused from the cache (same data, tokenizer, template and options)")
        if self.samples:
            lines.append(f"first samples, trained spans between {MARK_OPEN} and {MARK_CLOSE}:")
            lines += [f"--- sample {i}\n{s}" for i, s in enumerate(self.samples, start=1)]
        return lines


def build_report(report: PrepareReport, tokenized: Any, tokenizer: Any, truncation: str) -> PrepareReport:
    """Fill the counts from the per-row columns that tokenizing wrote (see data/tokenize.py)."""
    # Plain lists: indexing a dataset column item by item is slow.
    columns = ["length", "tokens", "dropped", "cut", "supervised", "supervised_before", "history_untrained"]
    optional = [name for name in ("split", "prompt_cut", "answer_cut") if name in tokenized.column_names]
    stats = tokenized.select_columns(columns + optional).to_dict()
    lengths, dropped, cut, supervised = stats["length"], stats["dropped"], stats["cut"], stats["supervised"]
    kept = [i for i, reason in enumerate(dropped) if not reason]
    report.kept = len(kept)
    report.dropped = dict(Counter(reason for reason in dropped if reason))
    cut_kept = sum(cut[i] for i in kept)
    report.truncated = {truncation: cut_kept} if cut_kept else {}
    for name, counted in (("prompt_cut", report.prompt_tokens_cut), ("answer_cut", report.answer_tokens_cut)):
        if cut_kept and name in stats:  # a cache entry written before the counts has none
            counted[truncation] = sum(stats[name][i] for i in kept)
    report.supervised_tokens = sum(supervised[i] for i in kept)
    report.supervised_tokens_lost = sum(stats["supervised_before"]) - report.supervised_tokens
    measured = [n for n, reason in zip(lengths, dropped, strict=True) if n or not reason]  # 0: never tokenized
    report.length_percentiles = percentiles(measured)
    report.rows_over_max = sum(n > report.max_seq_length for n in measured)
    report.tokens = sum(stats["tokens"][i] for i in kept)
    report.history_untrained = sum(stats["history_untrained"][i] for i in kept)
    report.rows_split = sum(n > 0 for n in stats.get("split", []))
    report.split_samples = sum(stats.get("split", []))
    samples = tokenized.select(kept[:SAMPLES_IN_REPORT])
    report.samples = [render_trained_spans(tokenizer, row["input_ids"], row["labels"]) for row in samples]
    return report


def percentiles(lengths: list[int]) -> dict[str, int]:
    ordered = sorted(lengths)
    if not ordered:
        return {}
    pick = {"p50": 0.5, "p90": 0.9, "p99": 0.99}
    out = {name: ordered[min(len(ordered) - 1, int(q * len(ordered)))] for name, q in pick.items()}
    return {**out, "max": ordered[-1]}


def render_trained_spans(tokenizer: Any, ids: list[int], labels: list[int]) -> str:
    """The sample as text, with every trained span between MARK_OPEN and MARK_CLOSE."""
    parts, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or (labels[i] == IGNORE_INDEX) != (labels[start] == IGNORE_INDEX):
            text = tokenizer.decode(ids[start:i])
            parts.append(text if labels[start] == IGNORE_INDEX else f"{MARK_OPEN}{text}{MARK_CLOSE}")
            start = i
    return "".join(parts)
