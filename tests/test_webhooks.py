"""Call status webhooks delivered to real local receivers that verify Standard Webhooks signatures
with the `standardwebhooks` package, as a tenant's endpoint would."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
from fastapi import FastAPI, Request, Response
from nats.js import JetStreamContext
from standardwebhooks import Webhook

from agentstudio import bus, signing
from agentstudio.dialer import main as dialer_main
from agentstudio.secrets import StaticSecrets
from agentstudio.natsserver import NatsServer, free_port
from agentstudio.settings import Settings
from conftest import Tenant, docs, ingest_client, wait_for_bundle
from test_dialer import MANIFESTS, dialers, queue_call


@dataclass
class Receiver:
    """The seed's result receiver: verifies the signature, reads data.user_id and duration_seconds."""

    secret: str
    mode: str = "up"  # up | down | slow | gone
    fail_first: int = 0
    received: list[dict[str, Any]] = field(default_factory=list)
    attempts: list[str] = field(default_factory=list)  # webhook-id of every attempt
    headers: list[dict[str, str]] = field(default_factory=list)  # of every verified attempt
    port: int = field(default_factory=free_port)
    before_answer: Callable[[], None] | None = None  # runs as each verified attempt is answered
    stall_first: asyncio.Event | None = None  # the first attempt is answered once this is set

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/webhooks/call-results"

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/webhooks/call-results")
        async def handle(request: Request) -> Response:
            body = await request.body()
            event = Webhook(self.secret).verify(body, dict(request.headers))  # raises on a bad signature
            self.attempts.append(request.headers["webhook-id"])
            self.headers.append(dict(request.headers))
            if self.before_answer is not None:
                self.before_answer()
            if self.stall_first is not None and len(self.attempts) == 1:
                await asyncio.wait_for(self.stall_first.wait(), timeout=30)
            if self.mode == "slow":
                await asyncio.sleep(4)
            if self.mode == "gone":
                return Response(status_code=410)
            if self.mode == "down" or len(self.attempts) <= self.fail_first:
                return Response(status_code=503)
            data = event["data"]
            self.received.append({"type": event["type"], "id": event["id"], "user_id": data["user_id"],
                                  "duration_seconds": data["duration_seconds"], "event": event})
            return Response(status_code=204)

        return app


@asynccontextmanager
async def serving(*receivers: Receiver) -> AsyncIterator[None]:
    servers = [uvicorn.Server(uvicorn.Config(r.app(), host="127.0.0.1", port=r.port, log_config=None,
                                             access_log=False)) for r in receivers]
    tasks = [asyncio.create_task(s.serve()) for s in servers]
    while not all(s.started for s in servers):
        await asyncio.sleep(0.02)
    try:
        yield
    finally:
        for s in servers:
            s.should_exit = True
        await asyncio.gather(*tasks, return_exceptions=True)


OPS_KEY = """
---
apiVersion: agentstudio.io/v1alpha1
kind: ApiKey
metadata: {name: ops}
spec: {scopes: ["webhooks:manage"]}
"""


def subscription(name: str, url: str, events: str = '["call.*"]') -> str:
    return f"""
---
apiVersion: agentstudio.io/v1alpha1
kind: WebhookSubscription
metadata: {{name: {name}}}
spec: {{url: "{url}", events: {events}}}
"""


@asynccontextmanager
async def stack(nats_server: NatsServer, js: JetStreamContext, receivers: dict[str, Receiver],
                schedule: str = "0,0.2,0.2", extra: str = "",
                dialing: bool = True, timeout: float = 2) -> AsyncIterator[tuple[httpx.AsyncClient, Tenant]]:
    t = Tenant(f"t-{uuid.uuid4().hex[:10]}", js,
               docs(MANIFESTS + OPS_KEY + "".join(subscription(n, r.url) for n, r in receivers.items()) + extra))
    bundle = await t.publish()
    secrets = StaticSecrets({(t.name, f"{n}-webhook-secret", "secret"): r.secret for n, r in receivers.items()})
    settings = Settings(nats_url=nats_server.url, webhook_retry_schedule=schedule, webhook_timeout_seconds=timeout)
    nc = await bus.connect(nats_server.url, "test-webhooks")
    dispatcher, watcher = await dialer_main.webhooks(nc, settings, secrets)
    stop = asyncio.Event()
    running = asyncio.create_task(dispatcher.run(stop))
    try:
        async with ingest_client(nats_server.url) as (client, svc), dialers(nats_server.url, count=int(dialing)):
            await wait_for_bundle(svc, t.name, bundle.version)
            yield client, t
    finally:
        stop.set()
        await running
        await watcher.stop()
        await nc.close()


