"""Configuration changes under load: each request sees one bundle version, and a bad bundle never
replaces a good one."""

from __future__ import annotations

import asyncio
import uuid

import httpx
from nats.js import JetStreamContext

from agentstudio import bus
from agentstudio.calls import CallRequest
from conftest import Tenant, docs, ingest_client, wait_for_bundle

BASE = """
apiVersion: agentstudio.io/v1alpha1
kind: Agent
metadata: {name: a}
spec: {prompt: "v1"}
---
apiVersion: agentstudio.io/v1alpha1
kind: ApiKey
metadata: {name: k}
spec: {scopes: ["calls:create"], rateLimitPerMinute: 1000000}
"""
WITH_B = BASE + """
---
apiVersion: agentstudio.io/v1alpha1
kind: Agent
metadata: {name: b}
spec: {prompt: "agent b"}
"""


async def test_swap_under_load_is_atomic(js: JetStreamContext, nats_server) -> None:  # type: ignore[no-untyped-def]
    t = Tenant(f"t-{uuid.uuid4().hex[:10]}", js, docs(BASE))
    first = await t.publish()
    versions_with_b: set[int] = set()
    results: list[tuple[str, httpx.Response]] = []
    async with ingest_client(nats_server.url) as (client, svc):
        await wait_for_bundle(svc, t.name, first.version)
        stop = asyncio.Event()

        async def load() -> None:
            while not stop.is_set():
                slug = "b" if len(results) % 2 else "a"
                resp = await client.post(
                    "/api/v1/webhooks/ingest", json={"agent_slug": slug, "phone_number": "+14155552671"}, headers=t.auth("k")
                )
                results.append((slug, resp))

        workers = [asyncio.create_task(load()) for _ in range(8)]
        for i in range(20):  # flip agent b in and out of the configuration
            bundle = await t.publish(docs(WITH_B if i % 2 == 0 else BASE))
            if i % 2 == 0:
                versions_with_b.add(bundle.version)
            await asyncio.sleep(0.02)
        stop.set()
        await asyncio.gather(*workers)

    codes = {r.status_code for _, r in results}
    assert codes <= {201, 404}, codes
    assert len(results) > 100
    b_accepted = [r for slug, r in results if slug == "b" and r.status_code == 201]
    assert b_accepted and any(r.status_code == 404 for slug, r in results if slug == "b")
    for resp in b_accepted:  # a call for b was accepted only by a version that had b
        msg = await js.get_last_msg(bus.CALLS_STREAM, bus.dispatch_subject(t.name, resp.json()["call_id"]))
        assert CallRequest.model_validate_json(msg.data).bundle_version in versions_with_b


async def test_bad_bundle_never_replaces_a_good_one(js: JetStreamContext, nats_server) -> None:  # type: ignore[no-untyped-def]
    t = Tenant(f"t-{uuid.uuid4().hex[:10]}", js, docs(BASE))
    good = await t.publish()
    async with ingest_client(nats_server.url) as (client, svc):
        await wait_for_bundle(svc, t.name, good.version)
        kv = await bus.bundles_bucket(js)
        await kv.put(t.name, b'{"schema_version": 1, "tenant": "broken"')  # truncated JSON
        await kv.put(t.name, b'{"schema_version": 99}')  # not a bundle
        marker = await t.publish(docs(WITH_B))  # a good one after the bad ones is taken
        await wait_for_bundle(svc, t.name, marker.version)
        resp = await client.post(
            "/api/v1/webhooks/ingest", json={"agent_slug": "b", "phone_number": "+14155552671"}, headers=t.auth("k")
        )
        assert resp.status_code == 201


async def test_bad_bundle_keeps_serving_the_last_good_one(js: JetStreamContext, nats_server) -> None:  # type: ignore[no-untyped-def]
    t = Tenant(f"t-{uuid.uuid4().hex[:10]}", js, docs(BASE))
    good = await t.publish()
    async with ingest_client(nats_server.url) as (client, svc):
        await wait_for_bundle(svc, t.name, good.version)
        kv = await bus.bundles_bucket(js)
        revision = await kv.put(t.name, b"garbage")
        for _ in range(100):  # wait until the watcher has seen the garbage
            await asyncio.sleep(0.01)
        assert (await kv.get(t.name)).revision == revision
        assert svc.snapshot.bundles[t.name].version == good.version
        resp = await client.post(
            "/api/v1/webhooks/ingest", json={"agent_slug": "a", "phone_number": "+14155552671"}, headers=t.auth("k")
        )
        assert resp.status_code == 201
