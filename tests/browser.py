"""Debian's chromium driven by Playwright, for the console's tests. Playwright's own browser download
is not reachable from here, so it launches the system binary; a missing browser fails the test with
what to install, never a skip (CI would pass without having looked at a page)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from playwright.sync_api import Browser, sync_playwright

CHROMIUM = "/usr/bin/chromium"


@contextmanager
def chromium() -> Iterator[Browser]:
    if not (os.access(CHROMIUM, os.X_OK) or shutil.which("chromium")):
        pytest.fail(f"no browser at {CHROMIUM}: run scripts/setup-node-packages as root "
                    "(apt-get install --no-install-recommends chromium)", pytrace=False)
    # Chromium's sandbox refuses to run as root; outside root it stays on.
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=args, headless=True)
        try:
            yield browser
        finally:
            browser.close()
