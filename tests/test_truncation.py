"""--truncation on rows longer than --max_seq_length: `left` cuts the conversation's start (oldest turns, then the
start of the prompt that remains) and keeps the trained answer whole; a row whose answer alone does not fit is
dropped and counted; `right` and `drop` as before. The report counts the prompt and answer tokens each rule cut."""

from __future__ import annotations

import json

import pytest
from conftest import write_json

from glmtune.data.conversation import Conversation, Message
from glmtune.data.templates import IGNORE_INDEX, encode_for_training
from glmtune.data.tokenize import TOO_LONG, TokenizeOptions, process_conversation
from glmtune.data.truncation import ANSWER_TOO_LONG

LIMIT = 64
QUESTION = "Which bond pays the highest coupon?"
ANSWER = "The third one."


@pytest.fixture(scope="module")
def stops(tiny_model, tokenizer):
    from glmtune.models.loading import stop_token_ids

    return stop_token_ids(str(tiny_model), tokenizer)


def retrieval_row(tokenizer) -> Conversation:
    """Reference documents (5x the limit), then the question; a short answer."""
    documents = ""
    for i in range(1000):
        documents += f"Document {i}: bonds pay coupons and stocks pay dividends. "
        if len(tokenizer.encode(documents, add_special_tokens=False)) > 5 * LIMIT:
            break
    return Conversation(messages=[Message("user", f"{documents}\n{QUESTION}"), Message("assistant", ANSWER, True)])


def answer_tokens(tokenizer, stops, answer: str = ANSWER) -> list[int]:
    """The answer's supervised tokens as the template writes them, with its stop token: from a short row."""
    ids, labels = encode_for_training(tokenizer, Conversation(messages=[
        Message("user", "q"), Message("assistant", answer, True)]), stops)
    return [t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]


def supervised(row) -> list[int]:
    return [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != IGNORE_INDEX]


def test_left_cuts_the_start_of_a_long_prompt_and_keeps_the_answer_and_the_question(tokenizer, stops):
    row = process_conversation(retrieval_row(tokenizer), tokenizer, stops, TokenizeOptions(LIMIT, "left"))
    assert not row["dropped"] and row["cut"]
    assert row["length"] > 5 * LIMIT and LIMIT - 3 <= len(row["input_ids"]) <= LIMIT
    answer = answer_tokens(tokenizer, stops)
    assert supervised(row) == answer  # the whole answer, its stop token included, and nothing else trained
    assert row["input_ids"][-len(answer):] == answer and row["labels"][-len(answer):] == answer
    text = tokenizer.decode(row["input_ids"])
    assert text.startswith("[gMASK]<sop><|user|>\n")  # the template's opening markup stays
    assert text.endswith(f"{QUESTION}<|assistant|>\n{ANSWER}<|endoftext|>")  # the prompt's end (the question) stays
    assert "Document 0:" not in text  # its start goes
    assert row["answer_cut"] == 0 and row["prompt_cut"] == row["length"] - len(row["input_ids"])


def test_left_drops_the_oldest_turns_before_cutting_the_last_prompt(tokenizer, stops):
    messages = []
    for i in range(3):
        messages += [Message("user", f"question {i} " + "pad " * 20), Message("assistant", f"answer {i}", True)]
    conversation = Conversation(messages=messages)
    last_exchange = encode_for_training(tokenizer, Conversation(messages=messages[4:]), stops)[0]
    row = process_conversation(conversation, tokenizer, stops, TokenizeOptions(len(last_exchange) + 5, "left"))
    assert row["input_ids"] == last_exchange  # two whole turns went, the last prompt is not cut
    assert tokenizer.decode(supervised(row)) == "\nanswer 2<|endoftext|>"
    assert row["answer_cut"] == sum(len(answer_tokens(tokenizer, stops, f"answer {i}")) for i in (0, 1))
    # Tighter: the last prompt's start is cut too, the last answer stays whole.
    row = process_conversation(conversation, tokenizer, stops, TokenizeOptions(len(last_exchange) - 10, "left"))
    assert len(row["input_ids"]) <= len(last_exchange) - 10 and not row["dropped"]
    text = tokenizer.decode(row["input_ids"])
    assert text.startswith("[gMASK]<sop><|user|>\n") and "question 2" not in text
    assert text.endswith("pad <|assistant|>\nanswer 2<|endoftext|>")
    assert tokenizer.decode(supervised(row)) == "\nanswer 2<|endoftext|>"