async def until(check, timeout: float = 15) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "not in time"
        await asyncio.sleep(0.05)


async def test_completed_call_is_delivered_signed_with_what_the_seed_reads(nats_server, js) -> None:  # type: ignore[no-untyped-def]
    receiver = Receiver(signing.new_secret())
    async with serving(receiver), stack(nats_server, js, {"results": receiver}) as (client, t):
        call_id = await queue_call(client, t, campaign_id="trial_recovery_v2", simulate_duration_seconds=1)
        await until(lambda: len(receiver.received) == 2)
    answered, completed = sorted(receiver.received, key=lambda r: r["type"])
    assert (answered["type"], completed["type"]) == ("call.answered", "call.completed")
    assert completed["user_id"] == "u-1" and completed["duration_seconds"] == 1
    data = completed["event"]["data"]
    assert data["call_id"] == call_id and data["status"] == "completed" and data["agent_slug"] == "a"
    assert data["metadata"]["campaign_id"] == "trial_recovery_v2" and data["test"] is True
    assert data["transcript"] == [] and data["captured"] == {} and "error" not in data


async def test_a_receiver_that_is_down_gets_every_event_after_retries_with_the_same_id(nats_server, js) -> None:  # type: ignore[no-untyped-def]
    receiver = Receiver(signing.new_secret(), fail_first=4)
    async with serving(receiver), stack(nats_server, js, {"results": receiver}) as (client, t):
        for _ in range(2):
            await queue_call(client, t, simulate_duration_seconds=0.1)
        await until(lambda: len(receiver.received) == 4, timeout=20)
    assert len({r["id"] for r in receiver.received}) == 4  # nothing lost, nothing twice
    retried = [i for i in set(receiver.attempts) if receiver.attempts.count(i) > 1]
    assert retried  # the retries carried the same webhook-id


async def test_a_slow_receiver_never_delays_another_subscription(nats_server, js) -> None:  # type: ignore[no-untyped-def]
    slow, fast = Receiver(signing.new_secret(), mode="slow"), Receiver(signing.new_secret())
    async with serving(slow, fast), stack(nats_server, js, {"slow": slow, "fast": fast}) as (client, t):
        for _ in range(6):
            await queue_call(client, t, simulate_duration_seconds=0.1)
        await until(lambda: len(fast.received) == 12, timeout=10)
        # The order says it, not a stopwatch: the fast one has everything while the slow one is
        # still working through its own queue.
        assert len(slow.received) < 12


