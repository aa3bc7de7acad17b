"""Evaluate a model on rows that have a reference answer: generate each answer greedily, score it against the
reference (glmtune.evaluation.metrics), and measure the perplexity of the reference given the prompt.

Samples come from conversations (a data file: `glmtune eval`) or from a prepared dataset's token ids (the
`validation` split: train's hook), both through the template code training uses, so the prompt is what the model
was trained to answer and the perplexity is taken on the tokens the training loss is taken on.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from glmtune.data.conversation import Conversation
from glmtune.data.templates import IGNORE_INDEX, encode_for_training, encode_prompt
from glmtune.errors import UserError
from glmtune.evaluation.metrics import mean_scores, sample_scores


@dataclass
class EvalSample:
    prompt: str  # for people: the last question (or the decoded prompt of a tokenized row)
    reference: str  # the reference answer, stripped
    prompt_ids: list[int]  # what generation is fed: the chat-templated conversation up to the answer
    input_ids: list[int]  # prompt + reference answer + its stop token (what perplexity reads)
    labels: list[int]  # IGNORE_INDEX except on the reference answer and its stop token (what it scores)
    location: str | None = None


@dataclass
class EvalResult:
    records: list[dict[str, Any]]  # one per sample: prompt, reference, prediction, its metrics
    metrics: dict[str, float]  # the text metrics' averages and the perplexity
    counts: dict[str, int]


def samples_from_conversations(tokenizer: Any, stop_ids: list[int], conversations: list[Conversation],
                               enable_thinking: bool | None = None) -> list[EvalSample]:
    """Evaluation samples from conversations (`glmtune eval`'s data file): the last assistant message of each is
    the reference, and only it is scored for perplexity.

    Args:
        stop_ids: the model's stop tokens; the first one the template writes ends the scored answer.
        enable_thinking: the template's thinking switch for the prompts generation is given (--enable_thinking).
    Raises:
        UserError: rows with no assistant answer to compare with (every such row is listed, up to 20).
    """
    samples, problems = [], []
    for c in conversations:
        if c.text is not None or not c.messages or c.messages[-1].role != "assistant":
            problems.append(f"{c.location or 'a row'}: no assistant answer to compare with")
            continue
        last = len(c.messages) - 1
        # Perplexity of the last answer only: earlier answers are context here, whatever the data says to train.
        scored = dataclasses.replace(c, messages=[dataclasses.replace(m, train=i == last)
                                                  for i, m in enumerate(c.messages)])
        input_ids, labels = encode_for_training(tokenizer, scored, stop_ids)
        question = next((m.content for m in reversed(c.messages) if m.role == "user"), "")
        prompt_ids = encode_prompt(tokenizer, c.prompt_part(), enable_thinking)
        samples.append(EvalSample(question, c.messages[-1].content.strip(), prompt_ids, input_ids, labels, c.location))
    if problems:
        raise UserError(f"{len(problems)} row(s) have no reference answer", problems=problems[:20],
                        hint="evaluation needs rows with a prompt and an answer (`text` rows have neither)")
    return samples


def samples_from_tokenized(tokenizer: Any, stop_ids: list[int], rows: Iterable[dict[str, Any]]) -> list[EvalSample]:
    """Rows of a prepared split (input_ids, labels): the last supervised span is the reference answer and
    everything before it the prompt, the ids generation would be given (the span starts where the template's
    generation prompt ends)."""
    samples = []
    for index, row in enumerate(rows):
        ids, labels = list(row["input_ids"]), list(row["labels"])
        supervised = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
        if not supervised:
            continue  # prepare drops such rows; nothing to compare with
        end = supervised[-1] + 1
        start = end
        while start > 0 and labels[start - 1] != IGNORE_INDEX:
            start -= 1
        if start == 0:
            raise UserError(f"validation row {index} is supervised from its first token, so its prompt can't be "
                            "told from its answer", hint="prepare the data without --train_on_prompt (and not "
                                                         "in the `text` format) to evaluate by generation")
        answer = ids[start:end]
        while answer and answer[-1] in stop_ids:
            answer = answer[:-1]
        samples.append(EvalSample(tokenizer.decode(ids[:start], skip_special_tokens=False),
                                  tokenizer.decode(answer, skip_special_tokens=True).strip(), ids[:start],
                                  ids[:end], [IGNORE_INDEX] * start + labels[start:end], f"row {index}"))
    return samples


def generate_answers(model: Any, tokenizer: Any, stop_ids: list[int], samples: list[EvalSample],
                     max_new_tokens: int, batch_size: int, progress: bool = True) -> list[str]:
    """Greedy answers from prompt ids, through the inference engine's batched generation (a prepared split has
    only ids, so train's hook starts here rather than from conversations)."""
    from glmtune.inference.engine import GenerationSettings, generate_batched

    prompts = [sample.prompt_ids for sample in samples]
    completions = generate_batched(model, tokenizer, stop_ids, prompts, [max_new_tokens] * len(prompts),
                                   GenerationSettings(max_new_tokens=max_new_tokens), batch_size, progress)
    return [completion.text for completion in completions]


def reference_nll(model: Any, pad_id: int, samples: list[EvalSample], batch_size: int,
                  progress: bool = True) -> list[tuple[float, int]]:
    """(summed negative log-likelihood, token count) of each sample's reference answer given its prompt, in
    batches padded on the right as training pads them."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from glmtune.logs import progress_bars_enabled

    results: dict[int, tuple[float, int]] = {}
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].input_ids))
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="Perplexity", unit="batch", disable=not (progress and progress_bars_enabled())):
        width = max(len(samples[i].input_ids) for i in batch)
        def padded(key: str, value: int, batch: list[int] = batch, width: int = width) -> Any:
            rows = [getattr(samples[i], key) for i in batch]
            return torch.tensor([r + [value] * (width - len(r)) for r in rows], device=model.device)  # (batch, width)
        input_ids, labels = padded("input_ids", pad_id), padded("labels", IGNORE_INDEX)
        attention_mask = padded("input_ids", -1).ne(-1).long()
        with torch.no_grad():
            # use_cache=False: a cache is of no use here, and a model whose config turns it off (training) agrees.
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            targets = labels[:, 1:]  # position t predicts token t + 1
            nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX,
                                  reduction="none")  # (batch, width - 1)
        for row, index in enumerate(batch):
            results[index] = (float(nll[row].sum()), int(targets[row].ne(IGNORE_INDEX).sum()))
    return [results[i] for i in range(len(samples))]


def score(samples: list[EvalSample], predictions: list[str], nll: list[tuple[float, int]]) -> EvalResult:
    """Per-sample records and the averages. Perplexity over the whole set is exp(total NLL / total tokens): each
    reference token weighs the same, as in a validation loss."""
    records = []
    for sample, prediction, (loss, tokens) in zip(samples, predictions, nll, strict=True):
        scores = {**sample_scores(prediction, sample.reference), "perplexity": _exp(loss / max(tokens, 1))}
        records.append({"prompt": sample.prompt, "reference": sample.reference, "prediction": prediction,
                        **({"location": sample.location} if sample.location else {}), "metrics": scores})
    total_loss, total_tokens = sum(loss for loss, _ in nll), sum(tokens for _, tokens in nll)
    metrics = {**mean_scores([r["metrics"] for r in records]), "perplexity": _exp(total_loss / max(total_tokens, 1))}
    return EvalResult(records, metrics, {"samples": len(records), "reference_tokens": total_tokens})


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf  # math.exp overflows above about 709


def format_table(metrics: dict[str, float]) -> str:
    """The metrics as a two-column table for the terminal."""
    width = max(map(len, metrics))
    return "\n".join([f"{'metric':<{width}}  {'value':>9}"] +
                     [f"{name:<{width}}  {value:>9.4f}" for name, value in metrics.items()])
