"""Driving the Gradio Space in Debian's Chromium through Playwright (tests and ``scripts/space_screenshot.py``).

The browser is the system ``chromium`` (installed by ``scripts/install_browser.sh``), never one downloaded by
``playwright install``: machines here reach package registries only. Import as ``from browser import ...``
(pytest puts ``tests/`` on ``sys.path``; the screenshot script adds it).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# What the status line says when a run is over: a success or a warning (progress shows on the cards, not here).
FINAL_STATUS = re.compile(r"^\s*(Compared in|⚠️)")
RESULT_TIMEOUT_MS = 120_000  # a click runs two models several times; a loaded 2-core CI machine is slow


def chromium_path() -> str | None:
    """The system Chromium, or None when it is not installed."""
    return shutil.which("chromium")


@contextmanager
def chromium_page(width: int = 1280, height: int = 900) -> Iterator[Any]:
    """A Playwright page in headless system Chromium; closed (with the browser) on exit."""
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    if executable is None:
        raise RuntimeError("chromium is not installed; run scripts/install_browser.sh")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(RESULT_TIMEOUT_MS)
            yield page
        finally:
            browser.close()


def open_app(page: Any, url: str) -> None:
    """Load the app and wait until the Compare button is there (the page is a JS app)."""
    page.goto(url, wait_until="domcontentloaded")
    page.wait_for_selector("#compare-button", state="visible")


def run_compare(page: Any, text: str) -> dict[str, Any]:
    """Type ``text``, click Compare, wait for the status line to say how it went; return what the page shows.

    The status must change, so two consecutive runs must end with different messages (true of the tests' runs).
    """
    from playwright.sync_api import expect

    status = page.locator("#status")
    before = status.inner_text()
    page.fill("#input-text textarea", text)
    page.click("#compare-button")
    expect(status).not_to_have_text(before, timeout=RESULT_TIMEOUT_MS)
    expect(status).to_have_text(FINAL_STATUS, timeout=RESULT_TIMEOUT_MS)
    shown: dict[str, Any] = {"status": status.inner_text().strip()}
    for side in ("original", "pruned"):
        card = page.locator(f"#{side}-output")
        if card.locator(".pred-label").count() == 0:
            shown[side] = None
            continue
        labels, probs = card.locator(".prob-label"), card.locator(".prob")
        shown[side] = {
            "label": card.locator(".pred-label").inner_text().strip(),
            "probabilities": {
                labels.nth(i).inner_text().strip(): probs.nth(i).inner_text().strip() for i in range(probs.count())
            },
            "generated": card.locator(".generated").inner_text().strip(),
            "latency": card.locator(".latency").inner_text().strip(),
            "tokens_per_s": card.locator(".tokens-per-s").inner_text().strip(),
        }
    return shown
