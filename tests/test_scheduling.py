"""Scheduled calls on a real nats-server: `scheduled_at` in the ingest body holds a call back until
its time without holding the queue (a JetStream message schedule moves it to the dispatch subject
when due), the calls API shows it `scheduled` with `scheduled_for`, and a dialer places it once due."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from agentstudio import bus, calls
from agentstudio.dialer.worker import CONSUMER
from conftest import Tenant
from test_dialer import MANIFESTS, api, dialers, tenant_for_calls, until_status  # noqa: F401 - fixtures


def _at(seconds: float) -> str:
    return (datetime.now(timezone.utc) + timedelta(seconds=seconds)).isoformat()


async def schedule(api: httpx.AsyncClient, t: Tenant, scheduled_at: Any, **headers: str) -> httpx.Response:
    return await api.post("/api/v1/webhooks/ingest", headers={**t.auth("test"), **headers}, json={
        "agent_slug": "a", "phone_number": "+14155552671", "scheduled_at": scheduled_at,
        "metadata": {"simulate_duration_seconds": 0.2}})


async def test_a_scheduled_call_waits_outside_the_queue_then_is_dialed_when_due(  # type: ignore[no-untyped-def]
    nats_server, js: JetStreamContext, api: httpx.AsyncClient, tenant_for_calls: Tenant
) -> None:
    t = tenant_for_calls
    async with dialers(nats_server.url):
        # Due in 8 s: time for every check below while it waits, however loaded the machine.
        resp = await schedule(api, t, _at(8), **{"Idempotency-Key": "spring-1"})
        assert resp.status_code == 201 and resp.json()["status"] == "scheduled", resp.text
        call_id = resp.json()["call_id"]
        again = await schedule(api, t, _at(8), **{"Idempotency-Key": "spring-1"})
        assert again.json()["call_id"] == call_id and again.headers.get("Idempotent-Replayed") == "true"

        record = (await api.get(f"/api/v1/calls/{call_id}", headers=t.auth("test"))).json()
        assert record["status"] == "scheduled" and record["scheduled_for"], record
        listed = (await api.get("/api/v1/calls", params={"status": "scheduled"}, headers=t.auth("test"))).json()
        assert [c["call_id"] for c in listed["data"]] == [call_id]
        # Waiting, it is in no consumer's view: the dialers' consumer reads dispatch subjects only,
        # and the call is not on its dispatch subject yet (the server puts it there when due).
        await asyncio.sleep(1)
        dispatch = bus.dispatch_subject(t.name, call_id)
        assert (await js.consumer_info(bus.CALLS_STREAM, CONSUMER)).config.filter_subject == bus.DISPATCH_ALL
        with pytest.raises(NotFoundError):
            await js.get_last_msg(bus.CALLS_STREAM, dispatch)
        assert (await js.get_last_msg(bus.CALLS_STREAM, bus.schedule_subject(t.name, call_id))).data
        assert (await api.get(f"/api/v1/calls/{call_id}", headers=t.auth("test"))).json()["status"] == "scheduled"

        done = await until_status(api, t, call_id, "completed", timeout=30)
    due = datetime.fromisoformat(record["scheduled_for"])
    started = datetime.fromisoformat(done["events"][1]["at"])  # dialing
    assert started >= due.replace(microsecond=0), (started, due)  # schedules have one-second resolution
    listed = (await api.get("/api/v1/calls", headers=t.auth("test"))).json()
    assert [c["call_id"] for c in listed["data"]].count(call_id) == 1


async def test_scheduled_at_is_checked_and_a_past_one_dials_now(api: httpx.AsyncClient, tenant_for_calls: Tenant) -> None:
    t = tenant_for_calls
    for bad, why in ((_at(7 * 24 * 3600), "days ahead"), ("2026-12-01T09:00:00", "timezone"), ("soon", "datetime")):
        resp = await schedule(api, t, bad)
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert error["field"] == "scheduled_at" and why in error["message"], error
    past = await schedule(api, t, _at(-60))
    assert past.status_code == 201 and past.json()["status"] == "pending"
    empty = await schedule(api, t, "")  # a platform's unfilled attribute: absent
    assert empty.status_code == 201 and empty.json()["status"] == "pending"


async def test_a_canceled_scheduled_call_is_never_dialed(  # type: ignore[no-untyped-def]
    nats_server, api: httpx.AsyncClient, tenant_for_calls: Tenant
) -> None:
    t = tenant_for_calls
    async with dialers(nats_server.url):
        call_id = (await schedule(api, t, _at(2))).json()["call_id"]
        canceled = await api.post(f"/api/v1/calls/{call_id}/cancel", headers=t.auth("test"))
        assert canceled.status_code == 200 and canceled.json()["status"] == "canceled", canceled.text
        await asyncio.sleep(4)  # past its time: the schedule fired and a dialer read it
        record = (await api.get(f"/api/v1/calls/{call_id}", headers=t.auth("test"))).json()
    assert record["status"] == "canceled"
    assert [e["status"] for e in record["events"]] == ["pending", "canceled"]


async def test_a_deferred_call_is_listed_once_where_it_was_accepted(  # type: ignore[no-untyped-def]
    js: JetStreamContext, api: httpx.AsyncClient, tenant_for_calls: Tenant
) -> None:
    """Deferring (calling windows, caps, retries) queues a call again; page by page, the listing
    still shows each call once, in the order they were accepted."""
    t = tenant_for_calls
    # Queued for now with no dialer running: each stays on its dispatch subject, where a dialer defers from.
    accepted = [(await schedule(api, t, None)).json()["call_id"] for _ in range(3)]
    first = await calls.fetch(js, t.name, accepted[0])
    assert first is not None
    later = await calls.defer(js, first, datetime.now(timezone.utc) + timedelta(hours=2), f"test-defer-{first.call_id}-1")
    await calls.defer(js, later, datetime.now(timezone.utc) + timedelta(hours=3), f"test-defer-{first.call_id}-2")
    assert (await calls.fetch(js, t.name, accepted[0])).requeued == 2  # type: ignore[union-attr]
    seen: list[str] = []
    cursor: str | None = None
    while True:
        params = {"limit": "1", **({"cursor": cursor} if cursor else {})}
        page = (await api.get("/api/v1/calls", params=params, headers=t.auth("test"))).json()
        seen += [c["call_id"] for c in page["data"]]
        cursor = page.get("next_cursor")
        if not cursor:
            break
    assert seen == accepted[::-1]
