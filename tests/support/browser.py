"""A real headless Chromium (Debian's `chromium` + `chromium-driver`) driven by Selenium.

Selenium is pointed at the system binaries, so it never looks for or downloads a browser. Outside CI
a missing browser skips the browser tests (with the command that installs it); in CI it fails them,
because `scripts/test.sh` installs it.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from typing import TypeVar

import pytest

CHROMIUM = os.environ.get("JANUS_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("JANUS_TEST_CHROMEDRIVER", "/usr/bin/chromedriver")
T = TypeVar("T")


def require_browser() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if shutil.which(p) is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip)")
    if not missing:
        return
    message = (f"browser test needs {', '.join(missing)}: "
               "apt-get install chromium chromium-driver (scripts/test.sh does)")
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def start_chromium(width: int = 1280, height: int = 900):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}", "--no-first-run", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--metrics-recording-only", "--disable-default-apps", "--force-prefers-reduced-motion"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(30)
    return driver


def console_problems(driver, allowed_statuses: tuple[int, ...] = ()) -> list[str]:
    """SEVERE browser-log entries: JavaScript errors and console.error calls, and failed network loads.

    A failed load whose status is in `allowed_statuses` is one the test provoked on purpose (the page
    shows it as a message); it is not counted.
    """
    problems = []
    for entry in driver.get_log("browser"):
        if entry.get("level") != "SEVERE":
            continue
        message = entry.get("message", "")
        if entry.get("source") == "network" and any(f"status of {s}" in message for s in allowed_statuses):
            continue
        problems.append(f"{entry.get('source')}: {message}")
    return problems


def wait_for(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll `condition` until it returns something truthy; generous timeouts for a loaded machine."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