@asynccontextmanager
async def hanging() -> AsyncIterator[tuple[int, list[asyncio.StreamWriter]]]:
    """A receiver that accepts connections and never answers; closes them all as it stops, so the
    posts still waiting fail at once instead of at their timeout."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        while await reader.read(65536):
            pass

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], held
    finally:
        for writer in held:
            writer.close()
        server.close()


async def test_many_hanging_receivers_never_delay_another_subscription(nats_server, js) -> None:  # type: ignore[no-untyped-def]
    """30 subscriptions whose receivers never answer hold 4 posts each (120 connections): more
    than a shared client's pool of 100, which made the healthy one's posts wait for theirs."""
    healthy = Receiver(signing.new_secret())
    async with hanging() as (port, held), serving(healthy):
        hung = {f"hung{i}": Receiver(signing.new_secret(), port=port) for i in range(30)}
        async with stack(nats_server, js, {"healthy": healthy, **hung}, timeout=60) as (client, t):
            for _ in range(2):  # 4 events each: every hanging subscription's 4 slots taken
                await queue_call(client, t, simulate_duration_seconds=0.1)
            await until(lambda: len(held) >= 100, timeout=30)
            await queue_call(client, t, simulate_duration_seconds=0.1)
            await until(lambda: len(healthy.received) == 6, timeout=20)


async def test_one_slow_post_never_holds_the_next_deliveries_of_its_subscription(nats_server, js) -> None:  # type: ignore[no-untyped-def]
    stalled = asyncio.Event()
    receiver = Receiver(signing.new_secret(), stall_first=stalled)
    async with serving(receiver), stack(nats_server, js, {"results": receiver}, timeout=30) as (client, t):
        for _ in range(3):
            await queue_call(client, t, simulate_duration_seconds=0.1)
        try:
            # Every other event arrives while the first post still waits for its answer: the loop
            # keeps its posts in flight and refills each slot as it frees, not batch by batch.
            await until(lambda: len(receiver.received) == 5, timeout=10)
            assert len(receiver.attempts) == 6
        finally:
            stalled.set()  # else the receiver's shutdown waits for the stalled answer
        await until(lambda: len(receiver.received) == 6)
    assert len({r["id"] for r in receiver.received}) == 6


async def test_410_gone_disables_the_subscription(nats_server, js) -> None:  # type: ignore[no-untyped-def]
    receiver = Receiver(signing.new_secret(), mode="gone")
    async with serving(receiver), stack(nats_server, js, {"results": receiver}) as (client, t):
        await queue_call(client, t, simulate_duration_seconds=0.1)
        await until(lambda: len(receiver.attempts) >= 1)
        _, disabled = await bus.ensure_webhooks(js)
        entry = await disabled.get(f"{t.name}.results")
        assert b"410" in entry.value
        await queue_call(client, t, simulate_duration_seconds=0.1)
        await asyncio.sleep(2)
    assert len(receiver.attempts) <= 2  # at most the batch in flight when 410 came; then nothing


async def test_exhausted_deliveries_are_dead_lettered(nats_server, js) -> None:  # type: ignore[no-untyped-def]
    receiver = Receiver(signing.new_secret(), mode="down")
    async with serving(receiver), stack(nats_server, js, {"results": receiver}, schedule="0,0.1") as (client, t):
        call_id = await queue_call(client, t, simulate_outcome="busy")
        dead, _ = await bus.ensure_webhooks(js)

        async def dead_letters() -> list[dict[str, Any]]:
            keys = await bus.kv_keys(js, bus.DEAD_LETTER_BUCKET, f"{t.name}.")
            return [orjson.loads((await dead.get(k)).value) for k in keys]

        for _ in range(100):
            found = await dead_letters()
            if found:
                break
            await asyncio.sleep(0.1)
        [record] = found
        assert record["event"]["data"]["call_id"] == call_id and record["event"]["type"] == "call.busy"
        assert record["attempts"] == 3 and record["last_error"] == "HTTP 503"
        assert len(receiver.attempts) == 3 and len(set(receiver.attempts)) == 1

        # The API lists it and replays it once the receiver is back.
        assert (await client.get("/api/v1/webhooks/dead-letters", headers=t.auth("test"))).status_code == 403
        listed = (await client.get("/api/v1/webhooks/dead-letters", headers=t.auth("ops"))).json()["data"]
        assert [(d["subscription"], d["call_id"], d["attempts"]) for d in listed] == [("results", call_id, 3)]
        receiver.mode = "up"
        event_id = listed[0]["event_id"]
        resp = await client.post(f"/api/v1/webhooks/dead-letters/results/{event_id}/replay", headers=t.auth("ops"))
        assert resp.status_code == 202
        await until(lambda: len(receiver.received) == 1)
        assert receiver.received[0]["id"] == event_id  # the same webhook-id as the failed attempts
        assert (await client.get("/api/v1/webhooks/dead-letters", headers=t.auth("ops"))).json()["data"] == []
        missing = await client.post(f"/api/v1/webhooks/dead-letters/results/{event_id}/replay", headers=t.auth("ops"))
        assert missing.status_code == 404


async def dead_letters(js: JetStreamContext, tenant: str) -> list[dict[str, Any]]:
    dead, _ = await bus.ensure_webhooks(js)
    keys = await bus.kv_keys(js, bus.DEAD_LETTER_BUCKET, f"{tenant}.")
    return [orjson.loads((await dead.get(k)).value) for k in keys]


async def test_a_receiver_nobody_answers_is_dead_lettered_with_the_failure_in_words(nats_server, js) -> None:  # type: ignore[no-untyped-def]
    receiver = Receiver(signing.new_secret())  # not served: nothing listens on its port
    async with stack(nats_server, js, {"results": receiver}, schedule="0,0.1") as (client, t):
        await queue_call(client, t, simulate_outcome="busy")
        for _ in range(100):
            if found := await dead_letters(js, t.name):
                break
            await asyncio.sleep(0.1)
    [record] = found
    # What we know (the host, the kind of failure), not the HTTP client's text.
    assert record["last_error"] == "could not connect to 127.0.0.1"


async def test_a_reserved_example_domain_is_said_once_at_load_and_sends_nothing(
    nats_server: NatsServer, js: JetStreamContext, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agentstudio.webhooks")
    receiver = Receiver(signing.new_secret())
    placeholder = subscription("placeholder", "https://example.com/webhooks/call-results")
    async with serving(receiver), stack(nats_server, js, {"results": receiver}, extra=placeholder) as (client, t):
        for _ in range(2):
            await queue_call(client, t, simulate_duration_seconds=0.1)
        await until(lambda: len(receiver.received) == 4)
        await asyncio.sleep(1)  # the placeholder's turn, were anything filed for it
        dead = await dead_letters(js, t.name)
    said = [(r.levelname, r.getMessage()) for r in caplog.records
            if getattr(r, "tenant", None) == t.name and getattr(r, "subscription", None) == "placeholder"]
    assert said == [("WARNING", "webhook subscription sends nothing: its URL is a reserved example domain")]
    assert dead == []


async def delivery_records(js: JetStreamContext, tenant: str, call_id: str) -> list[dict[str, Any]]:
    kv = await bus.deliveries_bucket(js)
    keys = await bus.kv_keys(js, bus.DELIVERIES_BUCKET, f"{tenant}.{call_id}.")
    return [orjson.loads((await kv.get(k)).value) for k in keys]


async def test_each_delivery_of_a_call_is_recorded_with_its_state_and_attempts(nats_server, js) -> None:  # type: ignore[no-untyped-def]
    receiver = Receiver(signing.new_secret(), mode="down")
    async with serving(receiver), stack(nats_server, js, {"results": receiver}, schedule="0,0.1") as (client, t):
        call_id = await queue_call(client, t, simulate_outcome="busy")
        for _ in range(100):
            records = await delivery_records(js, t.name, call_id)
            if records and records[0]["state"] == "dead_lettered":
                break
            await asyncio.sleep(0.1)
        [record] = records
        assert (record["subscription"], record["event_type"], record["state"], record["attempts"],
                record["last_error"]) == ("results", "call.busy", "dead_lettered", 3, "HTTP 503")

        # Replayed to a receiver that is back: the same record says delivered.
        receiver.mode = "up"
        resp = await client.post(f"/api/v1/webhooks/dead-letters/results/{record['event_id']}/replay",
                                 headers=t.auth("ops"))
        assert resp.status_code == 202
        await until(lambda: len(receiver.received) == 1)
        for _ in range(100):
            [record] = await delivery_records(js, t.name, call_id)
            if record["state"] == "delivered":
                break
            await asyncio.sleep(0.1)
        assert (record["state"], record["last_error"]) == ("delivered", None)


async def test_a_backlog_is_fetched_several_deliveries_at_a_time(nats_server, js) -> None:  # type: ignore[no-untyped-def]
    """60 events queued before the dispatcher starts reach the receiver with a fetch per 4 or more
    of them, not one per freed slot (each fetch a NATS round trip)."""
    receiver = Receiver(signing.new_secret())
    t = Tenant(f"t-{uuid.uuid4().hex[:10]}", js, docs(MANIFESTS + subscription("r", receiver.url)))
    await t.publish()
    await bus.ensure_events_stream(js)
    for _ in range(60):
        event = {"type": "call.completed", "id": f"evt_{uuid.uuid4().hex}", "created_at": "now",
                 "data": {"call_id": str(uuid.uuid4()), "test": True, "metadata": {}, "agent_slug": "a",
                          "user_id": "u-1", "duration_seconds": 0}}
        await js.publish(bus.event_subject(t.name, event["data"]["call_id"]), orjson.dumps(event),
                         headers={"Nats-Msg-Id": event["id"]})
    nc = await bus.connect(nats_server.url, "test-webhook-fetches")
    fetches = 0
    publish = nc.publish

    async def counted(subject: str, *args: Any, **kwargs: Any) -> None:
        nonlocal fetches
        fetches += subject == f"$JS.API.CONSUMER.MSG.NEXT.{bus.WEBHOOKS_STREAM}.wh-{t.name}-r"
        await publish(subject, *args, **kwargs)

    nc.publish = counted  # type: ignore[method-assign]
    secrets = StaticSecrets({(t.name, "r-webhook-secret", "secret"): receiver.secret})
    dispatcher, watcher = await dialer_main.webhooks(nc, Settings(nats_url=nats_server.url), secrets)
    stop = asyncio.Event()
    async with serving(receiver):
        running = asyncio.create_task(dispatcher.run(stop))
        try:
            await until(lambda: len(receiver.received) == 60, timeout=30)
            used = fetches
        finally:
            stop.set()
            await running
            await watcher.stop()
            await nc.close()
    assert len({r["id"] for r in receiver.received}) == 60
    assert used <= 60 / dispatcher.per_subscription + 5, f"{used} fetches for 60 deliveries"