def test_left_keeps_the_system_prompt_while_the_user_prompt_can_be_cut(tokenizer, stops):
    conversation = retrieval_row(tokenizer)
    conversation.system = "Answer from the documents."
    row = process_conversation(conversation, tokenizer, stops, TokenizeOptions(LIMIT, "left"))
    text = tokenizer.decode(row["input_ids"])
    assert "Answer from the documents." in text and QUESTION in text and "Document 0:" not in text
    assert supervised(row) == answer_tokens(tokenizer, stops) and len(row["input_ids"]) <= LIMIT


def test_left_drops_a_row_whose_answer_alone_does_not_fit_and_says_why(tokenizer, stops):
    conversation = Conversation(messages=[Message("user", "question"), Message("assistant", "word " * 200, True)])
    row = process_conversation(conversation, tokenizer, stops, TokenizeOptions(LIMIT, "left"))
    assert row["dropped"] == ANSWER_TOO_LONG and row["input_ids"] == [] and row["supervised"] == 0


def test_left_with_train_on_prompt_keeps_the_answer_and_trains_every_kept_token(tokenizer, stops):
    row = process_conversation(retrieval_row(tokenizer), tokenizer, stops,
                               TokenizeOptions(LIMIT, "left", train_on_prompt=True))
    assert row["labels"] == row["input_ids"] and len(row["input_ids"]) <= LIMIT
    assert tokenizer.decode(row["input_ids"]).endswith(f"{QUESTION}<|assistant|>\n{ANSWER}<|endoftext|>")
    assert row["answer_cut"] == 0 and row["prompt_cut"] > 0


def test_right_and_drop_are_unchanged(tokenizer, stops):
    conversation = retrieval_row(tokenizer)
    whole, _ = encode_for_training(tokenizer, conversation, stops)
    right = process_conversation(conversation, tokenizer, stops, TokenizeOptions(LIMIT, "right"))
    assert right["input_ids"] == whole[:LIMIT] and right["dropped"] == "no supervised token left after truncation"
    assert right["answer_cut"] == len(answer_tokens(tokenizer, stops))
    dropped = process_conversation(conversation, tokenizer, stops, TokenizeOptions(LIMIT, "drop"))
    assert dropped["dropped"] == TOO_LONG and dropped["input_ids"] == []


def prepare_left(cli, tmp_path, tiny_model, rows):
    """prepare's result and report for rows of which one is cut, one dropped (its answer alone too long), one kept."""
    data = write_json(tmp_path / "data.json", rows)
    result = cli("prepare", "--jsonl_path", data, "--save_path", tmp_path / "out", "--model", tiny_model,
                 "--max_seq_length", str(LIMIT), "--truncation", "left")
    assert result.code == 0, result.err
    report = json.loads((tmp_path / "out" / "manifest.json").read_text())["report"]
    assert report["kept"] == 2 and report["dropped"] == {ANSWER_TOO_LONG: 1} and report["truncated"] == {"left": 1}
    return result, report


def test_prepare_reports_the_prompt_and_answer_tokens_cut(cli, tmp_path, tiny_model, tokenizer, stops):
    long_prompt = retrieval_row(tokenizer).messages[0].content
    rows = [{"instruction": long_prompt, "output": ANSWER}, {"instruction": "q", "output": "word " * 200},
            {"instruction": "Short?", "output": "Yes."}]
    result, report = prepare_left(cli, tmp_path, tiny_model, rows)
    first = process_conversation(retrieval_row(tokenizer), tokenizer, stops, TokenizeOptions(LIMIT, "left"))
    assert report["prompt_tokens_cut"] == {"left": first["length"] - len(first["input_ids"])}
    assert report["answer_tokens_cut"] == {"left": 0}
    assert f"(1 cut left: {first['length'] - len(first['input_ids'])} prompt tokens, 0 answer tokens)" in result.out


class SlowView:
    """The tiny tokenizer seen as a slow one (no offsets), as some models' own tokenizers are."""

    is_fast = False

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def test_left_cuts_the_prompt_start_with_a_slow_tokenizer_too(tokenizer, stops):
    slow = SlowView(tokenizer)
    row = process_conversation(retrieval_row(tokenizer), slow, stops, TokenizeOptions(LIMIT, "left"))
    assert not row["dropped"] and LIMIT - 8 <= len(row["input_ids"]) <= LIMIT
    text = tokenizer.decode(row["input_ids"])
    assert text.startswith("[gMASK]<sop><|user|>\n") and "Document 0:" not in text
    assert text.endswith(f"{QUESTION}<|assistant|>\n{ANSWER}<|endoftext|>")
    assert tokenizer.decode(supervised(row)) == f"\n{ANSWER}<|endoftext|>"


