"""A dialer SIGKILLed with calls ringing or in progress: another dialer finds it gone within its lease
and settles each call it left, instead of waiting hours for reports that will never come (Twilio:
the call fetched from the validating mock and its status applied; simulated: failed provider_lost)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from pathlib import Path

import pytest

from agentstudio import bus, calls
from agentstudio.callstate import CallState, CallStore
from agentstudio.natsserver import NatsServer, free_port
from conftest import Tenant, docs, ingest_client, wait_for_bundle
from processes import Process
from test_dialer import MANIFESTS, events_of, queue_call
from test_dialer_kill import start_dialer

LEASE = "1"  # seconds: a dialer not heard from for this long is gone
SETTLED = 60.0  # bounded polling: far above the lease and a takeover walk


def simulated_dialer(nats_url: str, log: Path) -> Process:
    env = {**os.environ, "AGENTSTUDIO_HOST": "127.0.0.1", "AGENTSTUDIO_PORT": str(free_port()),
           "AGENTSTUDIO_NATS_URL": nats_url, "AGENTSTUDIO_TELEPHONY_PROVIDER": "simulated",
           "AGENTSTUDIO_WEBHOOK_SECRETS": "none", "AGENTSTUDIO_DIALER_LEASE_SECONDS": LEASE,
           "AGENTSTUDIO_MAX_CONCURRENT_CALLS_PER_TENANT": "100"}
    return Process.agent_studio("dialer", log=log, env=env)


async def until_all(store: CallStore, tenant: str, ids: list[str], check, dialer: Process,  # type: ignore[no-untyped-def]
                    what: str) -> list[CallState]:
    """Poll the records until `check` holds for every call (at most SETTLED seconds)."""
    deadline = asyncio.get_running_loop().time() + SETTLED
    while True:
        states = [await store.get(tenant, c) for c in ids]
        if all(s is not None and check(s) for s in states):
            return states  # type: ignore[return-value]
        dialer.alive()
        assert asyncio.get_running_loop().time() < deadline, (
            f"not {what}: " + ", ".join(f"{s.call_id} {s.status} ({s.dialer})" for s in states if s and not check(s)))
        await asyncio.sleep(0.2)


async def test_a_killed_dialers_simulated_calls_fail_provider_lost(nats_server, js, tmp_path) -> None:  # type: ignore[no-untyped-def]
    t = Tenant(f"t-{uuid.uuid4().hex[:10]}", js, docs(MANIFESTS))
    bundle = await t.publish()
    store = CallStore(await bus.calls_bucket(js))
    async with ingest_client(nats_server.url) as (client, svc):
        await wait_for_bundle(svc, t.name, bundle.version)
        first = simulated_dialer(nats_server.url, tmp_path / "dialer-1.log")
        # Answered calls that would talk for ten minutes; one that never stops ringing is the same story.
        ids = [await queue_call(client, t, key="live", phone_number=f"+4479111{i:05d}",
                                simulate_duration_seconds="600") for i in range(6)]
        await until_all(store, t.name, ids, lambda s: s.status == "in_progress", first, "answered")
        first.kill()
        second = simulated_dialer(nats_server.url, tmp_path / "dialer-2.log")
        try:
            states = await until_all(store, t.name, ids, lambda s: s.terminal, second, "ended")
        finally:
            second.stop(timeout=30)
    assert {s.status for s in states} == {"failed"}
    assert {s.error.code for s in states if s.error} == {"provider_lost"}
    assert all(s.error and "heartbeat" in s.error.message for s in states)
    for call_id in ids:
        failed = [e for e in await events_of(js, t, call_id) if e["type"] == "call.failed"]
        assert len(failed) == 1 and failed[0]["data"]["error"]["code"] == "provider_lost"


async def test_a_killed_dialers_twilio_calls_take_the_status_twilio_reports(nats_server, js, twilio_mock, tmp_path) -> None:  # type: ignore[no-untyped-def]
    twilio_mock.clear()
    t = Tenant(f"t-{uuid.uuid4().hex[:10]}", js, docs(MANIFESTS))
    bundle = await t.publish()
    store = CallStore(await bus.calls_bucket(js))
    async with ingest_client(nats_server.url) as (client, svc):
        await wait_for_bundle(svc, t.name, bundle.version)
        first = start_dialer(nats_server.url, twilio_mock, tmp_path / "dialer-1.log", AGENTSTUDIO_DIALER_LEASE_SECONDS=LEASE)
        ids = [await queue_call(client, t, key="live", phone_number=f"+4479222{i:05d}") for i in range(4)]
        placed = await until_all(store, t.name, ids, lambda s: s.provider_call_id is not None, first, "placed")
        first.kill()
        # Where Twilio has them now; no status callback told anyone (Prism sends none).
        outcomes = {"completed": "completed", "no-answer": "no_answer", "busy": "busy", "in-progress": "in_progress"}
        for state, twilio_status in zip(placed, outcomes):
            twilio_mock.update_call(state.provider_call_id, status=twilio_status, duration="17")
        second = start_dialer(nats_server.url, twilio_mock, tmp_path / "dialer-2.log", AGENTSTUDIO_DIALER_LEASE_SECONDS=LEASE)
        try:
            states = await until_all(store, t.name, ids, lambda s: s.status != "dialing", second, "reconciled")
        finally:
            second.stop(timeout=30)
    assert [s.status for s in states] == list(outcomes.values())
    assert states[0].duration_seconds == 17
    assert all(s.dialer != placed[0].dialer for s in states)  # the claims moved to the dialer that took over
    fetches = [r for r in twilio_mock.requests if r.method == "GET" and any(p.provider_call_id in r.path for p in placed)]
    assert fetches and all(r.status == 200 for r in fetches)  # every fetch is one the spec accepts
    done = [e for e in await events_of(js, t, ids[0]) if e["type"] == "call.completed"]
    assert len(done) == 1 and done[0]["data"]["duration_seconds"] == 17


async def test_a_claim_is_taken_over_only_once_its_dialers_heartbeat_stops(nats_server, nc, js) -> None:  # type: ignore[no-untyped-def]
    """A claim of a dialer that heartbeats is left alone (the walk looks at the heartbeats again, so
    one started since the observer last looked is seen); once its heartbeat stops it is gone after a
    lease by the observer's clock, and its call is settled then."""
    from agentstudio.dialer import main as dialer_main
    from agentstudio.dialer.providers import SimulatedProvider
    from agentstudio.dialer.takeover import Liveness, Takeover

    t = Tenant(f"t-{uuid.uuid4().hex[:10]}", js, docs(MANIFESTS))
    bundle = await t.publish()
    tracker = await dialer_main.tracker_for(nc)
    simulated = SimulatedProvider(tracker)
    lease, dialers = 0.5, await bus.dialers_bucket(js)
    observer = Liveness(js, dialers, f"observer-{uuid.uuid4().hex[:6]}", lease)
    takeover = Takeover(observer, tracker, lambda call: simulated, {"simulated": simulated})
    await observer.beat()  # as a dialer does before its first look
    await observer.look()
    newcomer = Liveness(js, dialers, f"newcomer-{uuid.uuid4().hex[:6]}", lease)
    await newcomer.beat()  # after the observer looked: unknown to it until it looks again
    async with ingest_client(nats_server.url) as (client, svc):
        await wait_for_bundle(svc, t.name, bundle.version)
        call_id = await queue_call(client, t)  # no dialer runs here: the newcomer claims it
    request = await calls.fetch(js, t.name, call_id)
    assert request is not None
    await tracker.store.change(t.name, call_id, lambda s: CallState.new(request).model_copy(update={
        "status": "ringing", "dialer": newcomer.name, "provider": "simulated", "provider_call_id": "SIMx"}))
    assert await takeover.walk()
    assert (await tracker.store.get(t.name, call_id)).status == "ringing"  # type: ignore[union-attr]
    deadline = asyncio.get_running_loop().time() + SETTLED
    while newcomer.name not in await takeover.gone():  # it beats no more
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(lease / 3)
    assert await takeover.walk()
    state = await tracker.store.get(t.name, call_id)
    assert state is not None and state.status == "failed" and state.dialer == observer.name
    assert state.error is not None and state.error.code == "provider_lost"
    await dialers.delete(newcomer.name)


