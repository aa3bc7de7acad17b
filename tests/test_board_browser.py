"""The board in a real headless browser (tests/board_browser.py), on the demo model: the whole job from the data
report to a chat with the tuned adapter, a second browser seeing the same run and stopping it, and the languages."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from board_browser import BoardServer, Page, browser_paths, new_browser, wait_for

PROMPT = "什么是股票？"


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    browser_paths()  # skip (or fail in CI) before starting anything
    folder = tmp_path_factory.mktemp("board")
    server = BoardServer(folder / "runs", folder / "board.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    """Each page's screenshot; GLMTUNE_BOARD_SCREENSHOTS names a folder to keep them in (docs/images/board.png is
    the Train page's)."""
    folder = os.environ.get("GLMTUNE_BOARD_SCREENSHOTS")
    return Path(folder) if folder else tmp_path_factory.mktemp("board-screenshots")


@pytest.fixture
def page(board):
    browser = new_browser()
    yield Page(browser, board.url)
    browser.quit()


def test_the_demo_data_report_a_short_training_and_a_chat_with_its_adapter(board, page, screenshots):
    # Data: the bundled demo data and the demo model are the defaults; the report is prepare's dry run.
    assert page.value("data-file").endswith("finance_qa.json")
    page.click("data-report-button")
    report = wait_for(lambda: "rows kept:" in page.value("data-report") and page.value("data-report"), 180,
                      "the dataset report")
    assert re.search(r"rows read:\s+48\b", report) and re.search(r"format:\s+alpaca", report)
    assert page.value("data-command").startswith("glmtune prepare --model ")
    assert "--dry_run true" in page.value("data-command")
    trained = wait_for(lambda: page.browser.find_elements("css selector", "#data-samples .token.highlighted"), 30,
                       "highlighted trained spans")
    assert any("股票是股份公司发行的所有权凭证" in span.text for span in trained)  # sample 1's answer, trained
    wait_for(lambda: page.find("#data-histogram .vega-embed"), 30, "the length histogram")
    page.screenshot(screenshots / "data.png")

    # Train: a few steps; the curve appears while it runs, and the run finishes.
    page.tab("train")
    for elem_id, value in (("train-name", "e2e"), ("train-max-steps", 4), ("train-batch", 4), ("train-lr", 0.003),
                           ("train-log-steps", 1), ("train-save-steps", 2)):
        page.set(elem_id, value)
    page.click("train-start")
    command = wait_for(lambda: page.value("train-command"), 30, "the training command")
    assert command.startswith("glmtune train ") and "--max_steps 4" in command and "--output_dir " in command
    wait_for(lambda: page.find("#train-loss .vega-embed"), 240, "the loss curve")
    wait_for(lambda: page.value("train-status") == "finished", 240, "the run to finish")
    assert page.value("train-progress").startswith("step 4/4")
    page.screenshot(screenshots / "train.png")
    run_dir = board.folder / "e2e"
    assert (run_dir / "manifest.json").is_file() and (run_dir / "adapter_model.safetensors").is_file()

    # Chat with the adapter: the page's answer is the one `glmtune infer` gives for the same adapter and prompt.
    page.tab("chat")
    page.set("chat-adapter", run_dir)
    page.set("chat-max-new", 32)
    page.field("chat-compare").click()
    page.set("chat-message", PROMPT)
    page.click("chat-send")
    wait_for(lambda: page.value("chat-command").startswith("glmtune chat "), 180, "the chat command")
    answer = wait_for(lambda: _settled_answer(page, "chat-tuned"), 180, "the streamed answer to end")
    base_answer = wait_for(lambda: _settled_answer(page, "chat-base"), 180, "the base model's answer")
    model = str(board.folder / "demo-base-model")
    infer = subprocess.run([sys.executable, "-m", "glmtune", "infer", "--model", model, "--peft_path", str(run_dir),
                            "--prompt", PROMPT, "--max_new_tokens", "32", "--quiet"],
                           capture_output=True, text=True, check=True)
    expected = json.loads(infer.stdout.strip().splitlines()[-1])["response"]
    assert answer.split() == expected.split()  # the page shows line breaks and tabs as the browser lays them out
    assert base_answer.split() != answer.split()  # the base model, beside it, is not the tuned one
    page.screenshot(screenshots / "chat.png")

    # Plan: plan's estimate for the same model, as a chart and plan's own text, on a device too small for it.
    page.tab("plan")
    page.set("plan-memory", 1)
    page.click("plan-button")
    text = wait_for(lambda: "total (peak)" in page.value("plan-text") and page.value("plan-text"), 60, "the plan")
    assert re.search(r"does not fit: [\d.]+ GiB of 1\.00 GiB", text) and "<- fits" in text  # and plan's way out
    assert page.value("plan-command").startswith("glmtune plan --model ")
    wait_for(lambda: page.find("#plan-chart .vega-embed"), 30, "the memory chart")
    page.screenshot(screenshots / "plan.png")
    page.tab("export")
    page.screenshot(screenshots / "export.png")


def _settled_answer(page: Page, chatbot: str) -> str | None:
    """The last answer in a chat once it has stopped changing (the stream is done)."""
    bubbles = page.browser.find_elements("css selector", f"#{chatbot} [data-testid='bot']")
    if not bubbles:
        return None
    first = bubbles[-1].text
    time.sleep(1.0)
    again = page.browser.find_elements("css selector", f"#{chatbot} [data-testid='bot']")
    return first.strip() if again and again[-1].text == first and first.strip() else None


def test_a_second_browser_sees_the_running_run_and_its_stop_leaves_a_loadable_checkpoint(board, page, screenshots):
    other = Page(new_browser(), board.url)  # open before the run starts: the run must appear there by itself
    try:
        other.tab("train")
        page.tab("train")
        for elem_id, value in (("train-name", "long"), ("train-max-steps", 500), ("train-batch", 2),
                               ("train-log-steps", 1), ("train-save-steps", 1000)):
            page.set(elem_id, value)
        page.click("train-start")
        wait_for(lambda: page.value("train-status") == "running", 60, "the run to start")
        wait_for(lambda: other.value("train-runs") == "long", 30, "the second browser to show the run")
        wait_for(lambda: re.match(r"step [1-9]\d*/500", other.value("train-progress")), 240, "a first step")
        assert other.value("train-status") == "running"
        assert other.value("train-command") == page.value("train-command")
        other.click("train-stop")
        wait_for(lambda: other.value("train-status") == "stopped", 120, "the run to stop")
        wait_for(lambda: page.value("train-status") == "stopped", 30, "the first browser to see it stopped")
        other.screenshot(screenshots / "train-stopped.png")
    finally:
        other.browser.quit()

    checkpoints = sorted((board.folder / "long").glob("checkpoint-*"))
    assert len(checkpoints) == 1 and "saving a checkpoint" in (board.folder / ".board" / "long" / "log.txt").read_text()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(board.folder / "demo-base-model")
    tuned = PeftModel.from_pretrained(base, checkpoints[0])
    assert any("lora_B" in name and param.abs().sum() > 0 for name, param in tuned.named_parameters())


def test_the_language_switch_relabels_the_page(page):
    page.click("language")
    zh = wait_for(lambda: page.find("#language input[value='zh']"), 10, "the zh choice")
    zh.click()
    wait_for(lambda: page.text("tab-train-button") == "训练", 30, "the Chinese labels")
    assert "数据文件" in page.text("data-file")
