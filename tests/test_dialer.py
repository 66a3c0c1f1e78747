"""Dialers on a real nats-server: the state machine, scripted outcomes, the concurrency cap across
dialers, at-most-once placing, and Twilio status callbacks checked by signature."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import orjson
import pytest
from nats.js import JetStreamContext
from twilio.request_validator import RequestValidator

from agentstudio import bundle_store, bus, keys
from agentstudio.bundle import KeyMaterial, compile_bundle
from agentstudio.bundle_store import BundleWatcher, buckets
from agentstudio.callstate import CallEvent, CallState, now
from agentstudio.dialer import main as dialer_main
from agentstudio.dialer.providers import SimulatedProvider
from agentstudio.dialer.worker import Dialer
from agentstudio.natsserver import NatsServer
from agentstudio.settings import Settings
from conftest import Tenant, docs, ingest_client, wait_for_bundle

AUTH_TOKEN = "f" * 32
MANIFESTS = """
apiVersion: agentstudio.io/v1alpha1
kind: Agent
metadata: {name: a}
spec: {prompt: "Hello {{user.name}}"}
---
apiVersion: agentstudio.io/v1alpha1
kind: ApiKey
metadata: {name: live}
spec: {scopes: ["calls:create", "calls:read"], rateLimitPerMinute: 100000}
---
apiVersion: agentstudio.io/v1alpha1
kind: ApiKey
metadata: {name: test}
spec: {scopes: ["calls:create", "calls:read"], mode: test, rateLimitPerMinute: 100000}
"""


class CountingSimulator(SimulatedProvider):
    """The simulated provider, counting what it is asked to place (as a real provider would bill)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.placed: list[str] = []
        self.placed_at: list[float] = []  # time.time() of each, as the pace reads time

    async def place(self, call, voicemail=None):  # type: ignore[no-untyped-def]
        self.placed.append(call.call_id)
        self.placed_at.append(time.time())
        return await super().place(call, voicemail)


@asynccontextmanager
async def dialers(nats_url: str, count: int = 1, **settings: Any) -> AsyncIterator[list[Dialer]]:
    conf = Settings(nats_url=nats_url, **{"cap_retry_seconds": 0.1, **settings})
    conns, running, watchers, stop = [], [], [], asyncio.Event()
    for _ in range(count):
        nc = await bus.connect(nats_url, "test-dialer")
        conns.append(nc)
        watchers.append(BundleWatcher(await buckets(nc.jetstream())))
        await watchers[-1].start()
        async with asyncio.timeout(10):  # the bundles published so far are loaded when it starts
            await watchers[-1].loaded.wait()
        running.append(await dialer_main.build(
            nc, conf, simulated_factory=lambda tracker: CountingSimulator(tracker, ring_seconds=0.05),
            bundles=watchers[-1]))
    tasks = [asyncio.create_task(d.run(stop)) for d in running]
    tasks += [asyncio.create_task(r.run(stop)) for nc, d in zip(conns, running)
              if (r := dialer_main.machine_redirects(nc, d)) is not None]
    try:
        yield running
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for watcher in watchers:
            await watcher.stop()
        for nc in conns:
            await nc.close()


@pytest.fixture
async def tenant_for_calls(js: JetStreamContext) -> Tenant:
    t = Tenant(f"t-{uuid.uuid4().hex[:10]}", js, docs(MANIFESTS))
    await t.publish()
    return t


@pytest.fixture
async def api(nats_server: NatsServer, tenant_for_calls: Tenant) -> AsyncIterator[httpx.AsyncClient]:
    async with ingest_client(nats_server.url, twilio_auth_token=AUTH_TOKEN,
                             public_base_url="https://voice.example.com") as (client, svc):
        assert tenant_for_calls.bundle is not None
        await wait_for_bundle(svc, tenant_for_calls.name, tenant_for_calls.bundle.version)
        yield client


async def queue_call(api: httpx.AsyncClient, t: Tenant, key: str = "test", phone_number: str = "+14155552671",
                     **metadata: Any) -> str:
    resp = await api.post("/api/v1/webhooks/ingest", headers=t.auth(key), json={
        "agent_slug": "a", "phone_number": phone_number, "user_id": "u-1", "metadata": metadata})
    assert resp.status_code == 201, resp.text
    return str(resp.json()["call_id"])