async def test_a_call_placed_but_not_recorded_by_a_gone_dialer_is_found_at_twilio(nats_server, nc, js, twilio_mock) -> None:  # type: ignore[no-untyped-def]
    """The dialer died between calls.create and recording the sid: the takeover finds the call at
    Twilio and records it, instead of leaving the claim to the message's redelivery."""
    from datetime import timedelta

    from agentstudio.callstate import now
    from agentstudio.dialer import main as dialer_main
    from agentstudio.dialer.providers import TwilioProvider
    from agentstudio.dialer.takeover import Liveness, Takeover
    from agentstudio.twilio_api import twilio_client
    from test_dialer_twilio import FROM, PUBLIC

    t = Tenant(f"t-{uuid.uuid4().hex[:10]}", js, docs(MANIFESTS))
    bundle = await t.publish()
    tracker = await dialer_main.tracker_for(nc)
    twilio = TwilioProvider(twilio_client(twilio_mock.account_sid, twilio_mock.auth_token, twilio_mock.base_url),
                            FROM, PUBLIC, ring_timeout_seconds=30)
    observer = Liveness(js, await bus.dialers_bucket(js), f"observer-{uuid.uuid4().hex[:6]}", 0.5)
    takeover = Takeover(observer, tracker, lambda call: twilio, {"twilio": twilio})
    async with ingest_client(nats_server.url) as (client, svc):
        await wait_for_bundle(svc, t.name, bundle.version)
        call_id = await queue_call(client, t, key="live", phone_number="+1415555" + str(uuid.uuid4().int)[:4])
    request = await calls.fetch(js, t.name, call_id)
    assert request is not None
    claimed = CallState.new(request).model_copy(update={  # a dialer that heartbeats no more (its name is gone)
        "status": "dialing", "dialer": f"gone-{uuid.uuid4().hex[:6]}", "claimed_at": now() - timedelta(seconds=1)})
    await tracker.store.change(t.name, call_id, lambda s: claimed)
    sid = await twilio.place(request)  # and then it died
    assert await takeover.walk()
    state = await tracker.store.get(t.name, call_id)
    assert state is not None and (state.provider, state.provider_call_id, state.dialer) == ("twilio", sid, observer.name)


