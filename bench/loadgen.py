"""The load generator for the benchmarks: vegeta (Go), built once from the Go module proxy into
~/.cache/agentstudio/bin, run in its own process."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

VEGETA_VERSION = "v12.12.0"
CACHE = Path(os.environ.get("AGENTSTUDIO_CACHE", Path.home() / ".cache" / "agentstudio"))


def vegeta() -> str:
    path = CACHE / "bin" / f"vegeta-{VEGETA_VERSION}"
    if not path.exists():
        build = CACHE / "build" / "vegeta"
        build.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["go", "install", f"github.com/tsenart/vegeta/v12@{VEGETA_VERSION}"],
            env={**os.environ, "GOBIN": str(build)},
            check=True,
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(build / "vegeta"), path)
    return str(path)


@dataclass
class Result:
    rate: float  # successful requests per second
    p50_ms: float
    p99_ms: float
    requests: int
    status_codes: dict[str, int]


def attack(url: str, bodies: list[dict[str, object]], headers: dict[str, str], *, seconds: float,
           rate: int = 0, workers: int = 32) -> Result:
    """Send the bodies round robin. rate=0: as fast as `workers` connections allow (closed loop);
    otherwise that many per second."""
    header = {k: [v] for k, v in {**headers, "Content-Type": "application/json"}.items()}
    targets = "".join(
        json.dumps({"method": "POST", "url": url, "header": header,
                    "body": base64.b64encode(json.dumps(body).encode()).decode()}) + "\n"
        for body in bodies
    )
    args = [vegeta(), "attack", "-format=json", f"-duration={seconds}s", f"-rate={rate}/s",
            f"-workers={workers}", "-keepalive=true"]
    args[4] = "-rate=0" if rate == 0 else f"-rate={rate}/s"
    if rate == 0:
        args.append(f"-max-workers={workers}")
    run = subprocess.run(args, input=targets.encode(), capture_output=True)
    if run.returncode != 0:
        raise RuntimeError(f"vegeta attack failed: {run.stderr.decode()[-2000:]}")
    attack_out = run.stdout
    report = json.loads(
        subprocess.run([vegeta(), "report", "-type=json"], input=attack_out, capture_output=True, check=True).stdout
    )
    return Result(
        rate=report["throughput"],
        p50_ms=report["latencies"]["50th"] / 1e6,
        p99_ms=report["latencies"]["99th"] / 1e6,
        requests=report["requests"],
        status_codes=report["status_codes"],
    )
