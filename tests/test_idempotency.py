"""Idempotency-Key: a retry never queues (and so never dials) twice, even when retries race."""

from __future__ import annotations

import asyncio

import httpx
from nats.js import JetStreamContext

from agentstudio import bus
from conftest import SEED_BODY, Tenant


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
