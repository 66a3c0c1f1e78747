"""bench/windows: a campaign accepted outside its callees' calling window, then the window opening,
against the same backlog with no window, each phase on its own nats-server with the real roles
(`agent-studio ingest` and `agent-studio dialer` processes, simulated zero-length calls).

1. inside: N_IN calls accepted while the window is open (they queue as pending): the ingest rate.
2. outside: N calls accepted while the window is closed (each `scheduled` for its opening, 12 hours
   ahead), an idle dialer beside: the ingest rate against (1), the dialer's RSS before and after, and
   what the dialers' consumer holds while they wait.
3. opening: the same N calls waiting as ingest queues them (calls.enqueue, straight to JetStream so
   the instant can be chosen before they are in) for a window opening at a real minute boundary
   (HH:MM in the callees' zone): time from the opening to the first call answered, and the drain
   rate at the tenant's concurrency cap over the first SLICE calls, every one checked at dial time.
4. no window: the same N calls of a tenant without a CallPolicy, released by the same kind of
   schedule at one instant: the same two figures, with nothing checked at dial time.

The window's policy also caps each number (3 per 24 h), so every placement takes a reservation;
every call goes to a different New York number. The real clock throughout (no `--now`).

    .venv/bin/python bench/windows.py [--calls 100000] [--inside 10000] [--slice 2000] [--cap 50]

Prints JSON and writes bench/results/windows.{json,png}. Not a test: nothing asserts on it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import orjson
from nats.js.api import DeliverPolicy

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

import report  # noqa: E402
from ingest import serve  # noqa: E402

from agentstudio import bundle_store, bus, calls, keys  # noqa: E402
from agentstudio.bundle import KeyMaterial, compile_bundle  # noqa: E402
from agentstudio.natsserver import NatsServer, free_port  # noqa: E402
from conftest import docs  # noqa: E402

NEW_YORK = ZoneInfo("America/New_York")
TENANT = "bench"
MANIFESTS = """
apiVersion: agentstudio.io/v1alpha1
kind: Agent
metadata: {name: a}
spec: {prompt: "Hello"}
---
apiVersion: agentstudio.io/v1alpha1
kind: ApiKey
metadata: {name: k}
spec: {scopes: ["calls:create"], mode: test, rateLimitPerMinute: 1000000}
"""
CONNECTIONS = 32


def policy(ranges: str) -> str:
    days = ", ".join(f"{d}: [{ranges}]" for d in ("mon", "tue", "wed", "thu", "fri", "sat", "sun"))
    return MANIFESTS + f"""
