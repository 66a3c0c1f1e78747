"""NATS goes away mid-test: ingest answers 503 (never a 201 it cannot keep), and every call it did
accept is still queued after nats-server comes back."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from nats.errors import Error as NatsError

from agentstudio import bus
from agentstudio.dialer import main as dialer_main
from agentstudio.natsserver import NatsServer
from agentstudio.settings import Settings
from conftest import SEED_BODY, Tenant, example_resources, ingest_client, wait_for_bundle


async def test_outage_gives_503_and_loses_nothing_acknowledged(tmp_path) -> None:  # type: ignore[no-untyped-def]
    server = NatsServer(tmp_path / "nats")
    server.start()
    admin = await bus.connect(server.url, "test-admin")
    tenant = Tenant("outage", admin.jetstream(), example_resources())
    bundle = await tenant.publish()
    accepted: list[str] = []
    try:
        async with ingest_client(server.url, publish_timeout_seconds=1.0) as (client, svc):
            await wait_for_bundle(svc, tenant.name, bundle.version)

            async def send() -> int:
                resp = await client.post("/api/v1/webhooks/ingest", json=SEED_BODY, headers=tenant.auth("clevertap"))
                if resp.status_code == 201:
                    accepted.append(resp.json()["call_id"])
                elif resp.status_code == 503:
                    assert int(resp.headers["Retry-After"]) > 0
                    assert resp.json()["error"]["code"] == "unavailable"
                return resp.status_code

            before = await asyncio.gather(*(send() for _ in range(20)))
            assert set(before) == {201}

            # Kill the server while requests are in flight: each gets 201 or 503, nothing else.
            in_flight = [asyncio.create_task(send()) for _ in range(30)]
            await asyncio.sleep(0.005)
            server.stop(kill=True)
            during = await asyncio.gather(*in_flight)
            assert set(during) <= {201, 503}, during
            down = await asyncio.gather(*(send() for _ in range(10)))
            assert set(down) == {503}
            assert (await client.get("/readyz")).status_code == 503

            server.start()
            for _ in range(100):  # the client reconnects by itself
                if svc.connected:
                    break
                await asyncio.sleep(0.1)
            after = await asyncio.gather(*(send() for _ in range(10)))
            assert set(after) == {201}

            # A configuration change made after the restart still reaches this ingest.
            await admin.close()
            admin = await bus.connect(server.url, "test-admin")
            tenant.js = admin.jetstream()
            tenant.resources = [i for i in tenant.resources if i.resource.name != "braze"]
            newer = await tenant.publish()
            await wait_for_bundle(svc, tenant.name, newer.version)
            resp = await client.post("/api/v1/webhooks/ingest", json=SEED_BODY, headers=tenant.auth("braze"))
            assert resp.status_code == 401

        js = admin.jetstream()
        for call_id in accepted:
            msg = await js.get_last_msg(bus.CALLS_STREAM, bus.dispatch_subject(tenant.name, call_id))
            assert msg.data
        assert len(accepted) >= 30
    finally:
        await admin.close()
        server.stop()


async def test_a_simulated_call_in_progress_outlives_a_nats_restart(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A call being played when NATS restarts (a NATS pod rescheduled) still reports its end: its
    transitions wait for NATS instead of being dropped, which left it in_progress for hours."""
    server = NatsServer(tmp_path / "nats")
    server.start()
    admin = await bus.connect(server.url, "test-admin")
    tenant = Tenant("restart", admin.jetstream(), example_resources())
    bundle = await tenant.publish()
    nc = await bus.connect(server.url, "test-dialer")
    stop = asyncio.Event()
    try:
        dialer = await dialer_main.build(nc, Settings(nats_url=server.url))
        running = asyncio.create_task(dialer.run(stop))
        async with ingest_client(server.url) as (client, svc):
            await wait_for_bundle(svc, tenant.name, bundle.version)
            body = {**SEED_BODY, "metadata": {"simulate_duration_seconds": 2}}
            resp = await client.post("/api/v1/webhooks/ingest", json=body, headers=tenant.auth("clevertap"))
            call_id = resp.json()["call_id"]
            store = dialer.tracker.store
            async with asyncio.timeout(10):
                while (state := await store.get(tenant.name, call_id)) is None or state.status != "in_progress":
                    await asyncio.sleep(0.05)
            server.stop(kill=True)
            await asyncio.sleep(3)  # the call ends while NATS is away
            server.start()
            async with asyncio.timeout(20):
                while True:
                    try:
                        state = await store.get(tenant.name, call_id)
                    except (NatsError, TimeoutError):
                        state = None
                    if state is not None and state.status == "completed":
                        break
                    await asyncio.sleep(0.2)
            assert state.duration_seconds == 2
        stop.set()
        await running
    finally:
        await nc.close()
        await admin.close()
        server.stop()


async def test_a_bucket_pass_cut_off_by_an_outage_raises_instead_of_ending_short(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """kv_values feeds the takeover walk and the sweeper: a pass that ended quietly when NATS went
    away mid-read would have the walk report every gone dialer's claims settled after reading a part."""
    server = NatsServer(tmp_path / "nats")
    server.start()
    nc = await bus.connect(server.url, "test-pass")
    try:
        js = nc.jetstream()
        kv = await bus.calls_bucket(js)
        for i in range(300):
            await kv.put(f"t.c{i}", b"{}")
        read = 0
        with pytest.raises((NatsError, TimeoutError)):
            async with contextlib.aclosing(bus.kv_values(js, bus.CALLS_BUCKET, batch=100)) as found:
                async for _ in found:
                    read += 1
                    if read == 1:
                        server.stop(kill=True)
        assert read == 100  # the first batch, fetched before the outage
    finally:
        await nc.close()
        server.stop()