async def until_status(api: httpx.AsyncClient, t: Tenant, call_id: str, status: str, timeout: float = 10) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        record = (await api.get(f"/api/v1/calls/{call_id}", headers=t.auth("test"))).json()
        if record.get("status") == status:
            return record
        assert asyncio.get_running_loop().time() < deadline, record
        await asyncio.sleep(0.05)


async def events_of(js: JetStreamContext, t: Tenant, call_id: str) -> list[dict[str, Any]]:
    sub = await js.subscribe(bus.event_subject(t.name, call_id), ordered_consumer=True)
    found = []
    try:
        while True:
            msg = await sub.next_msg(timeout=0.5)
            found.append(orjson.loads(msg.data))
    except Exception:  # noqa: BLE001 - nats-py raises its TimeoutError when no more are stored
        pass
    await sub.unsubscribe()
    return found


async def test_a_call_goes_through_every_state_and_reports_its_end(api, tenant_for_calls, nats_server, js) -> None:  # type: ignore[no-untyped-def]
    t = tenant_for_calls
    async with dialers(nats_server.url) as (dialer,):
        call_id = await queue_call(api, t, campaign_id="c-1", simulate_duration_seconds=1)
        record = await until_status(api, t, call_id, "completed")
    assert [e["status"] for e in record["events"]] == ["pending", "dialing", "ringing", "in_progress", "completed"]
    assert record["duration_seconds"] == 1 and record["provider"] == "simulated" and record["error"] is None
    # (the shared test server also holds other tests' calls: look at this one)
    assert dialer.simulated.placed.count(call_id) == 1  # type: ignore[attr-defined]
    events = await events_of(js, t, call_id)
    assert [e["type"] for e in events] == ["call.answered", "call.completed"]
    done = events[1]
    assert done["id"].startswith("evt_") and done["created_at"]
    assert done["data"]["user_id"] == "u-1" and done["data"]["duration_seconds"] == 1
    assert done["data"]["metadata"]["campaign_id"] == "c-1" and done["data"]["agent_slug"] == "a"
    assert done["data"]["test"] is True and "error" not in done["data"]


@pytest.mark.parametrize(("outcome", "event"), [("no_answer", "call.no_answer"), ("busy", "call.busy"),
                                                 ("failed", "call.failed")])
async def test_scripted_outcomes(api, tenant_for_calls, nats_server, js, outcome: str, event: str) -> None:  # type: ignore[no-untyped-def]
    t = tenant_for_calls
    async with dialers(nats_server.url):
        call_id = await queue_call(api, t, simulate_outcome=outcome)
        record = await until_status(api, t, call_id, outcome)
    assert record["duration_seconds"] == 0 and record["answered_at"] is None
    [sent] = await events_of(js, t, call_id)
    assert sent["type"] == event
    if outcome == "failed":
        assert record["error"] == {"code": "simulated_failure", "message": "scripted failure"}
        assert sent["data"]["error"]["code"] == "simulated_failure"


async def test_the_cap_holds_across_dialers_and_every_call_is_placed_once(api, tenant_for_calls, nats_server, js) -> None:  # type: ignore[no-untyped-def]
    t = tenant_for_calls
    cap = 3
    async with dialers(nats_server.url, count=2, max_concurrent_calls_per_tenant=cap) as running:
        ids = [await queue_call(api, t, simulate_duration_seconds=0.3) for _ in range(12)]
        store = running[0].store
        in_flight_max = 0
        deadline = asyncio.get_running_loop().time() + 30
        while True:
            states = [await store.get(t.name, c) for c in ids]
            live = sum(1 for s in states if s and s.status in ("dialing", "ringing", "in_progress"))
            in_flight_max = max(in_flight_max, live)
            if all(s and s.status == "completed" for s in states):
                break
            assert asyncio.get_running_loop().time() < deadline, [s.status if s else None for s in states]
            await asyncio.sleep(0.02)
        placed = [c for d in running for c in d.simulated.placed if c in ids]  # type: ignore[attr-defined]
    assert in_flight_max == cap  # reached, never exceeded
    assert sorted(placed) == sorted(ids)  # each exactly once, with two dialers taking from the queue