async def test_a_bucket_out_of_reach_for_longer_than_a_lease_makes_no_dialer_gone(tmp_path: Path) -> None:
    """While `as-dialers` cannot be written (its server down, as while a cluster elects the bucket's
    leader) nobody's beats land. Back, a live dialer whose next beat has not come yet is not gone;
    once it stops beating for a lease of written time, it is."""
    from agentstudio.dialer.takeover import Liveness

    lease = 0.6
    with NatsServer(tmp_path / "nats") as server:
        nc = await bus.connect(server.url, "test-liveness")
        try:
            js = nc.jetstream(timeout=1)
            dialers = await bus.dialers_bucket(js)
            observer = Liveness(js, dialers, "observer", lease)
            other = Liveness(js, dialers, "other", lease)
            await observer.beat()
            await other.beat()
            assert await observer.look() == set()
            server.stop(kill=True)
            await asyncio.sleep(lease / 3)
            with pytest.raises(Exception):  # noqa: B017 - whichever error the client gives while the server is away
                await observer.beat()
            await asyncio.sleep(3 * lease)
            server.start()
            deadline = asyncio.get_running_loop().time() + SETTLED
            while True:  # the observer's first beat since it is back (the client reconnects by itself)
                try:
                    await observer.beat()
                    break
                except Exception:  # noqa: BLE001
                    assert asyncio.get_running_loop().time() < deadline, "the observer never beat again"
                    await asyncio.sleep(0.1)
            assert await observer.look() == set(), "a dialer was made gone by the outage alone"
            while "other" not in await observer.look():  # it beats no more: gone a lease later
                assert asyncio.get_running_loop().time() < deadline
                await observer.beat()
                await asyncio.sleep(lease / 3)
        finally:
            await nc.close()


