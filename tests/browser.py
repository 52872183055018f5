"""A headless Chromium for tests that drive pages (Debian's chromium and chromium-driver packages, via Selenium)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

T = TypeVar("T")

CHROMIUM = Path(os.environ.get("DIALTONE_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("DIALTONE_TEST_CHROMEDRIVER", "/usr/bin/chromedriver"))
INSTALL_HINT = "sudo apt-get install -y chromium chromium-driver"
WINDOW = (1280, 800)


def missing_browser() -> str | None:
    """Why browser tests cannot run here (the browser or its driver is not installed), or None when they can."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not (path.is_file() and os.access(path, os.X_OK))]
    if not missing:
        return None
    return f"{' and '.join(missing)} not installed (install them: {INSTALL_HINT})"


@contextmanager
def headless_chromium() -> Iterator[webdriver.Chrome]:
    """Chromium with a laptop-sized window, allowed to play audio without a gesture so that a page that tried to
    would be caught, and with a fresh profile of its own."""
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root, where Chromium's sandbox cannot start
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        "--autoplay-policy=no-user-gesture-required",
        "--hide-scrollbars",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        "--force-device-scale-factor=1",
        "--lang=en-US",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    try:
        # The page's viewport itself is the laptop's 1280x800, whatever the headless window's frame takes.
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": WINDOW[0], "height": WINDOW[1], "deviceScaleFactor": 1, "mobile": False},
        )
        yield driver
    finally:
        driver.quit()


async def in_browser(action: Callable[[], T]) -> T:
    """Run a (blocking) WebDriver call off the event loop, so the engine under test keeps serving meanwhile."""
    return await asyncio.to_thread(action)


async def until(condition: Callable[[], T | None], *, timeout_s: float, what: str) -> T:
    """Poll `condition` (run off the event loop) until it returns something truthy; that value."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        value = await in_browser(condition)
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"the page never showed {what} within {timeout_s:.0f} s")
        await asyncio.sleep(0.1)
