"""The scripts a new user runs first: they say what they are doing, and what they install fits the
machine they run on."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from conftest import ROOT
from twilio_mock import prism_path


def test_setup_says_what_it_does_before_the_long_install(tmp_path: Path) -> None:
    """A fresh clone's first `scripts/setup` spends about a minute in pip: it must not look hung."""
    clone = tmp_path / "clone"
    clone.mkdir()
    shutil.copytree(ROOT / "scripts", clone / "scripts")
    shutil.copy(ROOT / "pyproject.toml", clone)
    proc = subprocess.Popen(["bash", str(clone / "scripts" / "setup")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    said: list[str] = []
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            said.append(line.rstrip("\n"))
            if line.startswith("setup: installing"):
                break
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the install itself is not what this test is about
        proc.wait(timeout=30)
    assert re.fullmatch(r"setup: creating \.venv with Python 3\.\d+\.\d+", said[0]), said
    assert said[1] == ("setup: installing agentstudio and its dependencies into .venv "
                       "(about a minute the first time; later runs skip this)"), said


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def test_the_pinned_prism_supports_the_node_it_runs_on() -> None:
    """npm warns EBADENGINE when a package declares a newer Node than the one installing it; the pin
    must be a Prism that says it runs on ours, not one that happens to."""
    prism = Path(prism_path())
    package = json.loads((prism.parent.parent / "@stoplight" / "prism-cli" / "package.json").read_text())
    wanted = package["engines"]["node"]
    assert wanted.startswith(">="), wanted
    node = subprocess.run(["node", "--version"], capture_output=True, text=True, check=True).stdout.strip()
    assert _version(node) >= _version(wanted), f"Prism {package['version']} wants node {wanted}; this is {node}"
