"""The calls table (agentstudio/calls_table.py) on a real nats-server: what it does beyond the
listing tests in test_calls_api.py — a state seen before its call, the retention's purge, a replica
reading before its table has caught up, and orphaned tables of dead processes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from nats.js import JetStreamContext

from agentstudio import bus, calls_table
from agentstudio.calls import CallRequest, encode
from agentstudio.calls_index import CallFilter
from agentstudio.callstate import CallState, CallStore
from agentstudio.natsserver import NatsServer
from conftest import Tenant, docs, ingest_client, wait_for_bundle

MANIFESTS = """
apiVersion: agentstudio.io/v1alpha1
kind: Agent
metadata: {name: a}
spec: {prompt: "Hello"}
---
apiVersion: agentstudio.io/v1alpha1
kind: ApiKey
metadata: {name: reader}
spec: {scopes: ["calls:read"], mode: live}
"""


@pytest.fixture
def own_nats(tmp_path: Path) -> Iterator[NatsServer]:
    """A server of its own: the purge test drops the stream's oldest messages."""
    with NatsServer(tmp_path / "nats") as server:
        yield server


@pytest.fixture
async def own_js(own_nats: NatsServer) -> AsyncIterator[JetStreamContext]:
    nc = await bus.connect(own_nats.url, "test-calls-table")
    js = nc.jetstream()
    await bus.ensure_calls_stream(js)
    yield js
    await nc.close()


async def _reader(js: JetStreamContext) -> Tenant:
    tenant = Tenant(f"t-{uuid.uuid4().hex[:10]}", js, docs(MANIFESTS))
    await tenant.publish()
    return tenant


async def _queued(js: JetStreamContext, tenant: Tenant, **metadata: str) -> CallRequest:
    call = CallRequest(call_id=str(uuid.uuid4()), tenant=tenant.name, api_key="reader", agent_slug="a",
                       phone_number="+14155552671", user_context={}, metadata=metadata, test=False,
                       created_at=datetime.now(timezone.utc), bundle_version=1)
    await js.publish(bus.dispatch_subject(tenant.name, call.call_id), encode(call), stream=bus.CALLS_STREAM)
    return call


async def _listed(client: httpx.AsyncClient, tenant: Tenant, **params: str) -> list[tuple[str, str]]:
    resp = await client.get("/api/v1/calls", params=params, headers=tenant.auth("reader"))
    assert resp.status_code == 200, resp.text
    return [(c["call_id"], c["status"]) for c in resp.json()["data"]]


async def test_a_state_written_before_its_call_is_read_counts_and_filters(
    own_nats: NatsServer, own_js: JetStreamContext
) -> None:
    """The dialer's state and the request come from two streams the table follows separately: a
    state that lands first waits for its call, then the call is listed, filtered and counted by it."""
    tenant = await _reader(own_js)
    store = CallStore(await bus.calls_bucket(own_js))
    async with ingest_client(own_nats.url) as (client, svc):
        await wait_for_bundle(svc, tenant.name, tenant.bundle.version if tenant.bundle else 0)
        ids = []
        for _ in range(5):
            call = CallRequest(call_id=str(uuid.uuid4()), tenant=tenant.name, api_key="reader", agent_slug="a",
                               phone_number="+14155552671", user_context={}, metadata={"campaign_id": "spring"},
                               test=False, created_at=datetime.now(timezone.utc), bundle_version=1)
            state = CallState.new(call).advanced("dialing").advanced("failed")
            await store.change(tenant.name, call.call_id, lambda _, s=state: s)  # the state first
            await asyncio.sleep(0.05)  # ...seen by the table before the call is queued
            await own_js.publish(bus.dispatch_subject(tenant.name, call.call_id), encode(call),
                                 stream=bus.CALLS_STREAM)
            ids.append(call.call_id)
        waiting = await _queued(own_js, tenant, campaign_id="spring")
        expected = [(waiting.call_id, "pending"), *((i, "failed") for i in ids[::-1])]
        assert await _listed(client, tenant) == expected
        assert await _listed(client, tenant, status="failed") == expected[1:]
        assert await _listed(client, tenant, status="pending", **{"metadata.campaign_id": "spring"}) == expected[:1]
        assert await svc.table.counts(tenant.name, CallFilter()) == {"failed": 5, "pending": 1}


