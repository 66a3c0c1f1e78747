"""Working through many dead letters: the list a page at a time, oldest first, and a subscription's
replayed in bulk, against the real dispatcher dead-lettering deliveries to real local receivers."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from datetime import datetime, timezone
from typing import Any

import httpx
import orjson
from nats.js import JetStreamContext

from agentstudio import bus, signing
from agentstudio.natsserver import NatsServer
from conftest import Tenant
from test_calls_api import assert_error
from test_webhooks import Receiver, serving, stack, until

LETTERS = "/api/v1/webhooks/dead-letters"
EACH = 12  # events, each dead-lettered for both subscriptions


async def queue_event(js: JetStreamContext, t: Tenant, event_type: str = "call.completed") -> str:
    """An event of the tenant's queued as a dialer queues it; its id."""
    await bus.ensure_events_stream(js)
    event = {"type": event_type, "id": f"evt_{uuid.uuid4().hex}", "created_at": "now",
             "data": {"call_id": str(uuid.uuid4()), "test": True, "metadata": {}, "agent_slug": "a",
                      "user_id": "u-1", "duration_seconds": 0}}
    await js.publish(bus.event_subject(t.name, event["data"]["call_id"]), orjson.dumps(event),
                     headers={"Nats-Msg-Id": event["id"]})
    return event["id"]


async def until_dead_letters(js: JetStreamContext, t: Tenant, count: int) -> None:
    for _ in range(300):
        if len(await bus.kv_keys(js, bus.DEAD_LETTER_BUCKET, f"{t.name}.")) >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"fewer than {count} dead letters in time")


async def dead_lettered(js: JetStreamContext, t: Tenant, count: int) -> list[str]:
    """`count` events, once both down receivers' deliveries of them are dead letters."""
    ids = [await queue_event(js, t) for _ in range(count)]
    await until_dead_letters(js, t, 2 * count)
    return ids


async def revisions(js: JetStreamContext, t: Tenant) -> dict[tuple[str, str], int]:
    """(subscription, event id) → the revision of its dead letter, read key by key."""
    dead, _ = await bus.ensure_webhooks(js)
    found = {}
    for key in await bus.kv_keys(js, bus.DEAD_LETTER_BUCKET, f"{t.name}."):
        entry = await dead.get(key)
        if entry.value:
            _, subscription, event_id = key.split(".")
            found[subscription, event_id] = entry.revision
    return found


async def walk(client: httpx.AsyncClient, t: Tenant, **params: Any) -> list[list[dict[str, Any]]]:
    pages, cursor = [], None
    while True:
        resp = await client.get(LETTERS, params={**params, **({"cursor": cursor} if cursor else {})},
                                headers=t.auth("ops"))
        assert resp.status_code == 200, resp.text
        body = resp.json()
        pages.append(body["data"])
        if (cursor := body["next_cursor"]) is None:
            return pages


async def test_pages_walk_every_dead_letter_once_oldest_first(nats_server: NatsServer, js: JetStreamContext) -> None:
    results, other = Receiver(signing.new_secret(), mode="down"), Receiver(signing.new_secret(), mode="down")
    async with serving(results, other), stack(nats_server, js, {"results": results, "other": other},
                                              schedule="0", dialing=False) as (client, t):
        ids = await dead_lettered(js, t, EACH)
        written = await revisions(js, t)
        assert len(written) == 2 * EACH

        pages = await walk(client, t, limit=5)
        assert [len(p) for p in pages] == [5, 5, 5, 5, 4]
        listed = [(d["subscription"], d["event_id"]) for p in pages for d in p]
        assert listed == sorted(written, key=written.__getitem__)  # each once, in the order dead-lettered
        first = pages[0][0]
        assert (first["event_type"], first["attempts"], first["last_error"]) == ("call.completed", 2, "HTTP 503")
        assert first["event"]["id"] == first["event_id"]

        # One subscription's, in the same order; the default page holds them all.
        only = await walk(client, t, subscription="results")
        assert [d["event_id"] for d in only[0]] == [e for s, e in listed if s == "results"]
        assert len(only) == 1 and sorted(d["event_id"] for d in only[0]) == sorted(ids)
        assert (await walk(client, t, subscription="nobody")) == [[]]

        # A page exactly full says there is no next one.
        exact = await walk(client, t, subscription="other", limit=EACH)
        assert [len(p) for p in exact] == [EACH]

        # One removed with a delete marker, as earlier versions' replays left them: not listed, and
        # the pages still hold all the others.
        dead, _ = await bus.ensure_webhooks(js)
        gone = listed[7]
        await dead.delete(bus.dead_letter_key(t.name, *gone))
        pages = await walk(client, t, limit=5)
        assert [(d["subscription"], d["event_id"]) for p in pages for d in p] == [k for k in listed if k != gone]


