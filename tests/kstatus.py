"""kstatus, the library Flux's health checks use to judge resources, run for real: the small Go program in
tests/kstatus/ around sigs.k8s.io/cli-utils/pkg/kstatus/status, built from the Go module proxy once and
cached by the digest of its sources (like scripts/build-control-plane's binaries)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).resolve().parent / "kstatus"
CACHE = Path(os.environ.get("AGENTSTUDIO_CACHE", Path.home() / ".cache" / "agentstudio"))


def binary() -> Path:
    digest = hashlib.sha256(b"".join((SOURCE / f).read_bytes() for f in ("go.mod", "go.sum", "main.go"))).hexdigest()
    path = CACHE / "kstatus" / digest[:16] / "kstatus"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "CGO_ENABLED": "0", "GOTOOLCHAIN": "local", "GOFLAGS": "-mod=readonly"}
        built = subprocess.run(["go", "build", "-trimpath", "-o", f"{path}.tmp", "."], cwd=SOURCE, env=env,
                               capture_output=True, text=True)
        assert built.returncode == 0, f"building kstatus failed:\n{built.stderr}"
        os.replace(f"{path}.tmp", path)
    return path


def compute(*objects: dict[str, Any]) -> list[dict[str, str]]:
    """kstatus's verdict on each object: {"status": "Current"|"InProgress"|"Failed"|…, "message": …}."""
    run = subprocess.run([str(binary())], input="".join(json.dumps(o) + "\n" for o in objects),
                         capture_output=True, text=True)
    assert run.returncode == 0, f"kstatus failed:\n{run.stderr}"
    return [json.loads(line) for line in run.stdout.splitlines()]