async def test_calls_the_stream_no_longer_holds_leave_the_table(
    own_nats: NatsServer, own_js: JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retention (here a purge of the stream's oldest messages, as max_age does after 7 days)
    removes calls from the stream; the table follows within its purge interval. A state whose call
    never comes (the bucket outlives the stream) is not kept either."""
    monkeypatch.setattr(calls_table, "PURGE_SECONDS", 0.1)
    monkeypatch.setattr(calls_table, "EARLY_SECONDS", 0.0)
    tenant = await _reader(own_js)
    orphan = CallRequest(call_id=str(uuid.uuid4()), tenant=tenant.name, api_key="reader", agent_slug="a",
                         phone_number="+14155552671", user_context={}, metadata={}, test=False,
                         created_at=datetime.now(timezone.utc), bundle_version=1)
    store = CallStore(await bus.calls_bucket(own_js))
    await store.change(tenant.name, orphan.call_id, lambda _: CallState.new(orphan).advanced("dialing"))
    async with ingest_client(own_nats.url) as (client, svc):
        await wait_for_bundle(svc, tenant.name, tenant.bundle.version if tenant.bundle else 0)
        old = [await _queued(own_js, tenant, campaign_id="old") for _ in range(3)]
        new = [await _queued(own_js, tenant, campaign_id="new") for _ in range(2)]
        assert len(await _listed(client, tenant)) == 5
        first_new = (await own_js.get_last_msg(bus.CALLS_STREAM, bus.dispatch_subject(tenant.name, new[0].call_id))).seq
        await own_js.purge_stream(bus.CALLS_STREAM, seq=first_new)  # keeps first_new and later
        want = [(c.call_id, "pending") for c in new[::-1]]
        for _ in range(100):
            if await _listed(client, tenant) == want:
                break
            await asyncio.sleep(0.05)
        assert await _listed(client, tenant) == want, [c.call_id for c in old]
        assert await _listed(client, tenant, **{"metadata.campaign_id": "old"}) == []
        assert await svc.table.counts(tenant.name, CallFilter()) == {"pending": 2}
        for _ in range(100):
            if await svc.table._query("SELECT COUNT(*) FROM early", []) == [(0,)]:
                break
            await asyncio.sleep(0.05)
        assert await svc.table._query("SELECT call_id FROM early", []) == []


async def test_a_replica_still_building_its_table_answers_503_naming_the_index(
    own_nats: NatsServer, own_js: JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    tenant = await _reader(own_js)
    await _queued(own_js, tenant)

    async def never(self: object, js: object, target: int, deadline: float) -> None:
        raise calls_table.Behind(f"the calls index has read CALLS up to 0 of {target}")

    async with ingest_client(own_nats.url) as (client, svc):
        await wait_for_bundle(svc, tenant.name, tenant.bundle.version if tenant.bundle else 0)
        monkeypatch.setattr(calls_table._Projection, "reach", never)
        for path in ("/api/v1/calls", "/api/v1/calls/export"):
            resp = await client.get(path, headers=tenant.auth("reader"))
            assert resp.status_code == 503, resp.text
            assert "calls index" in resp.json()["error"]["message"] and resp.headers["Retry-After"]


def test_tables_of_dead_processes_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    for name in (f"calls-{dead}-1.sqlite", f"calls-{dead}-1.sqlite-wal", f"calls-{os.getppid()}-1.sqlite"):
        (tmp_path / name).write_bytes(b"")
    table = calls_table.CallsTable(tmp_path)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [f"calls-{os.getppid()}-1.sqlite"], left
    assert table.path.parent == tmp_path


def _counting_transactions(table: calls_table.CallsTable) -> list[int]:
    """The sizes of the batches the table applies to its calls from now on, one transaction each."""
    sizes: list[int] = []
    run_write = table._run_write

    def counted(fn: Any, batch: list[Any]) -> None:
        if fn is calls_table._apply_calls:
            sizes.append(len(batch))
        run_write(fn, batch)

    table._run_write = counted  # type: ignore[method-assign]
    return sizes


async def test_calls_arriving_steadily_are_applied_several_to_a_transaction(
    own_nats: NatsServer, own_js: JetStreamContext
) -> None:
    """At a moderate rate each fetch finds about one call; the table gathers them for a moment so
    that a fetch, the hop to its writer thread and a transaction serve several."""
    tenant = await _reader(own_js)
    async with ingest_client(own_nats.url) as (client, svc):
        await wait_for_bundle(svc, tenant.name, tenant.bundle.version if tenant.bundle else 0)
        sizes = _counting_transactions(svc.table)
        started = asyncio.get_running_loop().time()
        for _ in range(200):  # about 100 calls/s, fewer on a loaded machine
            await _queued(own_js, tenant)
            await asyncio.sleep(0.01)
        lingers = (asyncio.get_running_loop().time() - started) / calls_table.LINGER_SECONDS
        assert len(await _listed(client, tenant, limit="200")) == 200
        assert sum(sizes) == 200
        # One transaction a linger at most (and the listing's); 200 before, one a call.
        assert len(sizes) <= lingers + 5, f"{len(sizes)} transactions for 200 calls in {lingers:.0f} lingers: {sizes}"


async def test_a_listing_does_not_wait_for_the_table_to_linger(
    own_nats: NatsServer, own_js: JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader waiting for the table ends its lingering at once: with a linger far longer than a
    listing may wait (caught_up's 10 s), calls queued one by one are each listed right away."""
    monkeypatch.setattr(calls_table, "LINGER_SECONDS", 60.0)
    tenant = await _reader(own_js)
    async with ingest_client(own_nats.url) as (client, svc):
        await wait_for_bundle(svc, tenant.name, tenant.bundle.version if tenant.bundle else 0)
        listed: list[tuple[str, str]] = []
        for _ in range(3):
            call = await _queued(own_js, tenant)
            listed.insert(0, (call.call_id, "pending"))
            assert await _listed(client, tenant) == listed


async def test_a_message_the_table_cannot_read_is_skipped_and_the_calls_after_it_are_listed(
    own_nats: NatsServer, own_js: JetStreamContext
) -> None:
    """A dispatch without a call's fields, one that is not JSON, and a call state that is not JSON:
    each is skipped (raised, it stopped the table on it for good, and every listing answered 503)."""
    tenant = await _reader(own_js)
    async with ingest_client(own_nats.url) as (client, svc):
        await wait_for_bundle(svc, tenant.name, tenant.bundle.version if tenant.bundle else 0)
        for body in (b'{"phone_number": "+14155552671"}', b"not json"):
            await own_js.publish(bus.dispatch_subject(tenant.name, str(uuid.uuid4())), body, stream=bus.CALLS_STREAM)
        await (await bus.calls_bucket(own_js)).put(f"{tenant.name}.{uuid.uuid4()}", b"not json")
        call = await _queued(own_js, tenant)
        assert await _listed(client, tenant) == [(call.call_id, "pending")]
