"""A receiver down (nothing listening on its port) for a whole retry step, then started again on the
same port: each event reaches it once by webhook-id, or is in the dead-letter list; a receiver that
never comes back has every event dead-lettered, and none is lost between the two."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from agentstudio import signing
from test_dialer import queue_call
from test_webhooks import Receiver, dead_letters, delivery_records, serving, stack

CALLS = 4
SCHEDULE = "0,1,1,2,4"  # five retries, 8 s in all: the receiver is back well before the last


async def settled(js, tenant: str, ids: list[str], done) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    """Every call's delivery records once `done` holds for all (bounded polling)."""
    for _ in range(300):
        records = [r for c in ids for r in await delivery_records(js, tenant, c)]
        if len(records) == 2 * len(ids) and all(done(r) for r in records):
            return records
        await asyncio.sleep(0.1)
    raise AssertionError(f"deliveries not settled: {records}")


async def test_a_receiver_down_for_a_whole_retry_step_gets_each_event_once(nats_server, js) -> None:  # type: ignore[no-untyped-def]
    back, never = Receiver(signing.new_secret()), Receiver(signing.new_secret())  # never: nothing listens
    async with stack(nats_server, js, {"back": back, "never": never}, schedule=SCHEDULE) as (client, t):
        async with serving(back):  # up: the first calls' events are delivered at once
            early = [await queue_call(client, t, simulate_outcome="busy") for _ in range(CALLS)]
            await settled(js, t.name, early, lambda r: r["subscription"] == "never" or r["state"] == "delivered")
        # Stopped: the port refuses connections while the next calls end, for more than a retry step.
        late = [await queue_call(client, t, simulate_outcome="busy") for _ in range(CALLS)]
        await settled(js, t.name, late, lambda r: r["attempts"] >= 3)
        assert len(back.attempts) == CALLS  # nothing reached it while it was down
        async with serving(back):  # started again on the same port
            records = await settled(js, t.name, early + late,
                                    lambda r: r["state"] in ("delivered", "dead_lettered"))
    ids = {r["event_id"] for r in records}
    assert len(ids) == 2 * CALLS
    # The receiver that came back: each event once (every attempt that reached it got a 2xx), and
    # any it did not get is in the dead-letter list.
    dead = {(d["subscription"], d["event"]["id"]) for d in await dead_letters(js, t.name)}
    got = Counter(r["id"] for r in back.received)
    assert set(got.values()) == {1} and Counter(back.attempts) == got
    assert set(got) | {e for s, e in dead if s == "back"} == ids and not set(got) & {e for s, e in dead if s == "back"}
    assert set(got) == ids  # here, back in time for every one of them
    # The receiver that never came back: every event dead-lettered after the schedule, none lost.
    assert {e for s, e in dead if s == "never"} == ids
    assert {r["attempts"] for r in records if r["subscription"] == "never"} == {len(SCHEDULE.split(",")) + 1}
