"""Pause on a real nats-server: a paused workflow's calls are parked on their schedule subjects (out
of the dialers' consumer), a resume re-queues them at once, and a parked call stays cancelable."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig

from agentstudio import bus
from agentstudio.dialer.worker import CONSUMER
from agentstudio.natsserver import NatsServer
from conftest import Tenant, docs, ingest_client, wait_for_bundle
from test_cancel import WORKFLOWS, cancel, queue_for
from test_dialer import MANIFESTS, dialers, until_status


@asynccontextmanager
async def own_server(tmp_path: Path, max_ack_pending: int) -> AsyncIterator[tuple[NatsServer, JetStreamContext, Tenant, httpx.AsyncClient]]:
    """A nats-server of this test's own (the dialers' consumer and its counters are this test's
    alone), the consumer created with a small ack-pending limit before any dialer binds to it."""
    with NatsServer(tmp_path / "nats") as server:
        nc = await bus.connect(server.url, "test-pause")
        try:
            js = nc.jetstream()
            await bus.ensure_calls_stream(js)
            await js.add_consumer(bus.CALLS_STREAM, ConsumerConfig(
                durable_name=CONSUMER, filter_subject=bus.DISPATCH_ALL, ack_policy=AckPolicy.EXPLICIT,
                ack_wait=30, max_deliver=-1, max_ack_pending=max_ack_pending))
            t = Tenant(f"t-{uuid.uuid4().hex[:10]}", js, docs(MANIFESTS + WORKFLOWS % "true"))
            await t.publish()
            async with ingest_client(server.url) as (client, svc):
                assert t.bundle is not None
                await wait_for_bundle(svc, t.name, t.bundle.version)
                yield server, js, t, client
        finally:
            await nc.close()


async def record(api: httpx.AsyncClient, t: Tenant, call_id: str) -> dict[str, Any]:
    return (await api.get(f"/api/v1/calls/{call_id}", headers=t.auth("test"))).json()  # type: ignore[no-any-return]


async def until_parked(api: httpx.AsyncClient, t: Tenant, call_ids: list[str], timeout: float = 20) -> list[dict[str, Any]]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        records = [await record(api, t, c) for c in call_ids]
        if all(r["status"] == "scheduled" and r.get("scheduled_reason") == "paused" for r in records):
            return records
        assert asyncio.get_running_loop().time() < deadline, [(r["status"], r.get("scheduled_reason")) for r in records]
        await asyncio.sleep(0.1)


async def test_a_paused_backlog_larger_than_the_ack_pending_limit_holds_up_no_other_workflow(tmp_path: Path) -> None:
    async with own_server(tmp_path, max_ack_pending=4) as (server, js, t, api):
        async with dialers(server.url, pause_recheck_seconds=0.5) as (dialer,):
            waiting = [await queue_for(api, t, "winback", simulate_duration_seconds=0) for _ in range(12)]
            await until_parked(api, t, waiting)
            # Queued after the paused backlog, more than the consumer may hold unacknowledged at once.
            flowing = [await queue_for(api, t, "onboarding", simulate_duration_seconds=0) for _ in range(6)]
            for call_id in flowing:
                await until_status(api, t, call_id, "completed", timeout=20)
            await asyncio.sleep(1.5)  # parked again at least once (the first park is 0.5 s)
            # Parked calls are acknowledged, not held: between their brief visits (a park ending is a
            # dispatch the dialer takes and parks again) the consumer holds none of them.
            async with asyncio.timeout(20):
                while (await js.consumer_info(bus.CALLS_STREAM, CONSUMER)).num_ack_pending:
                    await asyncio.sleep(0.05)
            records = await until_parked(api, t, waiting)
            assert not set(waiting) & set(dialer.simulated.placed)  # type: ignore[attr-defined]
            assert all(r["scheduled_for"] for r in records)

            started = asyncio.get_running_loop().time()
            await t.publish(docs(MANIFESTS + WORKFLOWS % "false"))
            for call_id in waiting:
                await until_status(api, t, call_id, "completed", timeout=20)
            resumed_in = asyncio.get_running_loop().time() - started
            await asyncio.sleep(1.0)  # a second placement of any of them would show here
        placed = [c for c in dialer.simulated.placed if c in waiting]  # type: ignore[attr-defined]
        assert sorted(placed) == sorted(waiting)  # each dialed, once
        print(f"12 parked calls dialed {resumed_in:.2f} s after the resume was published")


async def test_parked_calls_are_dialed_on_resume_not_at_their_next_recheck(tmp_path: Path) -> None:
    # A park of 60 s: only the resume can dial them within the test's bound.
    async with own_server(tmp_path, max_ack_pending=1000) as (server, js, t, api):
        async with dialers(server.url, count=2, pause_recheck_seconds=60) as running:
            waiting = [await queue_for(api, t, "winback", simulate_duration_seconds=0) for _ in range(5)]
            await until_parked(api, t, waiting)
            await t.publish(docs(MANIFESTS + WORKFLOWS % "false"))
            for call_id in waiting:
                await until_status(api, t, call_id, "completed", timeout=15)
            await asyncio.sleep(1.0)
        placed = [c for d in running for c in d.simulated.placed if c in waiting]  # type: ignore[attr-defined]
        assert sorted(placed) == sorted(waiting)  # two dialers saw the resume; each call went out once


async def test_a_parked_call_is_canceled_and_never_dialed_after_the_resume(tmp_path: Path) -> None:
    async with own_server(tmp_path, max_ack_pending=1000) as (server, js, t, api):
        async with dialers(server.url, pause_recheck_seconds=0.5) as (dialer,):
            kept, dropped = [await queue_for(api, t, "winback", simulate_duration_seconds=0) for _ in range(2)]
            await until_parked(api, t, [kept, dropped])
            resp = await cancel(api, t, dropped)
            assert resp.status_code == 200, resp.text
            await t.publish(docs(MANIFESTS + WORKFLOWS % "false"))
            await until_status(api, t, kept, "completed", timeout=15)
            await asyncio.sleep(1.5)
            final = await record(api, t, dropped)
        assert final["status"] == "canceled" and final["end_reason"] == "canceled_by_api"
        assert dropped not in dialer.simulated.placed  # type: ignore[attr-defined]


async def test_calls_paused_by_the_tenant_setting_are_dialed_when_a_dialer_starts_unpaused(tmp_path: Path) -> None:
    async with own_server(tmp_path, max_ack_pending=1000) as (server, js, t, api):
        await t.publish(docs(MANIFESTS + WORKFLOWS % "false"))
        async with dialers(server.url, dialing_paused=True, pause_recheck_seconds=60) as (paused,):
            waiting = [await queue_for(api, t, "onboarding", simulate_duration_seconds=0) for _ in range(4)]
            await until_parked(api, t, waiting)
        async with dialers(server.url, pause_recheck_seconds=60) as (resumed,):  # the rollout, lifted
            for call_id in waiting:
                await until_status(api, t, call_id, "completed", timeout=15)
        assert not set(waiting) & set(paused.simulated.placed)  # type: ignore[attr-defined]
        assert sorted(c for c in resumed.simulated.placed if c in waiting) == sorted(waiting)  # type: ignore[attr-defined]
