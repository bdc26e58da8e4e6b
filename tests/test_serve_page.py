"""The chat page at / in a real headless browser (Debian's chromium, driven by Selenium).

Skipped when chromium or its driver is missing, unless GPT2_BROWSER_TEST=required (.ci/run
installs them and sets it), so CI cannot pass without running it.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest

from tests.helpers_serve import SERVE_KEY, ServerProcess, metric, post_json, request

pytestmark = pytest.mark.slow
AUTH = {"Authorization": f"Bearer {SERVE_KEY}"}


def _browser_paths() -> tuple[str, str] | None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (chromium, driver) if chromium and driver else None


@pytest.fixture(scope="module")
def browser():
    paths = _browser_paths()
    if paths is None:
        if os.environ.get("GPT2_BROWSER_TEST") == "required":
            pytest.fail(
                "chromium and chromedriver are required (apt-get install chromium chromium-driver)"
            )
        pytest.skip("no chromium + chromedriver (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = paths[0]
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(paths[1]), options=options)
    driver.set_window_size(390, 844)  # a phone
    try:
        yield driver
    finally:
        driver.quit()


def _wait(condition, timeout: float = 60, step: float = 0.02):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(step)
    raise AssertionError("timed out")


def _open(browser, port: int, max_tokens: int | None) -> None:
    """The page with the API key, greedy, and `max_tokens` (None: the page's default)."""
    browser.get(f"http://127.0.0.1:{port}/")
    browser.execute_script(
        """
        document.getElementById("api_key").value = arguments[0];
        document.getElementById("temperature").value = "0";
        if (arguments[1] !== null) document.getElementById("max_tokens").value = arguments[1];
        """,
        SERVE_KEY,
        None if max_tokens is None else str(max_tokens),
    )


def _send(browser, text: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = browser.find_element(By.ID, "input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def _replies(browser) -> list[str]:
    return browser.execute_script(
        "return [...document.querySelectorAll('.msg.assistant')].map(e => e.textContent)"
    )


def _idle(browser) -> bool:
    return browser.execute_script("return !document.getElementById('send').disabled")


def test_page_works_offline_and_fits_a_phone(serve_tiny):
    status, headers, html = request(serve_tiny.port, "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    page = html.decode()
    assert 'name="viewport"' in page
    assert "<script src" not in page and "<link" not in page and "https://" not in page


def test_chat_page_streams_the_reply_the_api_gives(browser, serve_tiny):
    _open(browser, serve_tiny.port, 12)
    _send(browser, "Hello there")
    _wait(lambda: _replies(browser) and _idle(browser))
    shown = _replies(browser)[0]
    _, _, body = post_json(
        serve_tiny.port,
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "Hello there"}],
            "temperature": 0,
            "top_p": 0.95,
            "repetition_penalty": 1.2,
            "max_tokens": 12,
        },
        AUTH,
    )
    assert shown == body["choices"][0]["message"]["content"] != ""
    no_sideways_scroll = "return document.documentElement.scrollWidth <= window.innerWidth"
    assert browser.execute_script(no_sideways_scroll)


def test_stop_button_cancels_the_stream(browser, serve_tiny):
    _open(browser, serve_tiny.port, 90)  # the preamble and this turn leave ~100 of 128
    cancelled = metric(serve_tiny.port, "gpt2_cancelled_total", AUTH)
    _send(browser, "Tell me a long story")
    _wait(lambda: not _idle(browser) and _replies(browser)[-1])  # streaming, some text shown
    browser.execute_script("document.getElementById('stop').click()")
    _wait(lambda: _idle(browser))
    _wait(lambda: metric(serve_tiny.port, "gpt2_cancelled_total", AUTH) == cancelled + 1, 10)
    _wait(lambda: metric(serve_tiny.port, "gpt2_busy_rows", AUTH) == 0, 10)


@pytest.fixture(scope="module")
def serve_demo():
    """`gpt2 serve -m shakespeare`: the bundled demo model, a 128-token window (one row: the
    page is one client, and fewer programs compile)."""
    server = ServerProcess("--api-key", SERVE_KEY, "--max-batch", "1", model="shakespeare")
    try:
        server.wait_ready(900)
        yield server
    finally:
        assert server.stop() == 0


def test_twenty_turns_with_the_demo_model_never_show_an_error(browser, serve_demo):
    """The page sends truncation "auto" and, by default, a quarter of the window as max_tokens:
    the oldest turns make room, the page forgets them too, and no turn fails."""
    _open(browser, serve_demo.port, None)
    for i in range(20):
        _send(browser, f"Good morrow, tell me of the king, turn {i}")
        _wait(lambda i=i: len(_replies(browser)) == i + 1 and _idle(browser))
    errors = browser.execute_script(
        "return [...document.querySelectorAll('.msg.error')].map(e => e.textContent)"
    )
    assert errors == []
    sent = browser.execute_script("return messages.length")
    assert sent < 40  # the page dropped the turns the server left out
    assert metric(serve_demo.port, "gpt2_prefix_cache_hits_total", AUTH) > 0
