"""Two `agent-studio ingest` processes behind a platform that retries each call with its
Idempotency-Key on the other one: SIGKILLing one under load, while a call it queued is still
unanswered, loses and doubles no call, and places none that was not acknowledged."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from nats.aio.msg import Msg

from agentstudio import bus, calls
from agentstudio.natsserver import NatsServer
from conftest import Tenant, docs
from load import Load
from processes import Process, ingest_ready, start_ingest
from test_dialer import MANIFESTS, dialers
from test_nats_cluster import placed_calls

SCENARIO_SECONDS = 120


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[NatsServer]:
    """A server of its own: every call on it is this test's, so what is placed can be compared whole."""
    with NatsServer(tmp_path / "nats") as server:
        yield server


async def test_sigkilling_an_ingest_under_load_loses_doubles_and_invents_no_call(
    nats: NatsServer, tmp_path: Path
) -> None:
    admin = await bus.connect(nats.url, "test-admin")
    js = admin.jetstream()
    await bus.ensure_calls_stream(js)
    tenant = Tenant(f"t-{uuid.uuid4().hex[:10]}", js, docs(MANIFESTS))
    await tenant.publish()
    started: list[Process] = []

    async def ingest(name: str) -> str:
        process, url = start_ingest(nats.url, tmp_path / f"{name}.log",
                                    AGENTSTUDIO_CALLS_INDEX_DIR=str(tmp_path / f"{name}-index"))
        started.append(process)
        await asyncio.to_thread(process.wait_until, lambda: ingest_ready(url), f"{name} ready")
        return url

    published: list[str] = []  # the call id of every publish to the tenant's dispatch subject
    victim_url = ""
    queued: list[str] = []  # the Idempotency-Key whose call landed while the victim had not answered
    frozen = asyncio.Event()

    async def on_dispatch(msg: Msg) -> None:
        """Freeze the victim the moment a call it is answering lands on the stream: its platform's
        request is in flight with the call queued, the case a retry must not double."""
        call_id = msg.subject.rsplit(".", 1)[1]
        published.append(call_id)
        if not victim_url or frozen.is_set():
            return
        for key, url in load.in_flight.items():
            if url == victim_url and calls.new_call_id(tenant.name, "test", key) == call_id:
                started[0].proc.send_signal(signal.SIGSTOP)
                queued[:] = [key]
                frozen.set()
                return

    sub = await admin.subscribe(bus.dispatch_subject(tenant.name, "*"), cb=on_dispatch)
    stop_load = asyncio.Event()
    try:
        urls = [await ingest("ingest-a"), await ingest("ingest-b")]
        load = Load(urls, tenant.keys["test"], rate=20, workers=4)
        async with asyncio.timeout(SCENARIO_SECONDS):  # a bound for a hang anywhere, teardown included
            async with dialers(nats.url, count=2, max_concurrent_calls_per_tenant=100) as running:
                loading = asyncio.create_task(load.run(stop_load))
                await asyncio.sleep(2)
                victim_url = urls[0]
                freezes = 0
                async with asyncio.timeout(30):
                    while True:
                        await frozen.wait()
                        freezes += 1
                        await asyncio.sleep(0.2)  # an answer sent before the freeze has arrived by now
                        if load.in_flight.get(queued[0]) == victim_url:
                            break
                        started[0].proc.send_signal(signal.SIGCONT)  # answered in time: wait for another
                        frozen.clear()
                at_kill = {k for k, url in load.in_flight.items() if url == victim_url}
                kill_time = time.monotonic()
                started[0].kill()
                await asyncio.sleep(3)  # the platform's retries and new calls go to the survivor

                urls[0] = await ingest("ingest-a-again")  # a new replica takes the place of the dead one
                back = time.monotonic()
                async with asyncio.timeout(30):
                    while not any(a.url == urls[0] and a.answer in ("200", "201") for a in load.answers):
                        await asyncio.sleep(0.05)
                await asyncio.sleep(2)
                stop_load.set()
                await loading

                accepted = set(load.accepted.values())
                async with asyncio.timeout(60):  # every call queued, acknowledged or not, is placed
                    while not accepted | set(published) <= set(placed_calls(running)):
                        await asyncio.sleep(0.1)
                placed = placed_calls(running)
    finally:
        stop_load.set()
        await sub.unsubscribe()
        if frozen.is_set():
            started[0].kill()  # a stopped process would not heed the SIGTERM below
        for process in started:
            process.stop(timeout=10)
        await admin.close()

    after_kill = [a for a in load.answers if a.at >= kill_time]
    broken = [a for a in load.answers if a.key in at_kill and a.url == victim_url and not a.answer.isdigit()]
    retried = {a.key for a in load.answers if not a.answer.isdigit() or a.answer == "503"}
    final = {a.key: "replayed" if a.replayed else "new" for a in load.answers if a.answer in ("200", "201")}
    figures = {
        "calls_accepted": len(load.accepted),
        "freezes_until_an_answer_was_cut": freezes,
        "in_flight_to_victim_at_kill": len(at_kill),
        "broken_at_kill": len(broken),
        "retries_answered": Counter(final[k] for k in retried),
        "kill_to_next_201_s": round(next(a.at for a in after_kill if a.answer == "201") - kill_time, 3),
        "new_replica_ready_to_2xx_s": round(
            next(a.at for a in load.answers if a.url == urls[0] and a.answer in ("200", "201")) - back, 3),
        "answers": Counter(a.answer for a in load.answers),
    }
    print(json.dumps(figures))
    assert {a.key for a in load.answers} == set(load.accepted), "a key never got 201 or 200"
    assert len(set(load.accepted.values())) == len(load.accepted), "two Idempotency-Keys got one call id"
    doubled = {c: n for c, n in placed.items() if n != 1}
    assert not doubled, f"placed more than once: {doubled}"
    assert set(placed) == set(load.accepted.values()), (
        f"never placed: {set(load.accepted.values()) - set(placed)}; "
        f"placed, never acknowledged: {set(placed) - set(load.accepted.values())}")
    assert len(load.accepted) > 100
    # The request whose call was queued when the kill cut its answer off was retried and answered
    # with that call, replayed.
    assert any(a.key == queued[0] and a.url == victim_url and not a.answer.isdigit() for a in load.answers)
    assert final[queued[0]] == "replayed"
