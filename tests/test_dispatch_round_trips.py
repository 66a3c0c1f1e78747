"""What placing a call costs in NATS round trips, end to end (fetched, claimed, placed, rung,
answered, completed, its two events sent and its slots freed), counted on the dialers' own
connections: a backlog drained by two dialers (issue 16: at most 8; 287.5 before, 21 of them not
the slots' contention)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

from agentstudio import bus
from agentstudio.dialer import main as dialer_main
from agentstudio.dialer.providers import SimulatedProvider
from agentstudio.natsserver import NatsServer
from agentstudio.settings import Settings
from backlog import queue_backlog
from nats_messages import Counted

CALLS = 300


async def test_a_placed_call_costs_at_most_8_round_trips(tmp_path: Path) -> None:
    # Its own server: the session's dialer consumer may hold other tests' messages, which would count.
    with NatsServer(tmp_path / "nats") as server:
        nc = await bus.connect(server.url, "test")
        js = nc.jetstream()
        await bus.ensure_calls_stream(js)
        tenant = f"rt-{uuid.uuid4().hex[:8]}"
        ids = await queue_backlog(js, tenant, CALLS)
        counted, stop, conns, running = Counted(), asyncio.Event(), [], []
        settings = Settings(nats_url=server.url, max_concurrent_calls_per_tenant=50, calls_per_second_per_tenant=10_000,
                            cap_retry_seconds=0.05)
        for _ in range(2):
            conns.append(dialer_nc := await bus.connect(server.url, "test-dialer"))
            counted.wrap(dialer_nc)
            dialer = await dialer_main.build(dialer_nc, settings,
                                             simulated_factory=lambda t: SimulatedProvider(t, ring_seconds=0))
            running.append(asyncio.create_task(dialer.run(stop)))
        store = (await dialer_main.tracker_for(nc)).store
        remaining = set(ids)
        async with asyncio.timeout(120):
            while remaining:
                states = await asyncio.gather(*(store.get(tenant, c) for c in remaining))
                remaining -= {s.call_id for s in states if s is not None and s.status == "completed"}
                await asyncio.sleep(0.2)
        stop.set()
        await asyncio.gather(*running)
        for c in [*conns, nc]:
            await c.close()
    assert counted.round_trips / CALLS <= 8, counted.by_purpose.most_common()
    assert counted.by_purpose["ack"] == CALLS  # one a call, answered by nothing
