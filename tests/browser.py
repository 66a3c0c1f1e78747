"""Debian's chromium driven by Playwright, for the console's tests. Playwright's own browser download
is not reachable from here, so it launches the system binary; a missing browser fails the test with
what to install, never a skip (CI would pass without having looked at a page)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parent.parent


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


@cache
def _axe_source() -> str:
    """axe-core, installed by scripts/install-axe on first use (cached by version)."""
    run = subprocess.run(["bash", str(ROOT / "scripts" / "install-axe")], capture_output=True, text=True)
    if run.returncode != 0:
        pytest.fail(f"scripts/install-axe exited with {run.returncode}:\n{run.stderr}", pytrace=False)
    return Path(run.stdout.strip().removeprefix("AXE=")).read_text()


def serious_accessibility_violations(page: Page) -> list[dict[str, Any]]:
    """What axe-core finds on the page with a serious or critical impact: rule, help and elements.
    Evaluated through the browser's debugging protocol, so the page's CSP (rightly) does not stop it."""
    page.evaluate(_axe_source() + "\n;undefined")
    return page.evaluate("""async () => (await axe.run(document)).violations
        .filter(v => v.impact === "serious" || v.impact === "critical")
        .map(v => ({rule: v.id, help: v.help, elements: v.nodes.map(n => n.target.join(" "))}))""")