async def test_bulk_replay_delivers_each_once_with_its_webhook_id_and_a_retry_none_twice(
    nats_server: NatsServer, js: JetStreamContext
) -> None:
    results, other = Receiver(signing.new_secret(), mode="down"), Receiver(signing.new_secret(), mode="down")
    async with serving(results, other), stack(nats_server, js, {"results": results, "other": other},
                                              schedule="0", dialing=False) as (client, t):
        ids = await dead_lettered(js, t, EACH)
        written = await revisions(js, t)
        failed_with = set(results.attempts)
        results.mode = "up"

        # A bulk replay cut off after queuing three but before taking them off the list: they were
        # published as the replay publishes them, and are still listed.
        interrupted = sorted((e for s, e in written if s == "results"), key=lambda e: written["results", e])[:3]
        letters = {d["event_id"]: d for p in await walk(client, t, subscription="results") for d in p}
        for event_id in interrupted:
            await js.publish(bus.delivery_subject(t.name, "results"), orjson.dumps(letters[event_id]["event"]),
                             stream=bus.WEBHOOKS_STREAM,
                             headers={"Nats-Msg-Id": f"{event_id}.results.replay.{written['results', event_id]}"})

        answers = []
        while not answers or answers[-1]["more"]:
            resp = await client.post(f"{LETTERS}/replay", json={"subscription": "results", "limit": 5},
                                     headers=t.auth("ops"))
            assert resp.status_code == 202, resp.text
            answers.append(resp.json())
        assert answers == [{"queued": 5, "more": True}, {"queued": 5, "more": True}, {"queued": 2, "more": False}]
        await until(lambda: len(results.received) >= EACH)
        again = await client.post(f"{LETTERS}/replay", json={"subscription": "results"}, headers=t.auth("ops"))
        assert again.status_code == 202 and again.json() == {"queued": 0, "more": False}
        await asyncio.sleep(1)  # any second delivery would come by now

        assert Counter(r["id"] for r in results.received) == Counter(ids)  # each once
        assert {r["id"] for r in results.received} <= failed_with  # the webhook-id of the failed attempts
        assert await walk(client, t, subscription="results") == [[]]
        assert len((await walk(client, t, subscription="other", limit=500))[0]) == EACH  # untouched
        assert other.received == []


async def test_bulk_replay_narrowed_by_event_type_and_time(nats_server: NatsServer, js: JetStreamContext) -> None:
    results = Receiver(signing.new_secret(), mode="down")
    async with serving(results), stack(nats_server, js, {"results": results}, schedule="0",
                                       dialing=False) as (client, t):
        queued = []
        for n, event_type in enumerate(["call.busy", "call.completed", "call.busy", "call.busy", "call.completed"]):
            queued.append((event_type, await queue_event(js, t, event_type)))
            await until_dead_letters(js, t, n + 1)  # one at a time: dead-lettered in the order queued
        busy = [e for kind, e in queued if kind == "call.busy"]
        completed = [e for kind, e in queued if kind == "call.completed"]
        results.mode = "up"
        [listed] = await walk(client, t)
        assert [d["event_id"] for d in listed] == [e for _, e in queued]
        # Before the last one failed (between the last two): the first completed one only.
        cut = datetime.fromtimestamp((listed[-2]["failed_at"] + listed[-1]["failed_at"]) / 2, timezone.utc).isoformat()

        resp = await client.post(f"{LETTERS}/replay", headers=t.auth("ops"),
                                 json={"subscription": "results", "event_type": "call.completed", "failed_before": cut})
        assert resp.json() == {"queued": 1, "more": False}
        resp = await client.post(f"{LETTERS}/replay", headers=t.auth("ops"),
                                 json={"subscription": "results", "event_type": "call.busy"})
        assert resp.json() == {"queued": 3, "more": False}
        await until(lambda: len(results.received) == 4)
        assert sorted(r["id"] for r in results.received) == sorted([*busy, completed[0]])
        assert [d["event_id"] for d in (await walk(client, t))[0]] == [completed[1]]


async def test_dead_letters_need_webhooks_manage_and_say_which_parameter_is_wrong(
    nats_server: NatsServer, js: JetStreamContext
) -> None:
    results = Receiver(signing.new_secret(), mode="down")
    async with stack(nats_server, js, {"results": results}, dialing=False) as (client, t):
        assert_error(await client.get(LETTERS), 401, "Authorization")
        assert_error(await client.post(f"{LETTERS}/replay", json={"subscription": "results"}), 401, "Authorization")
        assert_error(await client.get(LETTERS, headers=t.auth("test")), 403, "Authorization")
        assert_error(await client.post(f"{LETTERS}/replay", json={"subscription": "results"}, headers=t.auth("test")),
                     403, "Authorization")
        for params, field in [({"limit": 0}, "limit"), ({"limit": 501}, "limit"), ({"cursor": "nope"}, "cursor"),
                              ({"cursor": "eyJiZWxvdyI6IDN9"}, "cursor"),  # a calls listing's cursor
                              ({"subscription": "a.b"}, "subscription"), ({"subscription": "*"}, "subscription"),
                              ({"subscriptoin": "results"}, "subscriptoin")]:
            assert_error(await client.get(LETTERS, params=params, headers=t.auth("ops")), 400, field)
        for body, field in [({}, "subscription"), ({"subscription": "results.x"}, "subscription"),
                            ({"subscription": "results", "limit": 1001}, "limit"),
                            ({"subscription": "results", "limit": 0}, "limit"),
                            ({"subscription": "results", "failed_before": 1700000000}, "failed_before"),
                            ({"subscription": "results", "failed_before": "yesterday"}, "failed_before"),
                            ({"subscription": "results", "event_type": ""}, "event_type"),
                            ({"subscription": "results", "all": True}, "all")]:
            assert_error(await client.post(f"{LETTERS}/replay", json=body, headers=t.auth("ops")), 400, field)
        # A name no key can hold is no dead letter, not an outage (found by the contract test: a 503).
        assert_error(await client.post(f"{LETTERS}/%C2%88v/%C2%8A/replay", headers=t.auth("ops")), 404, "event_id")
