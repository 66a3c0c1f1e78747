"""bench/dispatch: from an accepted call to the provider, a backlog drained at the cap, and webhook
deliveries, each against a baseline measured in the same run on the same nats-server.

1. accept → provider request with idle dialers: POST /api/v1/webhooks/ingest until the provider's
   place() is called, one call at a time; baseline: JetStream publish → a pull consumer receiving it.
2. a backlog of N queued calls drained at the tenant's cap by two dialers (simulated, zero-length
   calls): time, every call placed exactly once, and the NATS messages the dialers sent per placed
   call, by purpose (tests/nats_messages.py); baseline: the same N messages fetched and acked.
   Unpaced (--pace, the tenant's calls per second, high), to show what dispatch itself costs.
2b. a backlog drained at a pace (--paced calls at --paced-rate a second): the rate it gets and the
   most calls placed in any one second.
3. webhook deliveries per second to a local receiver (bench/receiver.py in its own process) of
   N events queued before the dispatcher starts; baseline: the same number of signed POSTs sent
   straight to it with the same concurrency (the dispatcher's per subscription, 4), and this
   process's CPU per delivery against per direct post. Also N events delivered as they are
   published one at a time (the publisher's pace included).

    .venv/bin/python bench/dispatch.py [--calls 200] [--backlog 10000] [--events 2000] [--paced 1000]
    .venv/bin/python bench/dispatch.py --only webhooks [--events 2000] [--profile FILE]   # phase 3 alone

Prints JSON and writes bench/results/dispatch.json and dispatch.png. Not a test: nothing asserts on it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import Tenant, docs, ingest_client, wait_for_bundle  # noqa: E402
from backlog import queue_backlog  # noqa: E402
from latency import summary  # noqa: E402
import report  # noqa: E402
from nats_messages import Counted  # noqa: E402

from agentstudio import bus, calls, signing  # noqa: E402
from agentstudio.dialer import main as dialer_main  # noqa: E402
from agentstudio.dialer.providers import SimulatedProvider  # noqa: E402
from agentstudio.resources import Voicemail  # noqa: E402
from agentstudio.secrets import StaticSecrets  # noqa: E402
from agentstudio.natsserver import NatsServer, free_port  # noqa: E402
from agentstudio.settings import Settings  # noqa: E402

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


# Round trips a placed call cost before issue 16, counted the same way on f09ae51
# (tests/test_dispatch_round_trips.py, 300 calls, a cap of 50): 287.5, of which 266 slot reads and
# writes (the parked calls' takes failing each other's compare-and-set) and 21 the rest (7 call-state
# reads, 7 writes, 4 request reads, 2 event publishes, 1 do-not-call read).
ROUND_TRIPS_BEFORE = {"backlog_cap_50": 287.5, "without_slots": 21}


class Timed(SimulatedProvider):
    """The simulated provider, noting when each call reached it and how often."""

    reached: dict[str, float] = {}
    placed: Counter[str] = Counter()

    async def place(self, call: calls.CallRequest, voicemail: Voicemail | None = None) -> str:
        Timed.reached.setdefault(call.call_id, time.perf_counter())
        Timed.placed[call.call_id] += 1
        return await super().place(call, voicemail)


async def run_dialers(nats_url: str, count: int, stop: asyncio.Event, counted: Counted | None = None,
                      **settings: Any) -> list[asyncio.Task[None]]:
    conf = Settings(nats_url=nats_url, cap_retry_seconds=0.05, **settings)
    tasks = []
    for _ in range(count):
        nc = await bus.connect(nats_url, "bench-dialer")
        if counted is not None:
            counted.wrap(nc)
        dialer = await dialer_main.build(nc, conf, simulated_factory=lambda t: Timed(t, ring_seconds=0))
        tasks.append(asyncio.create_task(dialer.run(stop)))
    return tasks


async def accept_to_provider(nats_url: str, js: Any, n: int) -> dict[str, Any]:
    t = Tenant(f"bench-{uuid.uuid4().hex[:6]}", js, docs(MANIFESTS))
    bundle = await t.publish()
    stop = asyncio.Event()
    tasks = await run_dialers(nats_url, 1, stop)
    latencies = []
    async with ingest_client(nats_url) as (client, svc):
        await wait_for_bundle(svc, t.name, bundle.version)
        for i in range(n + 5):  # the first five warm up connections and consumers, and are not counted
            start = time.perf_counter()
            resp = await client.post("/api/v1/webhooks/ingest", headers=t.auth("k"), json={
                "agent_slug": "a", "phone_number": "+14155552671", "metadata": {"simulate_duration_seconds": 0}})
            call_id = resp.json()["call_id"]
            while call_id not in Timed.reached:
                await asyncio.sleep(0.0005)
            if i >= 5:
                latencies.append(Timed.reached[call_id] - start)
            await asyncio.sleep(0.02)  # idle dialers: one call at a time
    stop.set()
    await asyncio.gather(*tasks)

    # Baseline: the transport alone, publish → a pull consumer has it.
    sub = await js.pull_subscribe("bench.floor", durable=f"floor-{uuid.uuid4().hex[:6]}", stream="BENCH")
    floor = []
    for i in range(n):
        start = time.perf_counter()
        await js.publish("bench.floor", b"x" * 300, headers={"Nats-Msg-Id": f"f-{uuid.uuid4()}"})
        [msg] = await sub.fetch(1, timeout=5)
        await msg.ack()
        floor.append(time.perf_counter() - start)
    ours, base = summary(latencies), summary(floor)
    return {"accept_to_provider": ours, "baseline_publish_to_consumer": base,
            "ratio_p99": ours["p99_ms"] / base["p99_ms"], "goal_p99_ms": 150}


async def backlog(nats_url: str, js: Any, n: int, cap: int, pace: float) -> dict[str, Any]:
    tenant = f"bench-{uuid.uuid4().hex[:6]}"
    ids = await queue_backlog(js, tenant, n)
    stop = asyncio.Event()
    start = time.perf_counter()
    counted = Counted()
    tasks = await run_dialers(nats_url, 2, stop, counted, max_concurrent_calls_per_tenant=cap,
                              calls_per_second_per_tenant=pace)
    store = (await dialer_main.tracker_for(js._nc)).store  # noqa: SLF001
    # Watch the provider's count (cheap) while draining; check every record once at the end.
    while any(Timed.placed[c] == 0 for c in ids):
        await asyncio.sleep(0.2)
    remaining = set(ids)
    while remaining:
        states = await asyncio.gather(*(store.get(tenant, c) for c in list(remaining)[:500]))
        remaining -= {s.call_id for s in states if s is not None and s.status == "completed"}
        if remaining:
            await asyncio.sleep(0.2)
    drained = time.perf_counter() - start
    stop.set()
    await asyncio.gather(*tasks)
    # Both dialers from start to stop (streams ensured, heartbeats, takeover looks included), per placed call.
    per_call = {p: round(c / n, 3) for p, c in counted.by_purpose.most_common()}
    doubled = [c for c in ids if Timed.placed[c] != 1]

    # Baseline: the same number of messages fetched and acked by one pull consumer.
    for i in range(n):
        await js.publish("bench.backlog", b"x" * 300)
    sub = await js.pull_subscribe("bench.backlog", durable=f"backlog-{uuid.uuid4().hex[:6]}", stream="BENCH")
    start, got = time.perf_counter(), 0
    while got < n:
        for msg in await sub.fetch(256, timeout=5):
            await msg.ack()
            got += 1
    consumed = time.perf_counter() - start
    return {"calls": n, "cap": cap, "pace": pace, "drain_seconds": drained, "calls_per_second": n / drained,
            "placed_not_exactly_once": len(doubled), "baseline_consume_ack_seconds": consumed,
            "ratio_time": drained / consumed, "nats_messages_per_call": round(sum(per_call.values()), 2),
            "nats_round_trips_per_call": round(counted.round_trips / n, 2),
            "nats_messages_per_call_by_purpose": per_call}


async def paced(nats_url: str, js: Any, n: int, pace: float) -> dict[str, Any]:
    """A backlog drained by two dialers at the tenant's pace: the rate it gets and the most calls
    that reached the provider in any one second."""
    tenant = f"bench-{uuid.uuid4().hex[:6]}"
    ids = await queue_backlog(js, tenant, n)
    stop = asyncio.Event()
    tasks = await run_dialers(nats_url, 2, stop, max_concurrent_calls_per_tenant=1000, calls_per_second_per_tenant=pace)
    while any(Timed.placed[c] == 0 for c in ids):
        await asyncio.sleep(0.2)
    stop.set()
    await asyncio.gather(*tasks)
    times = sorted(Timed.reached[c] for c in ids)
    most, j = 0, 0
    for i, t in enumerate(times):  # the most placements in any window [t, t + 1 s)
        while times[j] <= t - 1:
            j += 1
        most = max(most, i - j + 1)
    return {"calls": n, "pace": pace, "calls_per_second": (n - 1) / (times[-1] - times[0]),
            "most_in_one_second": most, "placed_not_exactly_once": sum(1 for c in ids if Timed.placed[c] != 1)}


@contextlib.asynccontextmanager
async def receiver() -> AsyncIterator[tuple[int, httpx.AsyncClient]]:
    """bench/receiver.py in its own process on a free port, and a client that asks it its count."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "receiver.py"), str(port)])  # its errors on our stderr
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as counter:
            for _ in range(200):
                if proc.poll() is not None:
                    raise RuntimeError(f"bench/receiver.py exited with {proc.returncode} (its error above)")
                try:
                    await counter.get("/count")
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
            else:
                raise RuntimeError("bench/receiver.py did not answer in 10 s")
            yield port, counter
    finally:
        proc.terminate()
        proc.wait(10)


