"""Labelled rows for KTO: a prompt and one answer to it, labelled desirable (true) or undesirable (false), rendered
to ids by the same templates as supervised rows.

A labelled row is a Conversation whose last message is the judged answer (the only trained one: earlier answers are
context) and that carries the label. Tokenized, it becomes what TRL's KTO collator takes: `prompt_ids` (the
conversation through the generation prompt), `completion_ids` (the answer and the template's end-of-turn token:
exactly the span SFT would train, as a preference pair's answers) and `label`. Truncation is SFT's, row by row: the
answer is the row's trained span, so --truncation left keeps it whole where it fits.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from glmtune.data.conversation import Conversation
from glmtune.data.preference import PreferenceConversation
from glmtune.data.templates import IGNORE_INDEX
from glmtune.errors import UserError

LABELLED_COLUMNS = ["prompt_ids", "completion_ids", "label"]
SUPERVISED, PAIRS, LABELLED = "supervised", "pairs", "labelled"  # the kinds of prepared dataset
# KTO's paper (Ethayarajh et al. 2024, eq. 8), as TRL's KTO docs say it: desirable_weight * desirables over
# undesirable_weight * undesirables should lie in [1, 4/3].
BALANCE_RANGE = (1.0, 4 / 3)


@dataclass
class LabelledConversation(Conversation):
    """The prompt plus the judged answer as its last (trained) message, and whether that answer is desirable."""

    label: bool | None = None  # None only where no answer is needed (inference reads the rows as prompts)

    def to_record(self) -> dict[str, Any]:
        return {**super().to_record(), "label": self.label}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> LabelledConversation:
        conversation = Conversation.from_record(record)
        return cls(**{f.name: getattr(conversation, f.name) for f in dataclasses.fields(Conversation)},
                   label=record["label"])


def dataset_kind(conversations: list[Conversation]) -> str:
    """SUPERVISED, PAIRS or LABELLED: what the rows are; a mix of kinds is refused."""
    counts = {PAIRS: sum(isinstance(c, PreferenceConversation) for c in conversations),
              LABELLED: sum(isinstance(c, LabelledConversation) for c in conversations)}
    counts[SUPERVISED] = len(conversations) - counts[PAIRS] - counts[LABELLED]
    present = {kind: n for kind, n in counts.items() if n}
    if len(present) > 1:
        names = {SUPERVISED: "supervised rows", PAIRS: "preference pairs (chosen/rejected)",
                 LABELLED: "labelled rows (one answer and a true/false label)"}
        raise UserError(f"the data mixes {' and '.join(f'{n} {names[kind]}' for kind, n in present.items())}",
                        hint="prepare each kind into its own dataset directory: supervised rows for `glmtune train`, "
                             "pairs for `glmtune dpo` (orpo, simpo, kto), labelled rows for `glmtune kto`")
    return next(iter(present), SUPERVISED)


def process_labelled(conversation: LabelledConversation, tokenizer: Any, stop_ids: list[int],
                     options: Any) -> dict[str, Any]:
    """One labelled row's ids after prepare's truncation rule, and what happened to it (the report's columns): the
    row is tokenized and cut as a supervised row with one trained answer, then split where the answer starts. Tokens
    the template writes after the answer's end-of-turn token are left out, as for a pair's answers."""
    from glmtune.data.tokenize import process_conversation

    row = process_conversation(conversation, tokenizer, stop_ids, options)
    trained = [k for k, label in enumerate(row["labels"]) if label != IGNORE_INDEX]
    prompt, completion = [], []
    if not row["dropped"] and trained:
        prompt, completion = row["input_ids"][:trained[0]], row["input_ids"][trained[0]:trained[-1] + 1]
    return {**row, "prompt_ids": prompt, "completion_ids": completion, "label": conversation.label}


def tokenize_labelled(rows: list[LabelledConversation], tokenizer: Any, stop_ids: list[int], options: Any,
                      num_proc: int | None, fingerprint: str) -> Any:
    """All labelled rows tokenized (kept and dropped, with their statistics), as a datasets.Dataset."""
    from glmtune.data.tokenize import tokenize_dataset

    if options.last_turn_only or options.train_on_prompt:
        raise UserError("--last_turn_only and --train_on_prompt are for supervised rows, not labelled ones",
                        hint="leave them out: a labelled row is always judged on its last answer")
    return tokenize_dataset(rows, tokenizer, stop_ids, options, num_proc, fingerprint, process=process_labelled,
                            read=LabelledConversation.from_record)


def check_both_labels(desirable: int, undesirable: int, where: str) -> None:
    """KTO learns from the contrast: a dataset without desirable or without undesirable answers is refused."""
    if desirable and undesirable:
        return
    missing = "undesirable (label false)" if desirable else "desirable (label true)"
    raise UserError(f"{where} has {desirable} desirable and {undesirable} undesirable answers: KTO needs both, and "
                    f"none is {missing}",
                    hint="add rows of the missing kind (KTO's paper trains on roughly as many of each)")


def weight_advice(desirable: int, undesirable: int, desirable_weight: float = 1.0,
                  undesirable_weight: float = 1.0) -> str | None:
    """What to set when desirable_weight * desirable / (undesirable_weight * undesirable) is outside BALANCE_RANGE
    (None when inside, or when a kind is absent): either weight's range that brings it in, the other one kept."""
    low, high = BALANCE_RANGE
    if not (desirable and undesirable):
        return None
    ratio = desirable_weight * desirable / (undesirable_weight * undesirable)
    if low <= ratio <= high:
        return None
    base = undesirable * undesirable_weight / desirable  # the desirable weight that makes the ratio 1
    other = desirable * desirable_weight / undesirable  # the undesirable weight that makes it 1
    return (f"weighted {ratio:.2f}:1, outside KTO's recommended 1:1 to 4:3; set either --desirable_weight in "
            f"[{base * low:.3g}, {base * high:.3g}] or --undesirable_weight in [{other / high:.3g}, {other / low:.3g}]"
            " (not both)")


def labelled_samples(tokenizer: Any, tokenized: Any, count: int) -> list[str]:
    """The first kept rows as text: the prompt, then the answer between the report's marks and its label."""
    from glmtune.data.report import MARK_CLOSE, MARK_OPEN

    kept = [i for i, reason in enumerate(tokenized["dropped"]) if not reason][:count]
    return [f"{tokenizer.decode(row['prompt_ids'])}{MARK_OPEN}{tokenizer.decode(row['completion_ids'])}{MARK_CLOSE}\n"
            f"  label: {'desirable (true)' if row['label'] else 'undesirable (false)'}"
            for row in tokenized.select(kept)]
