"""bench/ingest: POST /api/v1/webhooks/ingest (auth, validation, rate limit, JetStream ack) against a
bare FastAPI+uvicorn route answering the same 201 with no I/O, both measured in this run with one
uvicorn worker each and the same load generator (vegeta) in its own process.

    .venv/bin/python bench/ingest.py [--seconds 10] [--connections 32] [--workers 2] [--profile] [--rate N]

--workers 2 also measures ingest with two worker processes (uvicorn's, sharing the socket) against
its one, in the same run. Each process's CPU during each window (/proc/<pid>/stat, in cores: the
server's workers, nats-server, the load generator) is in the JSON, since the load generator and
nats-server share the machine's cores with the server, and so is the server's CPU per request
(µs): at half load it says what a request costs, whatever else the machine is doing. --profile records the one-worker ingest with
py-spy during its maximum-rate window (bench/results/ingest-profile.txt, collapsed stacks; the top
functions by own time in the JSON); with --rate N, during the fixed-rate window instead. --rate N
runs that window at N req/s instead of half of ingest's maximum (a moderate rate, where each NATS
command and each call the calls table projects costs a round trip of its own). Prints JSON and
writes bench/results/ingest.json and ingest.png.
Not a test: nothing asserts on it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import report  # noqa: E402
from conversations import cpu_seconds, hottest  # noqa: E402
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


def processes(root: int) -> list[int]:
    """`root` and its children (uvicorn's workers when it runs more than one)."""
    children = Path(f"/proc/{root}/task/{root}/children").read_text().split()
    return [root, *map(int, children)]


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # the load generator, once it was waited for
    return usage.ru_utime + usage.ru_stime


def cores_during(server: int, nats: int, run: Callable[[], Result]) -> tuple[Result, dict[str, Any]]:
    """run()'s result, and what each process spent of the cores meanwhile (and per request, in µs)."""
    pids = processes(server)
    before = [cpu_seconds(p) for p in pids], cpu_seconds(nats), children_cpu(), time.monotonic()
    result = run()
    after = [cpu_seconds(p) for p in pids], cpu_seconds(nats), children_cpu(), time.monotonic()
    wall = after[3] - before[3]
    spent = [b - a for a, b in zip(before[0], after[0], strict=True)]
    return result, {
        "workers": [round(s / wall, 3) for s in spent],
        "nats_server": round((after[1] - before[1]) / wall, 3),
        "load_generator": round((after[2] - before[2]) / wall, 3),
        "server_us_per_request": round(sum(spent) / max(1, result.requests) * 1e6),
    }


def profiled(server: int, profile: Path | None, run: Callable[[], Any]) -> Any:
    """run()'s result, with py-spy recording `server` meanwhile when `profile` is given."""
    with report.py_spy(server, profile):
        return run()


def measure(name: str, url: str, headers: dict[str, str], seconds: float, connections: int,
            server: int, nats: int, profile: Path | None) -> dict[str, Any]:
    """The maximum rate, and what each process spent of the cores meanwhile."""
    attack(url, BODIES, headers, seconds=2, workers=connections)  # warm-up
    peak, cores = profiled(server, profile, lambda: cores_during(
        server, nats, lambda: attack(url, BODIES, headers, seconds=seconds, workers=connections)))
    print(f"{name}: {peak.rate:.0f} req/s at {connections} connections; cores {cores}", file=sys.stderr)
    return {"max": peak, "cores": cores}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1, choices=(1, 2))
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--rate", type=int, help="the fixed-rate window's req/s (default: half of ingest's maximum)")
    args = parser.parse_args()
    report.RESULTS.mkdir(exist_ok=True)

    key = keys.generate("live")
    headers = {"Authorization": f"Bearer {key}"}
    bin_dir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory() as tmp, NatsServer(Path(tmp) / "nats") as nats:
        asyncio.run(publish_tenant(nats.url, key))
        ingest_port, bare_port, floor_port = free_port(), free_port(), free_port()

        def start_ingest(port: int, workers: int) -> subprocess.Popen[bytes]:
            env = {**os.environ, "AGENTSTUDIO_NATS_URL": nats.url, "AGENTSTUDIO_HOST": "127.0.0.1",
                   "AGENTSTUDIO_PORT": str(port), "AGENTSTUDIO_LOG_LEVEL": "INFO"}
            return serve([str(bin_dir / "agent-studio"), "ingest", "--workers", str(workers)], env,
                         f"http://127.0.0.1:{port}/readyz", Path(tmp) / f"ingest-{workers}.log")

        ingest = start_ingest(ingest_port, 1)
        servers = {"ingest": ingest}
        urls = {"ingest": f"http://127.0.0.1:{ingest_port}/api/v1/webhooks/ingest"}
        bare = serve([str(bin_dir / "uvicorn"), "bare_app:app", "--app-dir", str(ROOT / "bench"), "--host",
                      "127.0.0.1", "--port", str(bare_port), "--workers", "1", "--no-access-log",
                      "--log-level", "warning"], os.environ.copy(), f"http://127.0.0.1:{bare_port}/docs",
                     Path(tmp) / "bare.log")
        floor = serve([str(bin_dir / "uvicorn"), "bare_app:app", "--app-dir", str(ROOT / "bench"), "--host",
                       "127.0.0.1", "--port", str(floor_port), "--workers", "1", "--no-access-log",
                       "--log-level", "warning"], {**os.environ, "BARE_NATS_URL": nats.url},
                      f"http://127.0.0.1:{floor_port}/docs", Path(tmp) / "floor.log")
        servers |= {"bare": bare, "bare+publish": floor}
        urls |= {"bare": f"http://127.0.0.1:{bare_port}/api/v1/webhooks/ingest",
                 "bare+publish": f"http://127.0.0.1:{floor_port}/api/v1/webhooks/ingest"}
        if args.workers == 2:
            two_port = free_port()
            servers["ingest x2"] = start_ingest(two_port, 2)
            urls["ingest x2"] = f"http://127.0.0.1:{two_port}/api/v1/webhooks/ingest"
        assert nats.proc is not None
        try:
            profile = report.RESULTS / "ingest-profile.txt" if args.profile else None
            results: dict[str, dict[str, Any]] = {
                name: measure(name, url, headers, args.seconds, args.connections, servers[name].pid, nats.proc.pid,
                              profile if name == "ingest" and args.rate is None else None)
                for name, url in urls.items()
            }
            half = args.rate or max(1, int(results["ingest"]["max"].rate / 2))
            for name in ("ingest", "bare", "bare+publish"):
                results[name]["half"], results[name]["half_cores"] = profiled(
                    servers[name].pid, profile if name == "ingest" and args.rate else None,
                    lambda: cores_during(servers[name].pid, nats.proc.pid, lambda: attack(
                        urls[name], BODIES, headers, seconds=args.seconds, rate=half, workers=args.connections)))
        finally:
            for proc in servers.values():
                family = processes(proc.pid)
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:  # seen twice with two workers on the loaded machine
                    for pid in reversed(family):  # the workers too, or they outlive their supervisor
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                    proc.wait()

    out = {
        "connections": args.connections,
        "seconds": args.seconds,
        "workers": args.workers,
        "ratio_max_rate": results["ingest"]["max"].rate / results["bare"]["max"].rate,
        "ratio_vs_bare_publish": results["ingest"]["max"].rate / results["bare+publish"]["max"].rate,
        "ratio_bare_publish_vs_bare": results["bare+publish"]["max"].rate / results["bare"]["max"].rate,
        "half_rate": half,
        "fixed_rate": args.rate is not None,
        "results": {name: {phase: asdict(r) if isinstance(r, Result) else r for phase, r in phases.items()}
                    for name, phases in results.items()},
    }
    if args.workers == 2:
        out["ratio_two_workers"] = results["ingest x2"]["max"].rate / results["ingest"]["max"].rate
    if args.profile:
        out["profile"] = hottest(report.RESULTS / "ingest-profile.txt")
    report.save("ingest", out, plot)


def plot(out: dict) -> Any:  # type: ignore[type-arg]
    plt = report.pyplot()

    res = out["results"]
    names = [n for n in ("bare", "bare+publish", "ingest", "ingest x2") if n in res]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.bar(names, [res[n]["max"]["rate"] for n in names], color=["#999", "#69c", "#2a6", "#184"][:len(names)])
    a.set_title(f"max req/s ({out['connections']} conns)\n"
                f"ingest/bare+publish = {out['ratio_vs_bare_publish']:.2f}"
                + (f", 2 workers/1 = {out['ratio_two_workers']:.2f}" if "ratio_two_workers" in out else ""))
    names = ["bare", "bare+publish", "ingest"]
    x = range(len(names))
    b.bar([i - 0.2 for i in x], [res[n]["half"]["p50_ms"] for n in names], 0.4, label="p50")
    b.bar([i + 0.2 for i in x], [res[n]["half"]["p99_ms"] for n in names], 0.4, label="p99")
    b.set_xticks(list(x), names)
    b.set_ylabel("ms")
    b.set_title(f"latency at {out['half_rate']} req/s" + ("" if out["fixed_rate"] else " (half of ingest max)"))
    b.legend()
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
