"""How far behind the dialers are, per tenant, read from JetStream: the dispatches their consumer has
not delivered yet and the age of the oldest, plus what dialers hold unacked (parked under a cap, paced,
being placed). Read on a timer by one role (the operator), never per call."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from agentstudio import bus

# An observer left behind by a process that died between creating and deleting it goes by itself.
OBSERVER_INACTIVE_SECONDS = 30.0


@dataclass(frozen=True)
class Backlog:
    pending: int  # queued and not yet delivered to any dialer
    oldest_age_seconds: float  # of the oldest of those; 0 when there are none


@dataclass(frozen=True)
class Queue:
    tenants: dict[str, Backlog]
    ack_pending: int  # delivered to dialers and not acked yet, all tenants together
    oldest_unacked_age_seconds: float  # the oldest dispatch not acked (delivered or not); 0 when none


async def read(js: JetStreamContext, tenants: list[str]) -> Queue:
    """The dispatch queue now. The dialers' consumer is one for every tenant and its info has no
    per-subject counts, so a tenant's count comes from a short-lived observer filtered on its subject,
    starting after the last dispatch delivered: exact for what no dialer has taken yet."""
    try:
        info = await js.consumer_info(bus.CALLS_STREAM, bus.DISPATCH_CONSUMER)
        delivered, floor, ack_pending = info.delivered.stream_seq or 0, info.ack_floor.stream_seq or 0, \
            info.num_ack_pending or 0
    except NotFoundError:  # no dialer has started yet: everything queued waits
        delivered = floor = ack_pending = 0
        try:
            await js.stream_info(bus.CALLS_STREAM)
        except NotFoundError:  # nor ingest: nothing was ever queued
            return Queue({tenant: Backlog(0, 0.0) for tenant in tenants}, 0, 0.0)
    now = datetime.now(timezone.utc)
    backlogs = {}
    for tenant in tenants:
        subject = bus.dispatch_subject(tenant, "*")
        observer = await js.add_consumer(bus.CALLS_STREAM, ConsumerConfig(
            filter_subject=subject, deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=delivered + 1,
            ack_policy=AckPolicy.NONE, inactive_threshold=OBSERVER_INACTIVE_SECONDS, mem_storage=True,
            num_replicas=1))
        try:
            pending = observer.num_pending or 0
        finally:
            await js.delete_consumer(bus.CALLS_STREAM, observer.name)
        age = await _age_of_next(js, delivered + 1, subject, now) if pending else 0.0
        backlogs[tenant] = Backlog(pending, age)
    # The dispatch right after the ack floor is the oldest not acked (everything before it is).
    oldest = await _age_of_next(js, floor + 1, bus.DISPATCH_ALL, now)
    return Queue(backlogs, ack_pending, oldest)


async def _age_of_next(js: JetStreamContext, seq: int, subject: str, now: datetime) -> float:
    """Age of the first message on `subject` at or after `seq`; 0 when there is none."""
    try:
        msg = await js.get_msg(bus.CALLS_STREAM, seq=seq, subject=subject, next=True, direct=True)
    except NotFoundError:
        return 0.0
    return max(0.0, (now - msg.time).total_seconds()) if msg.time else 0.0
