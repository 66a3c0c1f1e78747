"""A receiver down (nothing listening on its port) for a whole retry step, then started again on the
same port: each event reaches it once by webhook-id, or is in the dead-letter list; a receiver that
never comes back has every event dead-lettered, and none is lost between the two."""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter
from pathlib import Path
from typing import Any

from nats.errors import Error as NatsError
from nats.js import JetStreamContext

from agentstudio import bus, signing
from agentstudio.natsserver import NatsServer
from test_dialer import queue_call
from test_webhooks import Receiver, dead_letters, delivery_records, serving, stack

CALLS = 4
SCHEDULE = "0,1,1,2,4"  # five retries, 8 s in all: the receiver is back well before the last
ACK_WAIT = 2 + 20  # a delivery consumer's: stack's webhook timeout + 20 s


async def settled(js, tenant: str, ids: list[str], done, subscriptions: int = 2) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    """Every call's delivery records (one event per call, to each subscription) once `done` holds
    for all (bounded polling)."""
    for _ in range(300):
        records = [r for c in ids for r in await delivery_records(js, tenant, c)]
        if len(records) == subscriptions * len(ids) and all(done(r) for r in records):
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


async def reachable(js: JetStreamContext) -> bool:
    try:
        await js.stream_info(bus.CALLS_STREAM)
        return True
    except (NatsError, asyncio.TimeoutError):
        return False


async def test_a_2xx_whose_ack_dies_with_its_server_reaches_the_receiver_once(tmp_path: Path) -> None:
    """The receiver's 204 comes back while the NATS server is frozen, then killed (as a node dies):
    the dispatcher's ack sits in a socket that is thrown away. Once the server is back on its store,
    the event is not posted again, not even after the ack wait that redelivers an unacked message."""
    receiver = Receiver(signing.new_secret())
    with NatsServer(tmp_path / "nats") as server:
        frozen = asyncio.Event()

        def freeze_once() -> None:
            if not frozen.is_set() and server.proc is not None:
                os.kill(server.proc.pid, signal.SIGSTOP)
                frozen.set()

        receiver.before_answer = freeze_once
        nc = await bus.connect(server.url, "test-lost-ack")
        try:
            js = nc.jetstream()
            await bus.ensure_calls_stream(js)
            async with stack(server, js, {"r": receiver}) as (client, t), serving(receiver):
                call = await queue_call(client, t, simulate_outcome="busy")
                async with asyncio.timeout(20):
                    await frozen.wait()
                await asyncio.sleep(1)  # answered; the ack and the record are sent into the frozen server
                server.stop(kill=True)
                server.start()
                async with asyncio.timeout(20):  # the test's own connection back too
                    while not await reachable(js):
                        await asyncio.sleep(0.2)
                await settled(js, t.name, [call], lambda r: r["state"] == "delivered", subscriptions=1)
                await asyncio.sleep(ACK_WAIT + 3)  # an unacked delivery would have come again by now
                assert len(receiver.attempts) == 1, f"posted again after a 2xx: {receiver.attempts}"
                # And the dispatcher as a whole came back with the server: a later call's event is filed
                # and delivered (the fan-out used to die for good when a nak met the reconnection).
                later = await queue_call(client, t, simulate_outcome="busy")
                await settled(js, t.name, [later], lambda r: r["state"] == "delivered", subscriptions=1)
        finally:
            await nc.close()
    assert frozen.is_set() and [r["id"] for r in receiver.received] == receiver.attempts
    assert len(receiver.attempts) == 2, receiver.attempts
