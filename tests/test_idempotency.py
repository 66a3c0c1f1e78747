"""Idempotency-Key: a retry never queues (and so never dials) twice, even when retries race."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import httpx
import pytest
from nats.js import JetStreamContext

from agentstudio import bus
from agentstudio.natsserver import NatsServer
from conftest import SEED_BODY, Tenant, example_resources, ingest_client, wait_for_bundle


async def count_messages(js: JetStreamContext, tenant: Tenant) -> int:
    info = await js.stream_info(bus.CALLS_STREAM, subjects_filter=f"calls.{tenant.name}.dispatch.*")
    return sum((info.state.subjects or {}).values())


async def test_retry_returns_same_call_and_queues_nothing(client: httpx.AsyncClient, tenant: Tenant, js: JetStreamContext) -> None:
    headers = {**tenant.auth("clevertap"), "Idempotency-Key": "campaign-42/user-123"}
    first = await client.post("/api/v1/webhooks/ingest", json=SEED_BODY, headers=headers)
    again = await client.post("/api/v1/webhooks/ingest", json=SEED_BODY, headers=headers)
    assert first.status_code == again.status_code == 201
    assert first.json()["call_id"] == again.json()["call_id"]
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert await count_messages(js, tenant) == 1


async def test_racing_retries_queue_one_call(client: httpx.AsyncClient, tenant: Tenant, js: JetStreamContext) -> None:
    headers = {**tenant.auth("clevertap"), "Idempotency-Key": "race"}
    responses = await asyncio.gather(
        *(client.post("/api/v1/webhooks/ingest", json=SEED_BODY, headers=headers) for _ in range(25))
    )
    assert {r.status_code for r in responses} == {201}
    assert len({r.json()["call_id"] for r in responses}) == 1
    assert await count_messages(js, tenant) == 1


async def test_different_keys_and_no_key_are_different_calls(client: httpx.AsyncClient, tenant: Tenant, js: JetStreamContext) -> None:
    ids = set()
    for headers in ({"Idempotency-Key": "a"}, {"Idempotency-Key": "b"}, {}, {}):
        resp = await client.post("/api/v1/webhooks/ingest", json=SEED_BODY, headers={**tenant.auth("clevertap"), **headers})
        ids.add(resp.json()["call_id"])
    assert len(ids) == 4
    assert await count_messages(js, tenant) == 4


async def test_same_idempotency_key_on_different_api_keys_are_different_calls(client: httpx.AsyncClient, tenant: Tenant) -> None:
    a = await client.post("/api/v1/webhooks/ingest", json=SEED_BODY, headers={**tenant.auth("clevertap"), "Idempotency-Key": "x"})
    b = await client.post("/api/v1/webhooks/ingest", json=SEED_BODY, headers={**tenant.auth("braze"), "Idempotency-Key": "x"})
    assert a.json()["call_id"] != b.json()["call_id"]


async def test_a_retry_after_the_dedupe_window_answers_the_same_call_and_queues_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, js: JetStreamContext) -> None:
    """JetStream forgets a Nats-Msg-Id after the stream's duplicate window (a day) while the call is
    kept a week. Its own nats-server, whose CALLS stream forgets ids after half a second: a retry
    after that must still be the same call, queued once."""
    monkeypatch.setattr(bus, "IDEMPOTENCY_WINDOW", 0.5)
    server = NatsServer(tmp_path / "nats")
    server.start()
    try:
        nc = await bus.connect(server.url, "test-idempotency")
        own = nc.jetstream()
        t = Tenant(f"t-{uuid.uuid4().hex[:10]}", own, example_resources())
        async with ingest_client(server.url) as (client, svc):
            assert (await own.stream_info(bus.CALLS_STREAM)).config.duplicate_window == 0.5
            await wait_for_bundle(svc, t.name, (await t.publish()).version)
            headers = {**t.auth("clevertap"), "Idempotency-Key": "campaign-42/user-123"}
            first = await client.post("/api/v1/webhooks/ingest", json=SEED_BODY, headers=headers)
            assert first.status_code == 201, first.text
            # A message id published with the call: once the server takes it as new again, it has
            # forgotten the call's too (what a day does in production).
            probe = {"Nats-Msg-Id": f"probe-{uuid.uuid4()}"}
            await own.publish(bus.dead_subject("probe", "probe"), b"", headers=probe)
            async with asyncio.timeout(30):
                while (await own.publish(bus.dead_subject("probe", "probe"), b"", headers=probe)).duplicate:
                    await asyncio.sleep(0.1)
            again = await client.post("/api/v1/webhooks/ingest", json=SEED_BODY, headers=headers)
            assert again.status_code == 201, again.text
            assert again.json()["call_id"] == first.json()["call_id"]
            assert again.headers.get("Idempotent-Replayed") == "true"
            info = await own.stream_info(bus.CALLS_STREAM, subjects_filter=f"calls.{t.name}.>")
            assert sum((info.state.subjects or {}).values()) == 1, info.state.subjects
        await nc.close()
    finally:
        server.stop()