async def publish_plan(t: Tenant, cap: int, pace: float | None = None) -> None:
    """The tenant's bundle as the operator compiles it with the release's calls.maxConcurrentPerTenant
    (and calls.callsPerSecondPerTenant)."""
    material = {n: [KeyMaterial(keys.digest(k))] for n, k in t.keys.items()}
    bundle = compile_bundle(t.name, t.resources, material, max_concurrent_calls=cap, calls_per_second=pace).bundle
    assert bundle is not None
    await bundle_store.publish(await buckets(t.js), bundle)


async def test_a_changed_plan_caps_running_dialers_without_a_restart(api, tenant_for_calls, nats_server, js) -> None:  # type: ignore[no-untyped-def]
    t = tenant_for_calls
    await publish_plan(t, 2)  # the dialers' own setting (10) says otherwise: the plan wins
    async with dialers(nats_server.url, count=2, max_concurrent_calls_per_tenant=10) as running:
        ids = [await queue_call(api, t, simulate_duration_seconds=0.6) for _ in range(14)]
        store = running[0].store

        async def most_in_flight_until(done: int) -> int:
            most = 0
            deadline = asyncio.get_running_loop().time() + 60
            while True:
                states = [await store.get(t.name, c) for c in ids]
                most = max(most, sum(1 for s in states if s and s.status in ("dialing", "ringing", "in_progress")))
                if sum(1 for s in states if s and s.status == "completed") >= done:
                    return most
                assert asyncio.get_running_loop().time() < deadline, [s.status if s else None for s in states]
                await asyncio.sleep(0.02)

        assert await most_in_flight_until(4) == 2
        await publish_plan(t, 5)  # a bigger plan, while the rest wait parked in the running dialers
        assert await most_in_flight_until(len(ids)) == 5
        placed = [c for d in running for c in d.simulated.placed if c in ids]  # type: ignore[attr-defined]
    assert sorted(placed) == sorted(ids)


async def test_the_tenants_pace_holds_across_dialers(api, tenant_for_calls, nats_server, js) -> None:  # type: ignore[no-untyped-def]
    t = tenant_for_calls
    pace = 4
    await publish_plan(t, 100, pace)  # the dialers' own pace (1000/s) says otherwise: the bundle's wins
    async with dialers(nats_server.url, count=2, calls_per_second_per_tenant=1000) as running:
        start = time.time()
        ids = [await queue_call(api, t, simulate_duration_seconds=0) for _ in range(16)]
        for call_id in ids:
            await until_status(api, t, call_id, "completed", timeout=60)
        placed = [(at, c) for d in running
                  for c, at in zip(d.simulated.placed, d.simulated.placed_at) if c in ids]  # type: ignore[attr-defined]
    assert sorted(c for _, c in placed) == sorted(ids)  # each exactly once
    times = sorted(at for at, _ in placed)
    # Both dialers together: the k-th placement no earlier than k paces after the calls were queued
    # (queued at once, they would all go at once). A dialer waking late only places later, so a
    # loaded machine cannot fail this; counting placements per second could (one late, one on time).
    early = [(k, round(u - start, 3)) for k, u in enumerate(times) if u < start + k / pace - 0.01]
    assert not early, (early, [round(u - start, 3) for u in times])


def _signed(url: str, params: dict[str, str]) -> dict[str, str]:
    return {"X-Twilio-Signature": RequestValidator(AUTH_TOKEN).compute_signature(url, params)}


async def test_twilio_status_callbacks_are_verified_and_ordered(api, tenant_for_calls, nats_server, js) -> None:  # type: ignore[no-untyped-def]
    t = tenant_for_calls
    call_id = await queue_call(api, t, key="live")
    svc_store = (await dialer_main.tracker_for(js._nc)).store  # noqa: SLF001
    await svc_store.change(t.name, call_id, lambda s: CallState(call_id=call_id, tenant=t.name, status="dialing",
                                                                 provider="twilio", provider_call_id="CA" + "0" * 32))
    path = f"/api/v1/providers/twilio/status?call_id={call_id}&tenant={t.name}"
    public = "https://voice.example.com" + path

    async def callback(status: str, seq: int, signature: dict[str, str] | None = None, **extra: str) -> int:
        params = {"CallSid": "CA" + "0" * 32, "AccountSid": "AC" + "0" * 32, "CallStatus": status,
                  "SequenceNumber": str(seq), "From": "+14155550100", "To": "+14155552671", **extra}
        headers = signature if signature is not None else _signed(public, params)
        resp = await api.post(path, data=params, headers=headers)
        return resp.status_code

    assert await callback("ringing", 1, signature={}) == 403
    assert await callback("ringing", 1, signature={"X-Twilio-Signature": "bm90IGl0"}) == 403
    assert (await svc_store.get(t.name, call_id)).status == "dialing"  # type: ignore[union-attr]

    assert await callback("ringing", 1) == 204
    assert await callback("in-progress", 2) == 204
    assert await callback("completed", 3, CallDuration="42") == 204
    assert await callback("ringing", 1) == 204  # late duplicate: changes nothing
    assert await callback("completed", 3, CallDuration="42") == 204
    state = await svc_store.get(t.name, call_id)
    assert state is not None and state.status == "completed" and state.duration_seconds == 42
    assert [e.status for e in state.events] == ["ringing", "in_progress", "completed"]
    assert [e["type"] for e in await events_of(js, t, call_id)] == ["call.answered", "call.completed"]