async def deliveries(nats_url: str, js: Any, n: int, profile: Path | None = None) -> dict[str, Any]:
    async with receiver() as (port, counter):
        return await _deliveries(nats_url, js, n, port, counter, profile)


async def _deliveries(nats_url: str, js: Any, n: int, port: int, counter: httpx.AsyncClient,
                      profile: Path | None) -> dict[str, Any]:
    async def received() -> int:
        return (await counter.get("/count")).json()["received"]

    t = Tenant(f"bench-{uuid.uuid4().hex[:6]}", js, docs(MANIFESTS + f"""
---
apiVersion: agentstudio.io/v1alpha1
kind: WebhookSubscription
metadata: {{name: hook}}
spec: {{url: "http://127.0.0.1:{port}/hook", events: ["call.*"]}}
"""))
    await t.publish()
    secret = signing.new_secret()
    settings = Settings(nats_url=nats_url)
    nc = await bus.connect(nats_url, "bench-webhooks")
    counted, writes = Counted(), Counter[str]()
    counted.wrap(nc)
    writelines = nc._transport.writelines  # noqa: SLF001 - the socket writes nats-py's flusher makes

    def counted_writes(data: Any) -> None:
        writes["writes"] += 1
        writelines(data)

    nc._transport.writelines = counted_writes  # noqa: SLF001
    dispatcher, watcher = await dialer_main.webhooks(nc, settings, StaticSecrets({(t.name, "hook-webhook-secret", "secret"): secret}))

    async def publish(count: int) -> None:  # one at a time, each waiting for its ack
        for i in range(count):
            event = {"type": "call.completed", "id": f"evt_{uuid.uuid4().hex}", "created_at": "now",
                     "data": {"call_id": str(uuid.uuid4()), "test": True, "metadata": {}, "agent_slug": "a"}}
            await js.publish(bus.event_subject(t.name, event["data"]["call_id"]), orjson.dumps(event),
                             headers={"Nats-Msg-Id": event["id"]})

    async def delivered(count: int) -> None:
        while await received() < count:
            await asyncio.sleep(0.05)

    # The n events queued before the dispatcher starts, as the baseline has its n posts ready: what
    # the dispatcher drains (its start, consumers made and bundle loaded, included).
    await bus.ensure_events_stream(js)  # alone (--only webhooks), no dialer has made it yet
    await publish(n)
    stop = asyncio.Event()
    with report.py_spy(os.getpid(), profile):
        start, cpu = time.perf_counter(), time.process_time()
        running = asyncio.create_task(dispatcher.run(stop))
        await delivered(n)
        ours = n / (time.perf_counter() - start)
        ours_cpu = (time.process_time() - cpu) / n
        sent = {p: round(c / n, 3) for p, c in counted.by_purpose.most_common()}
        nats_writes = writes["writes"] / n
    # Then n more as they are published, this bench's one publisher at a time setting the pace.
    start = time.perf_counter()
    await publish(n)
    await delivered(2 * n)
    as_published = n / (time.perf_counter() - start)
    stop.set()
    await running
    await watcher.stop()
    await nc.close()

    # Baseline: the same signed POSTs straight to the receiver, as many at a time as one
    # subscription's loop keeps in flight.
    concurrency = dispatcher.per_subscription
    body = orjson.dumps({"type": "call.completed"}).decode()
    async with httpx.AsyncClient() as client:
        start, cpu = time.perf_counter(), time.process_time()
        sem = asyncio.Semaphore(concurrency)

        async def post(i: int) -> None:
            async with sem:
                await client.post(f"http://127.0.0.1:{port}/hook", content=body,
                                  headers=signing.headers(secret, f"evt_{i}", body))

        await asyncio.gather(*(post(i) for i in range(n)))
        direct = n / (time.perf_counter() - start)
        direct_cpu = (time.process_time() - cpu) / n
    return {"events": n, "concurrency": concurrency, "posts_received": await received(),
            "deliveries_per_second": ours,
            "baseline_direct_posts_per_second": direct, "ratio": ours / direct,
            # This process's CPU (all its threads) per delivery and per direct post: what the
            # dispatcher costs beside the posts themselves, steadier than rates on a busy machine.
            "cpu_ms_per_delivery": 1000 * ours_cpu, "baseline_cpu_ms_per_direct_post": 1000 * direct_cpu,
            "cpu_ratio": direct_cpu / ours_cpu,
            # The dispatcher's NATS messages and socket writes per delivery (fan-out included).
            "nats_messages_per_delivery": sent, "nats_writes_per_delivery": nats_writes,
            "deliveries_per_second_as_published": as_published}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp, NatsServer(Path(tmp) / "nats") as nats:
        nc = await bus.connect(nats.url, "bench")
        js = nc.jetstream()
        await bus.ensure_calls_stream(js)
        await js.add_stream(name="BENCH", subjects=["bench.>"])
        out: dict[str, Any] = {}
        if args.only == "webhooks":
            out["webhooks"] = await deliveries(nats.url, js, args.events, args.profile)
            await nc.close()
            return out
        if args.calls:
            out["dispatch"] = await accept_to_provider(nats.url, js, args.calls)
        out["backlog"] = await backlog(nats.url, js, args.backlog, args.cap, args.pace)
        out["backlog"]["round_trips_per_call_before"] = ROUND_TRIPS_BEFORE
        if args.paced:
            out["paced"] = await paced(nats.url, js, args.paced, args.paced_rate)
        if args.events:
            out["webhooks"] = await deliveries(nats.url, js, args.events)
        await nc.close()
        return out