async def test_a_call_placed_by_a_live_dialer_but_not_recorded_is_not_placed_again_by_another(tmp_path: Path) -> None:
    """A dialer placed a simulated call but could not record its id (NATS electing a leader), so the
    dispatch came back, and to another dialer. Only the claimant's simulated provider knows the call
    went out: the other must leave it to the claimant (or to the takeover, if it is gone), not dial
    it again, as a three-node test under load once saw (one call placed twice)."""
    from agentstudio.dialer import main as dialer_main
    from agentstudio.dialer.takeover import Liveness
    from agentstudio.settings import Settings
    from test_dialer import CountingSimulator

    class Unheard(CountingSimulator):
        """A callee whose progress reports are lost too (NATS still away): the call stays dialing."""

        async def _play(self, call, sid, voicemail):  # type: ignore[no-untyped-def]
            await asyncio.sleep(3600)

    with NatsServer(tmp_path / "nats") as server:
        conns = [await bus.connect(server.url, f"test-dialer-{i}") for i in range(2)]
        stop = asyncio.Event()
        running: list[asyncio.Task[None]] = []
        try:
            js = conns[0].jetstream()
            await bus.ensure_calls_stream(js)
            t = Tenant(f"t-{uuid.uuid4().hex[:10]}", js, docs(MANIFESTS))
            bundle = await t.publish()
            async with ingest_client(server.url) as (client, svc):
                await wait_for_bundle(svc, t.name, bundle.version)
                call_id = await queue_call(client, t)
            conf = Settings(nats_url=server.url, cap_retry_seconds=0.1)
            a, b = [await dialer_main.build(nc, conf, simulated_factory=lambda tracker: Unheard(tracker))
                    for nc in conns]
            request = await calls.fetch(js, t.name, call_id)
            assert request is not None
            await a.store.change(t.name, call_id, lambda s: CallState.new(request) if s is None else None)
            claimed, _ = await a._claim(request, False)  # noqa: SLF001 - a's claim, as its dispatch made it
            assert claimed is not None
            await a.simulated.place(request)  # placed; then recording the id failed and the message came back
            alive = Liveness(js, await bus.dialers_bucket(js), a.name, conf.dialer_lease_seconds)
            await alive.beat()
            running.append(asyncio.create_task(a._heartbeat(alive)))  # noqa: SLF001 - a is alive, not yet taking work
            running.append(asyncio.create_task(b.run(stop)))
            await asyncio.sleep(3)  # b takes the redelivered dispatch again and again meanwhile
            assert b.simulated.placed == [], "placed again by a dialer that could not know it went out"
            running.append(asyncio.create_task(a.run(stop)))
            store = a.store
            async with asyncio.timeout(SETTLED):  # the claimant finds its own call and records it
                while (state := await store.get(t.name, call_id)) is None or not state.provider_call_id:
                    await asyncio.sleep(0.1)
            assert (a.simulated.placed, b.simulated.placed) == ([call_id], [])
        finally:
            stop.set()
            for task in running:
                task.cancel()  # a's heartbeat; the runs have stopped by then
            await asyncio.gather(*running, return_exceptions=True)
            for nc in conns:
                await nc.close()