async def test_no_placed_call_stays_unfinished_forever(api, tenant_for_calls, nats_server, js) -> None:  # type: ignore[no-untyped-def]
    from datetime import timedelta

    from agentstudio.dialer import sweeper

    t = tenant_for_calls
    call_id = await queue_call(api, t, key="live")
    tracker = await dialer_main.tracker_for(js._nc)  # noqa: SLF001
    # Placed, and then its provider went silent.
    await tracker.store.change(t.name, call_id, lambda s: CallState(
        call_id=call_id, tenant=t.name, status="dialing", provider="twilio", provider_call_id="CA1",
        events=[CallEvent(status="dialing", at=now())]))
    assert call_id not in await sweeper.sweep(tracker, older_than=timedelta(minutes=5))  # not yet
    await asyncio.sleep(0.3)
    assert call_id in await sweeper.sweep(tracker, older_than=timedelta(seconds=0.2))
    record = (await api.get(f"/api/v1/calls/{call_id}", headers=t.auth("live"))).json()
    assert record["status"] == "failed" and record["error"]["code"] == "stale"
    assert [e["type"] for e in await events_of(js, t, call_id)] == ["call.failed"]


async def test_a_call_and_record_from_a_newer_version_are_carried_through_keeping_its_fields(api, tenant_for_calls, nats_server, js) -> None:  # type: ignore[no-untyped-def]
    """A rolling upgrade runs two versions on one queue and one bucket: a message or record with a field
    this version does not know is dialed and updated, not refused, and the field is written back."""
    from datetime import datetime, timezone

    from agentstudio.callstate import CallStore

    t = tenant_for_calls
    assert t.bundle is not None
    call_id = str(uuid.uuid4())
    created = datetime.now(timezone.utc).isoformat()
    message = {  # the queued call as the next version's ingest might publish it, with a field of its own
        "call_id": call_id, "tenant": t.name, "api_key": "test", "agent_slug": "a", "phone_number": "+14155552671",
        "user_context": {}, "metadata": {"simulate_duration_seconds": 1}, "test": True, "created_at": created,
        "bundle_version": t.bundle.version, "routing": {"region": "eu-west"}}
    kv = await bus.calls_bucket(js)
    key = CallStore.key(t.name, call_id)
    # Its record, as the next version's ingest might write one, with a field of its own in an event too.
    await kv.put(key, orjson.dumps({
        "call_id": call_id, "tenant": t.name, "status": "pending", "test": True, "routing": {"region": "eu-west"},
        "events": [{"status": "pending", "at": created, "source": "campaign"}]}))
    await js.publish(bus.dispatch_subject(t.name, call_id), orjson.dumps(message), headers={"Nats-Msg-Id": call_id})
    async with dialers(nats_server.url) as (dialer,):
        record = await until_status(api, t, call_id, "completed")
    assert [e["status"] for e in record["events"]] == ["pending", "dialing", "ringing", "in_progress", "completed"]
    assert dialer.simulated.placed.count(call_id) == 1  # type: ignore[attr-defined]
    stored = orjson.loads((await kv.get(key)).value)
    assert stored["routing"] == {"region": "eu-west"}, stored
    assert stored["events"][0]["source"] == "campaign", stored
    assert "routing" not in record  # the API answers its own documented shape
    listed = (await api.get("/api/v1/calls", headers=t.auth("test"), params={"limit": 100})).json()
    assert call_id in [c["call_id"] for c in listed["data"]]