def test_the_report_gives_token_counts_only_where_they_were_taken():
    """Cache entries older than the counts have rows truncated but no token counts."""
    from glmtune.data.report import PrepareReport

    pairs = "\n".join(PrepareReport(format="preference", max_seq_length=64, truncated={"right": 3}).lines())
    assert "rows truncated:    3 (3 cut right)" in pairs and "prompt tokens" not in pairs
    rows = "\n".join(PrepareReport(format="messages", max_seq_length=64, truncated={"left": 1},
                                   prompt_tokens_cut={"left": 269}, answer_tokens_cut={"left": 0}).lines())
    assert "(1 cut left: 269 prompt tokens, 0 answer tokens)" in rows


REJECTED = "Surely the first one, since every bond pays the same coupon."


def retrieval_pair(tokenizer, rejected: str = REJECTED):
    from glmtune.data.preference import PreferenceConversation

    row = retrieval_row(tokenizer)
    return PreferenceConversation(messages=row.messages, rejected=rejected)


def test_left_cuts_a_pairs_prompt_start_and_keeps_both_answers_whole(tokenizer, stops):
    from glmtune.data.preference import process_pair

    pair = process_pair(retrieval_pair(tokenizer), tokenizer, stops, TokenizeOptions(LIMIT, "left"))
    chosen, rejected = answer_tokens(tokenizer, stops), answer_tokens(tokenizer, stops, REJECTED)
    assert not pair["dropped"] and pair["cut"] and pair["length"] > 5 * LIMIT
    assert pair["chosen_ids"] == chosen and pair["rejected_ids"] == rejected  # whole, stop tokens included
    assert LIMIT - 3 <= len(pair["prompt_ids"]) + len(rejected) <= LIMIT  # the longer answer sets the room
    prompt = tokenizer.decode(pair["prompt_ids"])
    assert prompt.startswith("[gMASK]<sop><|user|>\n") and prompt.endswith(f"{QUESTION}<|assistant|>")
    assert "Document 0:" not in prompt
    assert pair["answer_cut"] == 0 and pair["prompt_cut"] == pair["length"] - len(rejected) - len(pair["prompt_ids"])


def test_left_drops_a_pairs_oldest_exchanges_before_cutting_its_last_prompt(tokenizer, stops):
    from glmtune.data.preference import PreferenceConversation, encode_pair, process_pair

    messages = []
    for i in range(3):
        messages += [Message("user", f"question {i} " + "pad " * 20), Message("assistant", f"answer {i}", i == 2)]
    pair = PreferenceConversation(messages=messages, rejected="no")
    last = encode_pair(tokenizer, PreferenceConversation(messages=messages[4:], rejected="no"), stops)
    fits = len(last[0]) + len(last[1])
    kept = process_pair(pair, tokenizer, stops, TokenizeOptions(fits + 5, "left"))
    assert (kept["prompt_ids"], kept["chosen_ids"], kept["rejected_ids"]) == last  # two whole exchanges went
    tighter = process_pair(pair, tokenizer, stops, TokenizeOptions(fits - 10, "left"))
    assert not tighter["dropped"] and len(tighter["prompt_ids"]) + len(tighter["chosen_ids"]) <= fits - 10
    assert tighter["chosen_ids"] == last[1] and tighter["rejected_ids"] == last[2]
    prompt = tokenizer.decode(tighter["prompt_ids"])
    assert "question 2" not in prompt and prompt.endswith("pad <|assistant|>")


def test_left_drops_a_pair_only_when_an_answer_alone_does_not_fit(tokenizer, stops):
    from glmtune.data.preference import PreferenceConversation, process_pair

    long_rejected = PreferenceConversation(messages=[Message("user", "q"), Message("assistant", "Yes.", True)],
                                           rejected="word " * 200)
    row = process_pair(long_rejected, tokenizer, stops, TokenizeOptions(LIMIT, "left"))
    assert row["dropped"] == ANSWER_TOO_LONG and row["chosen_ids"] == row["rejected_ids"] == []


def test_prepare_reports_the_tokens_cut_from_pairs(cli, tmp_path, tiny_model, tokenizer, stops):
    from glmtune.data.preference import process_pair

    long_prompt = retrieval_row(tokenizer).messages[0].content
    rows = [{"prompt": long_prompt, "chosen": ANSWER, "rejected": REJECTED},
            {"prompt": "q", "chosen": "Yes.", "rejected": "word " * 200},
            {"prompt": "Short?", "chosen": "Yes.", "rejected": "No."}]
    _, report = prepare_left(cli, tmp_path, tiny_model, rows)
    first = process_pair(retrieval_pair(tokenizer), tokenizer, stops, TokenizeOptions(LIMIT, "left"))
    assert report["prompt_tokens_cut"] == {"left": first["prompt_cut"]} and first["prompt_cut"] > 0
    assert report["answer_tokens_cut"] == {"left": 0}
