"""The drawing page in a real browser: headless Chromium (Debian's chromium + chromium-driver) via Selenium.

Outside CI the tests skip when Chromium is missing; under CI=true they run (.ci/run installs it).
MNIST_PAGE_SCREENSHOTS=<folder> saves the screenshots shown in the README (docs/figures).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def _browser_missing() -> str | None:
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not Path(path).exists()]
    return (
        f"{', '.join(missing)} not installed (Debian packages chromium, chromium-driver)"
        if missing
        else None
    )


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    reason = _browser_missing()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        *FLAGS,
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
        "--window-size=1000,800",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(
        service=Service(CHROMEDRIVER), options=options
    )  # never a driver download
    yield driver
    driver.quit()


@pytest.fixture()
def page(browser, server):
    from selenium.webdriver.support.ui import WebDriverWait

    browser.set_window_size(1000, 800)
    browser.get(f"http://127.0.0.1:{server.http_port}/")
    WebDriverWait(browser, 30).until(
        lambda b: b.find_element("tag name", "body").get_attribute("data-ready") == "true"
    )
    return browser


def _screenshot(browser, name: str) -> None:
    folder = os.environ.get("MNIST_PAGE_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(Path(folder) / name))


def _answer(browser, previous: str = "") -> str:
    """The predicted label once the page shows one (other than `previous`)."""
    from selenium.webdriver.support.ui import WebDriverWait

    label = browser.find_element("id", "label")
    WebDriverWait(browser, 20).until(
        lambda _: label.get_attribute("data-label") not in ("", previous)
    )
    return label.get_attribute("data-label")


def _settled_answer(browser) -> str:
    """The label once the page has answered for the whole drawing. The page sends the pad after
    the first stroke and again when that answer returns, so a first label can be about part of
    a drawing (a lone dot); this waits until no request is out and none is pending."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 30).until(
        lambda b: b.execute_script(
            "return !state.inFlight && !state.dirty && document.getElementById('label').dataset.label !== ''"
        )
    )
    return browser.find_element("id", "label").get_attribute("data-label")


def _seen_ink(browser) -> int:
    """How many of the 28x28 pixels the page shows as what the model saw are inked."""
    return browser.execute_script(
        "const d = document.getElementById('seen').getContext('2d').getImageData(0, 0, 28, 28).data;"
        "let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i] > 0) n++; return n;"
    )


def _draw(browser, strokes: list[list[tuple[int, int]]]) -> None:
    """Pointer strokes in the pad's own 280x280 coordinates, through real pointer events."""
    from selenium.webdriver.common.action_chains import ActionChains

    pad = browser.find_element("id", "pad")
    scale = pad.rect["width"] / 280

    def offset(x: int, y: int) -> tuple[int, int]:  # from the element's centre
        return round((x - 140) * scale), round((y - 140) * scale)

    actions = ActionChains(browser)
    for stroke in strokes:
        actions.move_to_element_with_offset(pad, *offset(*stroke[0])).click_and_hold()
        for point in stroke[1:]:
            actions.move_to_element_with_offset(pad, *offset(*point))
        actions.release()
    actions.perform()


def test_drawing_a_7_is_read_as_7(page):
    top = [(x, 60) for x in range(70, 211, 14)]
    stem = [(210 - 11 * k, 60 + 20 * k) for k in range(1, 10)]
    _draw(page, [top + stem])
    assert _answer(page) == "7"
    assert page.find_element("id", "confidence").text.endswith("% sure")
    assert _seen_ink(page) > 20  # the framed 28x28 image the model saw is on the page
    bars = page.find_elements("css selector", "#bars li")
    assert len(bars) == 10 and "top" in bars[7].get_attribute("class")
    _screenshot(page, "page_draw_7.png")

    page.find_element("id", "clear").click()
    assert (
        page.find_element("id", "label").get_attribute("data-label") == "" and _seen_ink(page) == 0
    )


def test_random_digit_shows_a_digit_and_its_prediction(page):
    page.find_element("id", "random").click()
    label = _answer(page)
    assert label in "0123456789"
    truth = page.find_element("id", "truth").text
    assert truth.startswith("MNIST test image ") and "labelled" in truth
    assert _seen_ink(page) > 20
    assert page.find_element("id", "status").text == ""  # no error shown
    _screenshot(page, "page_random_digit.png")


def test_the_keyboard_draws_too(page):
    from selenium.webdriver.common.keys import Keys

    pad = page.find_element("id", "pad")
    page.find_element(
        "id", "clear"
    ).click()  # an empty pad whatever ran before; Clear focuses the pad
    assert (
        _seen_ink(page) == 0 and page.find_element("id", "label").get_attribute("data-label") == ""
    )
    pad.send_keys(Keys.SPACE)  # pen down at the pad's centre
    pad.send_keys(*([Keys.SHIFT + Keys.ARROW_UP] * 4))
    pad.send_keys(*([Keys.SHIFT + Keys.ARROW_DOWN] * 8))
    pad.send_keys(Keys.SPACE)
    assert _settled_answer(page) == "1"  # a vertical stroke, judged whole


def test_the_page_fits_a_phone_screen(page):
    page.set_window_size(390, 844)
    assert page.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    pad = page.find_element("id", "pad")
    assert pad.rect["width"] <= 390 and pad.rect["width"] >= 250
    _draw(page, [[(140, 40), (140, 240)]])
    assert _answer(page) in "0123456789"
    page.set_window_size(390, 1400)  # the whole page in one picture
    _screenshot(page, "page_phone.png")