def plot(out: dict[str, Any]) -> Any:
    plt = report.pyplot()

    backlog = out["backlog"]
    by = backlog["nats_messages_per_call_by_purpose"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    names = sorted(by, key=by.get)
    a.barh(names, [by[n] for n in names], color="#2a6")
    a.set_title(f"NATS messages per placed call: {backlog['nats_messages_per_call']:.2f}\n"
                f"(2 dialers, {backlog['calls']} calls, cap {backlog['cap']})")
    rates = {"dialers": backlog["calls_per_second"], "fetch+ack": backlog["calls"] / backlog["baseline_consume_ack_seconds"]}
    if "paced" in out:
        rates[f"paced at {out['paced']['pace']:g}/s"] = out["paced"]["calls_per_second"]
    b.bar(list(rates), list(rates.values()), color=["#2a6", "#999", "#69c"][:len(rates)])
    b.set_yscale("log")
    b.set_ylabel("calls/s (log)")
    b.set_title(f"backlog drain ({backlog['calls_per_second']:.0f} calls/s)")
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--backlog", type=int, default=10_000)
    parser.add_argument("--cap", type=int, default=50)
    parser.add_argument("--pace", type=float, default=10_000, help="the tenant's calls per second (high: unpaced)")
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--paced", type=int, default=1000, help="calls of the paced backlog (0: none)")
    parser.add_argument("--paced-rate", type=float, default=100)
    parser.add_argument("--only", choices=["webhooks"], help="run that phase alone (written to dispatch-<phase>.json)")
    parser.add_argument("--profile", type=Path, help="with --only webhooks: py-spy's raw stacks of the drain, to this file")
    args = parser.parse_args()
    result = asyncio.run(main(args))
    if args.only:  # a phase alone leaves the full run's results as they were
        report.save(f"dispatch-{args.only}", result)
    else:
        report.save("dispatch", result, plot)