---
apiVersion: agentstudio.io/v1alpha1
kind: CallPolicy
metadata: {{name: default}}
spec: {{preset: none, cap: {{count: 3, windowSeconds: 86400}}, hours: {{{days}, defaultZone: UTC}}}}
"""


def window_from(opening: datetime) -> str:
    """A three-hour range in New York opening at `opening` (a minute boundary)."""
    local = opening.astimezone(NEW_YORK)
    end = local + timedelta(hours=3)
    return f'"{local:%H:%M}-{end:%H:%M}"'


def number(i: int) -> str:
    return f"+1212{2000000 + i:07d}"  # distinct New York numbers (America/New_York only)


async def publish(nats_url: str, manifests: str, key: str) -> None:
    nc = await bus.connect(nats_url, "bench")
    result = compile_bundle(TENANT, docs(manifests), {"k": [KeyMaterial(keys.digest(key))]})
    assert result.bundle is not None, result.errors
    await bundle_store.publish(await bundle_store.buckets(nc.jetstream()), result.bundle)
    await nc.close()


class Stack:
    """A nats-server, an ingest process and (on demand) a dialer process, in a temporary folder."""

    def __init__(self, tmp: Path, manifests: str, cap: int) -> None:
        self.tmp, self.manifests, self.cap = tmp, manifests, cap
        self.key = keys.generate("test")
        self.nats = NatsServer(tmp / "nats", log_file=tmp / "nats.log")
        self.procs: list[subprocess.Popen[bytes]] = []
        self.dialer: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Stack:
        self.nats.start()
        asyncio.run(publish(self.nats.url, self.manifests, self.key))
        self.ingest_port = free_port()
        self.procs.append(serve([str(Path(sys.executable).parent / "agent-studio"), "ingest", "--workers", "1"],
                                self.env(self.ingest_port), f"http://127.0.0.1:{self.ingest_port}/readyz",
                                self.tmp / "ingest.log"))
        return self

    def env(self, port: int) -> dict[str, str]:
        return {**os.environ, "AGENTSTUDIO_NATS_URL": self.nats.url, "AGENTSTUDIO_HOST": "127.0.0.1",
                "AGENTSTUDIO_PORT": str(port), "AGENTSTUDIO_LOG_LEVEL": "WARNING", "AGENTSTUDIO_WEBHOOK_SECRETS": "none",
                "AGENTSTUDIO_MAX_CONCURRENT_CALLS_PER_TENANT": str(self.cap)}

    def start_dialer(self) -> None:
        port = free_port()
        self.dialer = serve([str(Path(sys.executable).parent / "agent-studio"), "dialer"], self.env(port),
                            f"http://127.0.0.1:{port}/readyz", self.tmp / "dialer.log")
        self.procs.append(self.dialer)

    def dialer_rss_mib(self) -> float:
        assert self.dialer is not None
        for line in Path(f"/proc/{self.dialer.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.nats.stop()


async def accept(url: str, key: str, n: int, body: Callable[[int], dict[str, Any]]) -> dict[str, Any]:
    """POST n calls, CONNECTIONS at a time: calls per second and what ingest answered."""
    statuses: dict[str, int] = {}
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=CONNECTIONS, max_keepalive_connections=CONNECTIONS)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        queue = iter(range(n))

        async def worker() -> None:
            for i in queue:
                for attempt in range(3):
                    try:  # a kept-alive connection the server closed at that moment: send again
                        resp = await client.post(url, headers={**headers, "Idempotency-Key": f"bench-{i}"},
                                                 json=body(i))
                        break
                    except httpx.TransportError:
                        if attempt == 2:
                            raise
                said = resp.json().get("status") if resp.status_code == 201 else str(resp.status_code)
                statuses[said] = statuses.get(said, 0) + 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONNECTIONS)))
        took = time.perf_counter() - start
    return {"calls": n, "seconds": round(took, 2), "calls_per_second": round(n / took, 1), "answers": statuses}


async def drain(nats_url: str, opening: datetime, slice_: int) -> dict[str, Any]:
    """From `opening` (real UTC): when the first call is answered (the simulated provider answers as
    soon as it rings) and when the first `slice_` calls are completed, from their status events."""
    nc = await bus.connect(nats_url, "bench-events")
    js = nc.jetstream()
    await bus.ensure_events_stream(js)
    sub = await js.subscribe(f"calls.{TENANT}.events.*", ordered_consumer=True, deliver_policy=DeliverPolicy.NEW)
    first: float | None = None
    completed = 0
    opening_perf = time.perf_counter() + (opening - datetime.now(UTC)).total_seconds()
    async for msg in sub.messages:
        kind = orjson.loads(msg.data)["type"]
        if first is None and kind == "call.answered":
            first = time.perf_counter()
        if kind == "call.completed":
            completed += 1
            if completed == slice_:
                break
    last = time.perf_counter()
    await sub.unsubscribe()
    await nc.close()
    assert first is not None
    return {"first_dial_after_opening_seconds": round(first - opening_perf, 2),
            "slice": slice_, "slice_seconds": round(last - first, 2),
            "drain_calls_per_second": round(slice_ / (last - first), 1)}


async def backlog(nats_url: str, n: int, due: datetime, reason: str) -> None:
    """n calls queued straight to JetStream as ingest queues a waiting call (calls.enqueue with
    scheduled_for), all due at `due`: much faster than through HTTP, so the instant can be chosen first."""
    nc = await bus.connect(nats_url, "bench-backlog")
    js = nc.jetstream()
    for first in range(0, n, 500):
        await asyncio.gather(*(calls.enqueue(js, calls.CallRequest(
            call_id=str(uuid.uuid4()), tenant=TENANT, api_key="k", agent_slug="a", phone_number=number(i),
            user_context={}, metadata={"simulate_duration_seconds": 0}, test=True, created_at=datetime.now(UTC),
            bundle_version=1, scheduled_for=due, scheduled_reason=reason), timeout=10)
            for i in range(first, min(n, first + 500))))
    await nc.close()
    assert datetime.now(UTC) < due, "queued too slowly: the calls were due before the last was in"


async def held_by_dialers(nats_url: str) -> dict[str, int]:
    """What the dialers' consumer holds: waiting calls must be in neither count."""
    nc = await bus.connect(nats_url, "bench-consumer")
    info = await nc.jetstream().consumer_info(bus.CALLS_STREAM, "dialer")
    await nc.close()
    return {"consumer_num_pending": int(info.num_pending or 0), "consumer_ack_pending": int(info.num_ack_pending or 0)}


def next_minute(after: datetime) -> datetime:
    return (after + timedelta(minutes=1)).replace(second=0, microsecond=0)