async def test_a_walk_settles_every_claim_of_a_gone_dialer_among_more_records_than_a_listing_holds(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A week of calls is more records than the server lists subjects of in one answer (100,000): the
    walk reads every record, so no claim of a gone dialer is left unsettled (and then held for good)."""
    import orjson

    from agentstudio.dialer import main as dialer_main
    from agentstudio.dialer.providers import SimulatedProvider
    from agentstudio.dialer.takeover import Liveness, Takeover

    ended = orjson.dumps({"call_id": "x", "tenant": "t", "status": "completed", "dialer": "d-old"})
    with NatsServer(tmp_path / "nats") as server:
        nc = await bus.connect(server.url, "test")
        try:
            js = nc.jetstream()
            await bus.ensure_calls_stream(js)
            await bus.ensure_events_stream(js)
            tracker = await dialer_main.tracker_for(nc)
            subject = f"$KV.{bus.CALLS_BUCKET}.t."
            sent = asyncio.Semaphore(512)

            async def put(key: str, value: bytes) -> None:
                async with sent:
                    await js.publish(subject + key, value)

            await asyncio.gather(*(put(f"done-{i:06d}", ended) for i in range(150_000)))
            claims = [f"live-{i:02d}" for i in range(30)]
            await asyncio.gather(*(put(c, orjson.dumps({
                "call_id": c, "tenant": "t", "status": "in_progress", "dialer": "d-gone", "provider": "simulated",
                "provider_call_id": f"SIM{c}"})) for c in claims))
            simulated = SimulatedProvider(tracker)
            observer = Liveness(js, await bus.dialers_bucket(js), "observer", 0.5)
            await observer.beat()
            takeover = Takeover(observer, tracker, lambda call: simulated, {"simulated": simulated})
            assert await takeover.walk()
            states = [await tracker.store.get("t", c) for c in claims]
            assert all(s is not None and s.status == "failed" and s.error and s.error.code == "provider_lost"
                       for s in states), [s.status for s in states if s]
        finally:
            await nc.close()


async def test_a_record_written_during_the_pass_counts_as_last_written(nats_server, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A pass also reads what is written while it runs, so a record can come twice, live and then
    ended: the walk and the sweep must act on the last, not settle a call that has just ended."""
    import orjson

    from agentstudio.callstate import unfinished

    nc = await bus.connect(nats_server.url, "test")
    try:
        js = nc.jetstream()
        await bus.calls_bucket(js)
        tenant = f"t-{uuid.uuid4().hex[:10]}"
        live = {"tenant": tenant, "status": "in_progress", "dialer": "d-1"}
        subject = f"$KV.{bus.CALLS_BUCKET}.{tenant}."
        for name in ("ends", "stays"):
            await js.publish(subject + name, orjson.dumps({**live, "call_id": name}))
        passed = []
        async with contextlib.aclosing(bus.kv_values(js, bus.CALLS_BUCKET, batch=1)) as records:
            async for key, value in records:
                passed.append((key, orjson.loads(value)["status"]))
                if key == f"{tenant}.ends" and len([k for k, _ in passed if k == key]) == 1:
                    await js.publish(subject + "ends", orjson.dumps({**live, "call_id": "ends", "status": "completed"}))
        mine = [(k, s) for k, s in passed if k.startswith(tenant)]
        assert mine == [(f"{tenant}.ends", "in_progress"), (f"{tenant}.stays", "in_progress"),
                        (f"{tenant}.ends", "completed")], mine
        # The same during the walk's own read: "ends" comes live, ends, and comes again.
        for name in ("ends", "stays"):
            await js.publish(subject + name, orjson.dumps({**live, "call_id": name}))
        real, written = bus.kv_values, []

        async def ending_mid_pass(js_, bucket, batch=512):  # type: ignore[no-untyped-def]
            async with contextlib.aclosing(real(js_, bucket, batch=1)) as records:
                async for key, value in records:
                    yield key, value
                    if key == f"{tenant}.ends" and not written:
                        written.append(key)
                        await js.publish(subject + "ends", orjson.dumps({**live, "call_id": "ends", "status": "completed"}))

        monkeypatch.setattr(bus, "kv_values", ending_mid_pass)
        assert {s.call_id for s in await unfinished(js) if s.tenant == tenant} == {"stays"}
        assert written
    finally:
        await nc.close()
