"""Calling windows and frequency caps on a real nats-server: a call outside its callee's window is
accepted as `scheduled` and dialed when the window opens, one whose window closed while it waited is
deferred by the dialer, a number's cap holds across two dialers, a multi-zone number waits for the
window of all its zones, and a deferred call can still be canceled.

Windows are minutes (HH:MM), so the tests set the one clock (agentstudio.clock, what `dev --now`
sets) a few seconds before an opening instead of waiting for the real next minute; the JetStream
schedules that carry the calls still fire on the server's real clock.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from agentstudio import bus, clock
from agentstudio.calling_hours import MAX_CAP_WINDOW, FrequencyCap
from agentstudio.frequency_caps import FrequencyCaps
from agentstudio.natsserver import NatsServer, free_port
from conftest import Tenant, docs, ingest_client, wait_for_bundle
from test_dev import DevProcess
from test_dialer import MANIFESTS, dialers, until_status

UTC = timezone.utc
LOS_ANGELES = "+14155552671"  # one zone: America/Los_Angeles
NEW_YORK = "+12125552671"
TOLL_FREE = "+18005551234"  # 42 zones, Guam to Adak


def policy(spec: str) -> str:
    return f"""
---
apiVersion: agentstudio.io/v1alpha1
kind: CallPolicy
metadata: {{name: default}}
spec: {spec}
"""


@asynccontextmanager
async def tenant_with(js: JetStreamContext, nats_url: str, spec: str) -> AsyncIterator[tuple[Tenant, httpx.AsyncClient]]:
    """A fresh tenant whose namespace default CallPolicy is `spec`, and an ingest serving its bundle."""
    t = Tenant(f"t-{uuid.uuid4().hex[:10]}", js, docs(MANIFESTS + policy(spec)))
    await t.publish()
    async with ingest_client(nats_url) as (client, svc):
        assert t.bundle is not None
        await wait_for_bundle(svc, t.name, t.bundle.version)
        yield t, client


async def call(api: httpx.AsyncClient, t: Tenant, number: str, **body: Any) -> httpx.Response:
    return await api.post("/api/v1/webhooks/ingest", headers=t.auth("test"), json={
        "agent_slug": "a", "phone_number": number, "metadata": {"simulate_duration_seconds": 0.2}, **body})


async def get(api: httpx.AsyncClient, t: Tenant, call_id: str) -> dict[str, Any]:
    return (await api.get(f"/api/v1/calls/{call_id}", headers=t.auth("test"))).json()


async def until(predicate: Any, what: str, timeout: float = 30) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.05)


def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


def dialed_at(record: dict[str, Any]) -> datetime:
    return next(at(e["at"]) for e in record["events"] if e["status"] == "dialing")


NINE_TO_FIVE = '{preset: none, hours: {mon: ["09:00-17:00"], tue: ["09:00-17:00", "17:01-18:00"], defaultZone: UTC}}'


async def test_a_call_outside_its_window_is_scheduled_then_dialed_when_it_opens(nats_server, js) -> None:  # type: ignore[no-untyped-def]
    opening = at("2026-12-01T09:00:00-08:00")  # a Tuesday, 09:00 in Los Angeles
    with clock.reading(opening - timedelta(seconds=5)):
        async with tenant_with(js, nats_server.url, NINE_TO_FIVE) as (t, api):
            resp = await call(api, t, LOS_ANGELES)
            assert resp.status_code == 201, resp.text
            assert resp.json()["status"] == "scheduled" and at(resp.json()["scheduled_for"]) == opening, resp.text
            call_id = resp.json()["call_id"]
            record = await get(api, t, call_id)
            assert record["status"] == "scheduled" and record["scheduled_reason"] == "calling_hours", record
            assert at(record["scheduled_for"]) == opening
            # Waiting on its schedule subject, not in the dispatch queue.
            with pytest.raises(NotFoundError):
                await js.get_last_msg(bus.CALLS_STREAM, bus.dispatch_subject(t.name, call_id))
            async with dialers(nats_server.url):
                done = await until_status(api, t, call_id, "completed", timeout=30)
            assert done["deferrals"] == []  # dialed on arrival: the window had opened
            # Dialed once the clock read the opening (schedules have one-second resolution, rounded up).
            assert dialed_at(done) >= clock.real(opening)


async def test_a_call_whose_window_closed_while_it_waited_is_deferred_by_the_dialer_then_dialed(nats_server, js) -> None:  # type: ignore[no-untyped-def]
    async with tenant_with(js, nats_server.url, NINE_TO_FIVE) as (t, api):
        with clock.reading(at("2026-12-01T16:59:50-08:00")):  # open: queued for now
            resp = await call(api, t, LOS_ANGELES)
            assert resp.json()["status"] == "pending", resp.text
        call_id = resp.json()["call_id"]
        # The dialers first read it after 17:00, when the window has closed until 17:01.
        reopening = at("2026-12-01T17:01:00-08:00")
        with clock.reading(reopening - timedelta(seconds=8)):
            async with dialers(nats_server.url) as (dialer,):
                async def deferred() -> bool:
                    return (await get(api, t, call_id))["status"] == "scheduled"

                await until(deferred, "the dialer did not defer the call")
                record = await get(api, t, call_id)
                assert record["scheduled_reason"] == "calling_hours" and at(record["scheduled_for"]) == reopening
                assert [(d["reason"], at(d["until"])) for d in record["deferrals"]] == [("calling_hours", reopening)]
                assert call_id not in dialer.simulated.placed  # type: ignore[attr-defined]
                done = await until_status(api, t, call_id, "completed", timeout=30)
            assert dialed_at(done) >= clock.real(reopening)
        assert dialer.simulated.placed.count(call_id) == 1  # type: ignore[attr-defined]
        assert [e["status"] for e in done["events"]] == ["pending", "dialing", "ringing", "in_progress", "completed"]


async def test_a_call_deferred_again_to_the_same_opening_rewrites_its_record(nats_server, js) -> None:  # type: ignore[no-untyped-def]
    """A call due beyond the queue's reach (MAX_SCHEDULE_AHEAD) arrives early and is deferred again to
    the same opening. Its record must be written then too: the as-calls bucket's TTL (the calls'
    retention) runs from a record's last write, and an opening a week away or a 30-day frequency cap
    would otherwise outlast the record while the call still waits."""
    mondays = '{preset: none, hours: {mon: ["09:00-17:00"], defaultZone: UTC}}'
    async with tenant_with(js, nats_server.url, mondays) as (t, api):
        with clock.reading(at("2026-11-30T16:59:50-08:00")):  # a Monday, open: queued for now
            resp = await call(api, t, LOS_ANGELES)
            assert resp.json()["status"] == "pending", resp.text
        call_id = resp.json()["call_id"]
        reopening = at("2026-12-07T09:00:00-08:00")  # past MAX_SCHEDULE_AHEAD from Monday 17:00
        kv = await bus.calls_bucket(js)
        key = f"{t.name}.{call_id}"
        with clock.reading(at("2026-11-30T17:00:05-08:00")):
            async with dialers(nats_server.url):
                async def deferred() -> bool:
                    return (await get(api, t, call_id))["status"] == "scheduled"

                await until(deferred, "the dialer did not defer the call")
                record = await get(api, t, call_id)
                assert [(d["reason"], at(d["until"])) for d in record["deferrals"]] == [("calling_hours", reopening)]
                first = (await kv.get(key)).revision
                # Its schedule fires early (as it would 6 days on): the same message on its dispatch subject.
                early = await js.get_last_msg(bus.CALLS_STREAM, bus.schedule_subject(t.name, call_id))
                await js.publish(bus.dispatch_subject(t.name, call_id), early.data, stream=bus.CALLS_STREAM,
                                 headers={"Nats-Msg-Id": f"{call_id}.early"})

                async def rewritten() -> bool:
                    return (await kv.get(key)).revision > first

                await until(rewritten, "the record was not written when the call was deferred again", timeout=10)
        record = await get(api, t, call_id)
        assert record["status"] == "scheduled"
        assert [(d["reason"], at(d["until"])) for d in record["deferrals"]] == [("calling_hours", reopening)]


async def test_a_multi_zone_number_waits_until_the_window_is_open_in_every_zone(nats_server, js) -> None:  # type: ignore[no-untyped-def]
    # US federal hours (preset auto): 08:00-21:00 in the callee's zones. At 21:59:55 UTC New York is
    # at 16:59, but Guam, one of a toll-free number's zones, opens at 22:00 UTC.
    opening = at("2026-12-01T22:00:00+00:00")
    with clock.reading(opening - timedelta(seconds=5)):
        async with tenant_with(js, nats_server.url, "{preset: auto}") as (t, api):
            local = await call(api, t, NEW_YORK)
            assert local.json()["status"] == "pending", local.text
            toll_free = await call(api, t, TOLL_FREE)
            assert toll_free.json()["status"] == "scheduled", toll_free.text
            assert at(toll_free.json()["scheduled_for"]) == opening
            async with dialers(nats_server.url):
                first = await until_status(api, t, local.json()["call_id"], "completed", timeout=30)
                done = await until_status(api, t, toll_free.json()["call_id"], "completed", timeout=30)
        assert dialed_at(first) < clock.real(opening) <= dialed_at(done)


async def test_a_number_under_its_cap_is_placed_exactly_that_often_across_two_dialers(nats_server, js) -> None:  # type: ignore[no-untyped-def]
    window = 10
    spec = f"{{preset: none, cap: {{count: 2, windowSeconds: {window}}}}}"
    async with tenant_with(js, nats_server.url, spec) as (t, api):
        ids = [(await call(api, t, LOS_ANGELES)).json()["call_id"] for _ in range(5)]
        # One call in flight per dialer, so both take calls to the number and race for its placements.
        async with dialers(nats_server.url, count=2, dialer_max_in_flight=1) as running:
            async def first_round_settled() -> bool:
                statuses = [(await get(api, t, i))["status"] for i in ids]
                return statuses.count("scheduled") == 3 and statuses.count("completed") == 2

            await until(first_round_settled, "two placed and three deferred")
            # Only this test's calls: the dialers' consumer is shared, so others' leftovers pass too.
            placed = [c for d in running for c in d.simulated.placed if c in ids]  # type: ignore[attr-defined]
            assert len(placed) == 2, placed
            for i in set(ids) - set(placed):
                record = await get(api, t, i)
                assert record["scheduled_reason"] == "frequency_cap" and record["error"] is None, record
                assert record["deferrals"][0]["reason"] == "frequency_cap"
            # Deferred, not dropped: each is placed once its turn comes.
            done = [await until_status(api, t, i, "completed", timeout=60) for i in ids]
        placed = [c for d in running for c in d.simulated.placed if c in ids]  # type: ignore[attr-defined]
        assert sorted(placed) == sorted(ids)
    # No window of the cap's length held more than two placements (each is reserved a moment before
    # its dialing is recorded, hence the second of slack).
    times = sorted(dialed_at(record) for record in done)
    assert all(later - earlier >= timedelta(seconds=window - 1) for earlier, later in zip(times, times[2:])), times


async def test_a_reservation_is_idempotent_per_attempt_and_a_full_window_says_when_it_frees(js) -> None:  # type: ignore[no-untyped-def]
    caps = FrequencyCaps(await bus.frequency_bucket(js, MAX_CAP_WINDOW))
    tenant, cap, start = f"t-{uuid.uuid4().hex[:10]}", FrequencyCap(count=2, window_seconds=3600), clock.now()
    assert await caps.reserve(tenant, NEW_YORK, "17", cap, start) is None
    # The same attempt again (a dialer died after reserving and another took the call over).
    assert await caps.reserve(tenant, NEW_YORK, "17", cap, start + timedelta(seconds=5)) is None
    assert await caps.reserve(tenant, NEW_YORK, "18", cap, start + timedelta(seconds=10)) is None
    assert await caps.reserve(tenant, NEW_YORK, "19", cap, start + timedelta(seconds=20)) == start + timedelta(hours=1)
    assert await caps.reserve(tenant, LOS_ANGELES, "19", cap, start) is None  # another number
    await caps.release(tenant, NEW_YORK, "17")
    assert await caps.reserve(tenant, NEW_YORK, "19", cap, start + timedelta(seconds=20)) is None
    # A shorter cap (another policy's) never prunes what a longer one still counts.
    day = FrequencyCap(count=3, window_seconds=86400)
    assert await caps.reserve(tenant, NEW_YORK, "20", day, start + timedelta(hours=2)) is None
    assert await caps.reserve(tenant, NEW_YORK, "21", FrequencyCap(count=1, window_seconds=1),
                              start + timedelta(hours=3)) is None
    assert await caps.reserve(tenant, NEW_YORK, "22", day, start + timedelta(hours=3)) == \
        start + timedelta(seconds=20, days=1)


async def test_a_number_is_kept_for_the_longest_window_after_its_last_placement_and_an_older_bucket_moves_to_it(
        tmp_path: Path) -> None:
    """Earlier versions kept a record for every number ever called: a dialer starting makes the bucket,
    or moves one made before, with the longest window a cap may count as its TTL, keeping what it
    holds. A TTL runs from a key's last write, and every placement is written when it is made, so a
    record expires only once none of its placements is inside any window."""
    with NatsServer(tmp_path / "nats") as server:
        nc = await bus.connect(server.url, "test")
        try:
            js = nc.jetstream()
            async with dialers(server.url):
                pass
            made = (await js.stream_info(f"KV_{bus.FREQUENCY_BUCKET}")).config
            assert made.max_age == MAX_CAP_WINDOW == 90 * 86400
            await js.delete_key_value(bus.FREQUENCY_BUCKET)
            old = await js.create_key_value(bucket=bus.FREQUENCY_BUCKET, history=1, direct=True)  # as made before
            await old.put("t.12125552671", b'{"keep": 86400, "placed": {"7": 1}}')
            async with dialers(server.url):
                pass
            moved = (await js.stream_info(f"KV_{bus.FREQUENCY_BUCKET}")).config
            assert moved.max_age == MAX_CAP_WINDOW
            assert (await old.get("t.12125552671")).value == b'{"keep": 86400, "placed": {"7": 1}}'
        finally:
            await nc.close()


async def test_deferred_calls_can_be_canceled_by_id_and_by_filter_and_are_never_dialed(nats_server, js) -> None:  # type: ignore[no-untyped-def]
    reopening = at("2026-12-01T17:01:00-08:00")
    async with tenant_with(js, nats_server.url, NINE_TO_FIVE) as (t, api):
        with clock.reading(at("2026-12-01T16:59:50-08:00")):
            by_id = (await call(api, t, LOS_ANGELES)).json()["call_id"]
        with clock.reading(reopening - timedelta(seconds=6)):
            by_filter = (await call(api, t, LOS_ANGELES, metadata={"campaign_id": "night"})).json()
            assert by_filter["status"] == "scheduled", by_filter
            control = (await call(api, t, LOS_ANGELES)).json()["call_id"]  # due at the same instant
            async with dialers(nats_server.url) as (dialer,):
                async def deferred() -> bool:
                    return (await get(api, t, by_id))["status"] == "scheduled"

                await until(deferred, "the dialer did not defer the call")
                canceled = await api.post(f"/api/v1/calls/{by_id}/cancel", headers=t.auth("test"))
                assert canceled.status_code == 200 and canceled.json()["status"] == "canceled", canceled.text
                result = await api.post("/api/v1/calls/cancel", headers=t.auth("test"),
                                        json={"metadata": {"campaign_id": "night"}})
                assert result.json() == {"canceled": 1}, result.text

                # Once the call due at the same instant is dialed, the dialers have read the others.
                await until_status(api, t, control, "completed", timeout=30)
                for call_id in (by_id, by_filter["call_id"]):
                    record = await get(api, t, call_id)
                    assert record["status"] == "canceled", record
                    assert call_id not in dialer.simulated.placed  # type: ignore[attr-defined]


async def test_a_number_its_policy_never_lets_be_called_is_refused_naming_the_policy(nats_server, js) -> None:  # type: ignore[no-untyped-def]
    async with tenant_with(js, nats_server.url, "{preset: none, hours: {defaultZone: UTC}}") as (t, api):
        resp = await call(api, t, LOS_ANGELES)
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert error["code"] == "no_calling_window" and error["field"] == "phone_number", error
    assert "CallPolicy 'default'" in error["message"] and "400 days" in error["message"], error


DEV_FOLDER = """
apiVersion: agentstudio.io/v1alpha1
kind: Agent
metadata: {name: a}
spec: {prompt: "Hello"}
---
apiVersion: agentstudio.io/v1alpha1
kind: ApiKey
metadata: {name: sandbox}
spec: {scopes: ["calls:create", "calls:read"], mode: test}
""" + policy('{preset: none, hours: {mon: ["09:00-17:00"], tue: ["09:00-17:00"], defaultZone: UTC}}')


def test_dev_now_runs_the_stack_as_if_the_clock_read_that_time(tmp_path: Path) -> None:
    folder = tmp_path / "manifests"
    folder.mkdir()
    (folder / "all.yaml").write_text(DEV_FOLDER)
    # 20 s before Los Angeles opens: time for dev to start and take the call while it is closed.
    dev = DevProcess(folder, free_port(), "--now", "2026-12-01T08:59:40-08:00")
    try:
        keys = dev.start()
        assert any(line.startswith("clock: 2026-12-01T08:59:40-08:00 and advancing") for line in dev.seen), dev.seen
        auth = {"Authorization": f"Bearer {keys['sandbox']}"}
        resp = httpx.post(f"{dev.url}/api/v1/webhooks/ingest", headers=auth,
                          json={"agent_slug": "a", "phone_number": LOS_ANGELES})
        assert resp.status_code == 201, resp.text
        assert resp.json()["status"] == "scheduled", resp.text
        assert at(resp.json()["scheduled_for"]) == at("2026-12-01T09:00:00-08:00")
        call_id = resp.json()["call_id"]
        assert httpx.get(f"{dev.url}/api/v1/calls/{call_id}", headers=auth).json()["status"] == "scheduled"
        dev.expect(rf"dialer \(simulated\): call {call_id} to \*+2671 agent=a \[test\]", timeout=60)
        dev.expect(rf"^call {call_id} to \*+2671: completed in \d+ s$")
    finally:
        assert dev.interrupt() == 0


async def test_a_retry_due_outside_the_window_waits_for_its_next_opening(nats_server, js) -> None:  # type: ignore[no-untyped-def]
    """Retries and windows compose: the retry's dispatch is checked like any other, so an attempt that
    ends just before the window closes is retried at the next opening, not at its delay nor dropped."""
    spec = ('{preset: none, hours: {tue: ["16:00-17:00", "17:01-18:00"], defaultZone: UTC},'
            ' retries: {maxAttempts: 2, outcomes: [no_answer], delaysSeconds: [6]}}')
    async with tenant_with(js, nats_server.url, spec) as (t, api):
        reopening = at("2026-12-01T17:01:00-08:00")
        # 16:59:55: the first attempt goes now and is not answered; its retry falls due after 17:00.
        with clock.reading(reopening - timedelta(seconds=65)):
            resp = await call(api, t, LOS_ANGELES, metadata={"simulate_outcome": "no_answer,completed",
                                                              "simulate_duration_seconds": 0.2})
            assert resp.json()["status"] == "pending", resp.text
            call_id = resp.json()["call_id"]
            async with dialers(nats_server.url) as (dialer,):
                async def retried() -> bool:
                    return (await get(api, t, call_id))["attempt"] == 2

                await until(retried, "the first attempt was not retried")
                record = await get(api, t, call_id)
                assert record["status"] == "scheduled" and record["scheduled_reason"] == "retry", record
                # Half a minute on, as if the 6 s had taken that long: the retry's dispatch (on the
                # server's real clock, in a few seconds) finds the window closed until 17:01.
                clock.start_at(reopening - timedelta(seconds=30))

                async def deferred() -> bool:
                    return any(d["reason"] == "calling_hours" for d in (await get(api, t, call_id))["deferrals"])

                await until(deferred, "the retry was not deferred to the window's opening")
                record = await get(api, t, call_id)
                assert record["status"] == "scheduled" and at(record["scheduled_for"]) == reopening, record
                assert record["scheduled_reason"] == "calling_hours"
                assert [a["outcome"] for a in record["attempts"]] == ["no_answer"]
                assert dialer.simulated.placed.count(call_id) == 1  # type: ignore[attr-defined]
                done = await until_status(api, t, call_id, "completed", timeout=60)
                redialed = [at(e["at"]) for e in done["events"] if e["status"] == "dialing"][-1]
                assert redialed >= clock.real(reopening)
    assert [a["outcome"] for a in done["attempts"]] == ["no_answer", "completed"], done["attempts"]
    assert dialer.simulated.placed.count(call_id) == 2  # type: ignore[attr-defined]