def call_body(i: int, **extra: Any) -> dict[str, Any]:
    return {"agent_slug": "a", "phone_number": number(i), "metadata": {"simulate_duration_seconds": 0}, **extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--inside", type=int, default=10_000)
    parser.add_argument("--slice", type=int, default=2_000)
    parser.add_argument("--cap", type=int, default=50)
    args = parser.parse_args()
    out: dict[str, Any] = {"calls": args.calls, "connections": CONNECTIONS, "cap": args.cap}

    with tempfile.TemporaryDirectory() as tmp:
        # 1. The campaign accepted while its window is open: the ingest baseline.
        with Stack(Path(tmp) / "inside", policy('"00:00-24:00"'), args.cap) as stack:
            url = f"http://127.0.0.1:{stack.ingest_port}/api/v1/webhooks/ingest"
            out["inside_window"] = asyncio.run(accept(url, stack.key, args.inside, call_body))
        print(f"inside the window: {out['inside_window']['calls_per_second']} calls/s", file=sys.stderr)

        # 2. Accepted while it is closed (it opens in 12 hours), an idle dialer running beside.
        later = next_minute(datetime.now(UTC) + timedelta(hours=12))
        with Stack(Path(tmp) / "outside", policy(window_from(later)), args.cap) as stack:
            stack.start_dialer()
            time.sleep(2)  # settled: connected, consumer created, bundle loaded
            rss_before = stack.dialer_rss_mib()
            url = f"http://127.0.0.1:{stack.ingest_port}/api/v1/webhooks/ingest"
            out["outside_window"] = asyncio.run(accept(url, stack.key, args.calls, call_body))
            time.sleep(2)
            out["outside_window"] |= {"dialer_rss_mib_before": round(rss_before, 1),
                                      "dialer_rss_mib_after_accepting": round(stack.dialer_rss_mib(), 1),
                                      **asyncio.run(held_by_dialers(stack.nats.url))}
        print(f"outside the window: {out['outside_window']['calls_per_second']} calls/s", file=sys.stderr)

        # 3. The window opens on the same backlog, waiting as ingest queued it (2.), at a minute boundary.
        opening = next_minute(datetime.now(UTC) + timedelta(seconds=args.calls / 5000 + 10))
        with Stack(Path(tmp) / "opening", policy(window_from(opening)), args.cap) as stack:
            stack.start_dialer()
            asyncio.run(backlog(stack.nats.url, args.calls, opening, "calling_hours"))
            out["window_opening"] = {"opening": opening.isoformat(),
                                     **asyncio.run(drain(stack.nats.url, opening, args.slice)),
                                     "dialer_rss_mib_draining": round(stack.dialer_rss_mib(), 1)}
        print(f"window opening: {out['window_opening']}", file=sys.stderr)

        # 4. The same backlog with no CallPolicy, released by one schedule.
        release = (datetime.now(UTC) + timedelta(seconds=args.calls / 5000 + 10)).replace(microsecond=0)
        with Stack(Path(tmp) / "plain", MANIFESTS, args.cap) as stack:
            stack.start_dialer()
            asyncio.run(backlog(stack.nats.url, args.calls, release, "scheduled_at"))
            out["no_window_release"] = {"release": release.isoformat(),
                                        **asyncio.run(drain(stack.nats.url, release, args.slice)),
                                        "dialer_rss_mib_draining": round(stack.dialer_rss_mib(), 1)}
        print(f"no window: {out['no_window_release']}", file=sys.stderr)

    out["ratio_ingest_outside_vs_inside"] = round(
        out["outside_window"]["calls_per_second"] / out["inside_window"]["calls_per_second"], 2)
    out["ratio_drain_window_vs_no_window"] = round(
        out["window_opening"]["drain_calls_per_second"] / out["no_window_release"]["drain_calls_per_second"], 2)
    report.save("windows", out, plot)


def plot(out: dict[str, Any]) -> Any:
    plt = report.pyplot()

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(13, 4))
    names = ["inside window", "outside window"]
    rates = [out[k]["calls_per_second"] for k in ("inside_window", "outside_window")]
    a.bar(names, rates, color=["#999", "#2a6"])
    a.set_title(f"ingest calls/s ({out['connections']} conns, 1 worker)\n"
                f"outside/inside = {out['ratio_ingest_outside_vs_inside']:.2f}")
    o, w, n = out["outside_window"], out["window_opening"], out["no_window_release"]
    b.bar(["window opens", "no window"], [w["first_dial_after_opening_seconds"], n["first_dial_after_opening_seconds"]],
          color=["#2a6", "#69c"])
    b.set_ylabel("s")
    b.set_title(f"opening → first call answered\n({out['calls']:,} waiting)")
    c.bar(["window opens", "no window"], [w["drain_calls_per_second"], n["drain_calls_per_second"]],
          color=["#2a6", "#69c"])
    c.set_title(f"drain, first {w['slice']:,} calls at cap {out['cap']} (calls/s)\n"
                f"dialer RSS {o['dialer_rss_mib_before']:.0f} → {o['dialer_rss_mib_after_accepting']:.0f} MiB"
                " while they wait")
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
