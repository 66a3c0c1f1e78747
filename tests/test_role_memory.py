"""A role loads only what it uses: an ingest worker neither the voice runtime (the model client and
the relay) nor Kubernetes' or kopf's SDKs, a dialer not kopf. Each would cost every replica memory
for nothing (bench/memory.py measures the roles)."""

from __future__ import annotations

import subprocess
import sys

import pytest

NOT_LOADED = {
    "agentstudio.ingest.app": ("agentstudio.conversation.llm", "agentstudio.conversation.relay", "kubernetes", "kopf"),
    "agentstudio.dialer.main": ("kopf",),
}


@pytest.mark.parametrize("module", sorted(NOT_LOADED))
def test_a_role_loads_only_the_sdks_it_uses(module: str) -> None:
    check = (f"import sys, {module}\n"
             f"print(' '.join(m for m in {NOT_LOADED[module]!r} if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [], f"{module} loads {run.stdout.strip()}"
