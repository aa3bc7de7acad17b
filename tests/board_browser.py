"""A real headless browser for the board's tests: Debian's chromium and chromedriver driven by Selenium, which is
given both paths so that nothing downloads a browser. Without chromium the tests skip, except in CI (CI=true), where
a missing browser is a failure (.ci/run installs it)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,1400",
                  "--disable-dev-shm-usage")


def browser_paths() -> tuple[str, str]:
    """(chromium, chromedriver); skips the test without them, or fails it in CI."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium and driver:
        return chromium, driver
    reason = "Debian's chromium and chromium-driver are not installed (apt-get install -y chromium chromium-driver)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}: CI must run the browser tests")
    pytest.skip(reason)


def new_browser() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tempfile.mkdtemp(prefix='glmtune-chromium-')}"):
        options.add_argument(flag)
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not look for a driver or browser online
    browser = webdriver.Chrome(service=Service(driver), options=options)
    browser.implicitly_wait(0)
    return browser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BoardServer:
    """`glmtune board` in a subprocess, as a user starts it."""

    def __init__(self, folder: Path, log: Path):
        self.folder, self.port = folder, free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen([sys.executable, "-m", "glmtune", "board", "--port", str(self.port),
                                         "--output_dir", str(folder)], stdout=self._log, stderr=subprocess.STDOUT)
        wait_for(self._answers, 120, "the board to answer")

    def _answers(self) -> bool:
        assert self.process.poll() is None, f"the board exited with {self.process.returncode}"
        try:
            return urllib.request.urlopen(self.url, timeout=2).status == 200
        except OSError:
            return False

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)
        self._log.close()


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.time() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.25)


class Page:
    """The board in one browser, addressed by the elem_ids the pages give their components."""

    def __init__(self, browser: Any, url: str):
        self.browser = browser
        browser.get(url)
        wait_for(lambda: self.find("#tab-train-button"), 60, "the page to render")

    def find(self, css: str) -> Any:
        from selenium.common.exceptions import WebDriverException

        try:
            found = self.browser.find_elements("css selector", css)
        except WebDriverException:
            return None
        return found[0] if found else None

    def field(self, elem_id: str) -> Any:
        return wait_for(lambda: self.find(f"#{elem_id} textarea") or self.find(f"#{elem_id} input"), 30, elem_id)

    def value(self, elem_id: str) -> str:
        return self.field(elem_id).get_property("value") or ""

    def text(self, elem_id: str) -> str:
        element = self.find(f"#{elem_id}")
        return element.text if element is not None else ""

    def set(self, elem_id: str, value: object) -> None:
        from selenium.webdriver.common.keys import Keys

        element = self.field(elem_id)
        element.send_keys(Keys.CONTROL, "a")
        element.send_keys(Keys.DELETE)
        element.send_keys(str(value))
        element.send_keys(Keys.TAB)  # numbers commit on blur

    def click(self, elem_id: str) -> None:
        button = wait_for(lambda: self.find(f"#{elem_id}"), 30, elem_id)
        self.browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", button)
        button.click()

    def tab(self, name: str) -> None:
        self.click(f"tab-{name}-button")

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.browser.save_screenshot(str(path))
