"""bench/ingest: POST /api/v1/webhooks/ingest (auth, validation, rate limit, JetStream ack) against a
bare FastAPI+uvicorn route answering the same 201 with no I/O, both measured in this run with one
uvicorn worker each and the same load generator (vegeta) in its own process.

    .venv/bin/python bench/ingest.py [--seconds 10] [--connections 32]

Prints JSON and writes bench/results/ingest.json and ingest.png. Not a test: nothing asserts on it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from loadgen import Result, attack  # noqa: E402

from agentstudio import bundle_store, bus, keys  # noqa: E402
from agentstudio.bundle import KeyMaterial, compile_bundle  # noqa: E402
from agentstudio.manifests import load_dir  # noqa: E402
from agentstudio.natsserver import NatsServer, free_port  # noqa: E402

# The bare app's publish subject must be in the CALLS stream (created by ingest at start).
SEED = {
    "workflow_slug": "free-trial-followup",
    "phone_number": "+919876543210",
    "user_id": "user-123",
    "user_context": {"name": "John", "trial_started_at": "2026-02-01", "plan_type": "premium"},
    "metadata": {"campaign_id": "trial_recovery_jan", "source": "clevertap"},
}
# A campaign calls many different people: distinct valid numbers and user ids, round robin.
BODIES = [
    {**SEED, "phone_number": f"+9198765{i:05d}", "user_id": f"user-{i}"} for i in range(2000)
]


async def publish_tenant(nats_url: str, key: str) -> None:
    resources, problems = load_dir(ROOT / "examples")
    assert not problems
    result = compile_bundle("bench", resources, {"clevertap": [KeyMaterial(keys.digest(key))]})
    assert result.bundle is not None
    nc = await bus.connect(nats_url, "bench")
    # A limit no benchmark reaches: the shared counter is still leased, as for any key.
    bundle = result.bundle
    entry = bundle.keys[keys.digest(key)].model_copy(update={"rate_limit_per_minute": 1_000_000_000})
    bundle = bundle.model_copy(update={"keys": {keys.digest(key): entry}})
    await bundle_store.publish(await bundle_store.buckets(nc.jetstream()), bundle)
    await nc.close()


def serve(args: list[str], env: dict[str, str], ready_url: str, log: Path) -> subprocess.Popen[bytes]:
    """Start a server and wait until it answers; if it exits or never answers, say what it said."""
    with open(log, "ab") as out:  # stderr only: the servers' request logs are off
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=out)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(ready_url).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    proc.wait()
    said = log.read_text(errors="replace")[-4000:]
    raise RuntimeError(f"{args} never became ready (exit status {proc.returncode}):\n{said}")


def measure(name: str, url: str, headers: dict[str, str], seconds: float, connections: int) -> dict[str, Result]:
    attack(url, BODIES, headers, seconds=2, workers=connections)  # warm-up
    peak = attack(url, BODIES, headers, seconds=seconds, workers=connections)
    print(f"{name}: {peak.rate:.0f} req/s at {connections} connections", file=sys.stderr)
    return {"max": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()

    key = keys.generate("live")
    headers = {"Authorization": f"Bearer {key}"}
    bin_dir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory() as tmp, NatsServer(Path(tmp) / "nats") as nats:
        asyncio.run(publish_tenant(nats.url, key))
        ingest_port, bare_port, floor_port = free_port(), free_port(), free_port()
        env = {**os.environ, "AGENTSTUDIO_NATS_URL": nats.url, "AGENTSTUDIO_HOST": "127.0.0.1",
               "AGENTSTUDIO_PORT": str(ingest_port), "AGENTSTUDIO_LOG_LEVEL": "INFO"}
        ingest = serve([str(bin_dir / "agent-studio"), "ingest", "--workers", "1"], env,
                       f"http://127.0.0.1:{ingest_port}/readyz", Path(tmp) / "ingest.log")
        bare = serve([str(bin_dir / "uvicorn"), "bare_app:app", "--app-dir", str(ROOT / "bench"), "--host",
                      "127.0.0.1", "--port", str(bare_port), "--workers", "1", "--no-access-log",
                      "--log-level", "warning"], os.environ.copy(), f"http://127.0.0.1:{bare_port}/docs",
                     Path(tmp) / "bare.log")
        floor = serve([str(bin_dir / "uvicorn"), "bare_app:app", "--app-dir", str(ROOT / "bench"), "--host",
                       "127.0.0.1", "--port", str(floor_port), "--workers", "1", "--no-access-log",
                       "--log-level", "warning"], {**os.environ, "BARE_NATS_URL": nats.url},
                      f"http://127.0.0.1:{floor_port}/docs", Path(tmp) / "floor.log")
        try:
            urls = {"ingest": f"http://127.0.0.1:{ingest_port}/api/v1/webhooks/ingest",
                    "bare": f"http://127.0.0.1:{bare_port}/api/v1/webhooks/ingest",
                    "bare+publish": f"http://127.0.0.1:{floor_port}/api/v1/webhooks/ingest"}
            results = {name: measure(name, url, headers, args.seconds, args.connections) for name, url in urls.items()}
            half = max(1, int(results["ingest"]["max"].rate / 2))
            for name, url in urls.items():
                results[name]["half"] = attack(url, BODIES, headers, seconds=args.seconds, rate=half,
                                               workers=args.connections)
        finally:
            for proc in (ingest, bare, floor):
                proc.terminate()
                proc.wait(timeout=10)

    out = {
        "connections": args.connections,
        "seconds": args.seconds,
        "workers": 1,
        "ratio_max_rate": results["ingest"]["max"].rate / results["bare"]["max"].rate,
        "ratio_vs_bare_publish": results["ingest"]["max"].rate / results["bare+publish"]["max"].rate,
        "ratio_bare_publish_vs_bare": results["bare+publish"]["max"].rate / results["bare"]["max"].rate,
        "half_rate": half,
        "results": {name: {phase: asdict(r) for phase, r in phases.items()} for name, phases in results.items()},
    }
    print(json.dumps(out, indent=2))
    results_dir = ROOT / "bench" / "results"
    results_dir.mkdir(exist_ok=True)
    (results_dir / "ingest.json").write_text(json.dumps(out, indent=2))
    plot(out, results_dir / "ingest.png")


def plot(out: dict, path: Path) -> None:  # type: ignore[type-arg]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["bare", "bare+publish", "ingest"]
    res = out["results"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.bar(names, [res[n]["max"]["rate"] for n in names], color=["#999", "#69c", "#2a6"])
    a.set_title(f"max req/s (1 worker, {out['connections']} conns)\ningest/bare = {out['ratio_max_rate']:.2f}")
    x = range(len(names))
    b.bar([i - 0.2 for i in x], [res[n]["half"]["p50_ms"] for n in names], 0.4, label="p50")
    b.bar([i + 0.2 for i in x], [res[n]["half"]["p99_ms"] for n in names], 0.4, label="p99")
    b.set_xticks(list(x), names)
    b.set_ylabel("ms")
    b.set_title(f"latency at {out['half_rate']} req/s (half of ingest max)")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
