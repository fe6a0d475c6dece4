"""The chat page at / in a real headless browser (Debian's chromium + chromium-driver, driven
by selenium): streaming, reasoning folded, multi-turn, the stop button."""

from __future__ import annotations

import shutil
import tempfile

import pytest
from serve_helpers import scripted_server

LONG = " ".join(f"word{i}" for i in range(600))
REPLIES = [
    "I should greet them.</think>Hello from turn one.",
    "</think>Second answer here.",
    "</think>" + LONG,
]


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.fail(
            "the chat page test needs Debian's packages 'chromium' and 'chromium-driver' "
            "(apt-get install chromium chromium-driver; .ci/run installs them)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    profile = tempfile.mkdtemp(prefix="mlx-deepseek-chromium-")
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--disable-sync",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options), profile


def test_chat_page_streams_folds_reasoning_keeps_turns_and_stops():
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with scripted_server(REPLIES, "deepseek-ai/DeepSeek-V3.1") as server:
        browser, profile = _browser()
        try:
            wait = WebDriverWait(browser, 30)
            browser.get(server.url + "/")
            wait.until(lambda b: b.find_element(By.ID, "model").text == "scripted")
            browser.find_element(By.ID, "think").click()

            def send(text: str) -> None:
                box = browser.find_element(By.ID, "input")
                box.send_keys(text)
                browser.find_element(By.ID, "send").click()

            def answers() -> list:
                return browser.find_elements(By.CSS_SELECTOR, ".assistant .answer")

            send("Hi there")
            wait.until(lambda b: answers() and answers()[0].text == "Hello from turn one.")
            wait.until(lambda b: b.find_element(By.ID, "send").is_enabled())
            details = browser.find_element(By.CSS_SELECTOR, ".assistant details.reasoning")
            assert details.get_attribute("open") is None  # folded
            details.click()
            assert "I should greet them." in details.text

            send("And again")  # the page sends the whole conversation: turn two
            wait.until(lambda b: len(answers()) == 2 and answers()[1].text == "Second answer here.")
            wait.until(lambda b: b.find_element(By.ID, "send").is_enabled())

            send("Go on")
            wait.until(lambda b: len(answers()) == 3 and "word3" in answers()[2].text)
            browser.find_element(By.ID, "stop").click()
            wait.until(lambda b: b.find_element(By.ID, "send").is_enabled())
            stats = browser.find_elements(By.CSS_SELECTOR, ".assistant .stats")[2].text
            assert stats == "stopped"
            assert "word599" not in answers()[2].text
            assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".user")] == [
                "Hi there",
                "And again",
                "Go on",
            ]
        finally:
            browser.quit()
            shutil.rmtree(profile, ignore_errors=True)
