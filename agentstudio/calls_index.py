"""Finding a tenant's calls: the filters a listing, export or bulk cancel applies, each call's
listing status, paging cursors, and newest-first reads through the calls table (calls_table) joined
with each call's current state; and `scan`, a reader of the CALLS stream by subject and sequence.

A listing reads the table for the sequences and requests of the calls that pass (an indexed query:
its cost grows with the page, not with the tenant's week of calls), then each call's state from the
calls bucket, a batch at a time, so what it shows is as current as a single call's read.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, get_args

import orjson
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from agentstudio import bus
from agentstudio.calls import CallRequest, waiting_status
from agentstudio.callstate import CallState, CallStatus, CallStore

if TYPE_CHECKING:
    from agentstudio.calls_table import CallsTable

# "scheduled" is a listing status only: a pending call waiting for its time (see status_of).
STATUSES: tuple[str, ...] = ("scheduled", *get_args(CallStatus))

BATCH = 64  # calls read from the table, and states from the bucket, at a time
FETCH_BATCH = 256
FETCH_TIMEOUT = 5.0
# A scan's consumer is deleted when the read ends; this reclaims it if the reader is cut off.
CONSUMER_IDLE_SECONDS = 30.0


def metadata_text(value: Any) -> str:
    """A metadata value as text: strings as they are, anything else as JSON. Filters compare this
    and exports write it, so `metadata.attempt=2` matches what the export shows as 2."""
    return value if isinstance(value, str) else orjson.dumps(value).decode()


@dataclass(frozen=True)
class CallFilter:
    """What a listing or export keeps; every criterion given must hold. Within one criterion, any
    of the values given (several statuses, repeated values of one metadata key) will do."""

    statuses: frozenset[str] = frozenset()
    workflow_slug: str | None = None
    agent_slug: str | None = None
    metadata: Mapping[str, frozenset[str]] = field(default_factory=dict)
    created_after: datetime | None = None  # inclusive
    created_before: datetime | None = None  # exclusive, so consecutive ranges never overlap
    test: bool | None = None

    def admits(self, call: CallRequest) -> bool:
        """Everything but the status, which needs the call's state."""
        if self.workflow_slug is not None and call.workflow_slug != self.workflow_slug:
            return False
        if self.agent_slug is not None and call.agent_slug != self.agent_slug:
            return False
        if self.test is not None and call.test != self.test:
            return False
        if self.created_after is not None and call.created_at < self.created_after:
            return False
        if self.created_before is not None and call.created_at >= self.created_before:
            return False
        return all(
            key in call.metadata and metadata_text(call.metadata[key]) in wanted
            for key, wanted in self.metadata.items()
        )

    def admits_status(self, status: str) -> bool:
        return not self.statuses or status in self.statuses


@dataclass(frozen=True)
class Found:
    """A call as queued, its stream sequence (its place in the listing) and its state so far."""

    seq: int
    call: CallRequest
    state: CallState | None  # None until a dialer takes the call

    @property
    def status(self) -> str:
        return status_of(self.call, self.state)


def status_of(call: CallRequest, state: CallState | None) -> str:
    """What the calls API says a call is: a call no dialer has claimed (no state yet, or put back to
    wait by one) is scheduled until it is due, then pending."""
    return state.status if state is not None and state.status != "pending" else waiting_status(waiting_call(call, state))


def waiting_call(call: CallRequest, state: CallState | None) -> CallRequest:
    """The call as it waits. The message a listing reads is the one the call was accepted with; a
    dialer that put it back to wait (its calling window, its frequency cap) or a retry due later says
    so in the record, and the latest of those is when it may go."""
    if state is None or state.status != "pending":
        return call
    waits = [(d.until, d.reason) for d in state.deferrals]
    if state.next_attempt_at is not None:
        waits.append((state.next_attempt_at, "retry"))
    if not waits:
        return call
    due, reason = max(waits)
    if call.scheduled_for is not None and call.scheduled_for >= due:
        return call
    return call.model_copy(update={"scheduled_for": due, "scheduled_reason": reason})


def encode_cursor(below: int) -> str:
    return base64.urlsafe_b64encode(orjson.dumps({"below": below})).rstrip(b"=").decode()


def decode_cursor(cursor: str) -> int:
    """The stream sequence a cursor continues below; ValueError for anything we did not issue."""
    try:
        below = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))["below"]
    except (ValueError, TypeError, KeyError) as exc:  # bad base64 or JSON are ValueErrors
        raise ValueError("not a cursor this API issued") from exc
    if not isinstance(below, int) or isinstance(below, bool) or below < 1:
        raise ValueError("not a cursor this API issued")
    return below


async def find(
    table: CallsTable, store: CallStore, tenant: str, which: CallFilter, below: int, batch: int = 0,
) -> AsyncIterator[Found]:
    """The tenant's calls that pass `which`, newest first, below sequence `below` (from
    `table.caught_up`, so the read is a snapshot). A status the table has not seen change yet is
    checked again against the state read."""
    batch = min(batch or BATCH, BATCH)
    while True:
        rows = await table.rows(tenant, which, below, batch)
        states = await asyncio.gather(*(store.get(tenant, row.call_id) for row in rows))
        for row, state in zip(rows, states):
            found = Found(row.seq, CallRequest.read(row.body), state)
            if which.admits_status(found.status):
                yield found
        if len(rows) < batch:
            return
        below = rows[-1].seq


@dataclass(frozen=True)
class Page:
    calls: list[Found]
    next_below: int | None  # where the next page starts; None when this is the last


async def page(
    table: CallsTable, js: JetStreamContext, store: CallStore, tenant: str, which: CallFilter, limit: int,
    below: int | None,
) -> Page:
    """Up to `limit` calls below `below` (from the newest when None), newest first. One more is
    looked for, so the last page says it is the last instead of leading to an empty one."""
    top = await table.caught_up(js)
    found: list[Found] = []
    async with aclosing(find(table, store, tenant, which, top if below is None else min(below, top),
                             batch=limit + 1)) as calls:
        async for item in calls:
            found.append(item)
            if len(found) > limit:
                break
    if len(found) > limit:
        return Page(found[:limit], found[limit - 1].seq)
    return Page(found, None)


async def scan(js: JetStreamContext, subjects: list[str], lo: int, hi: int) -> AsyncIterator[tuple[int, CallRequest]]:
    """The calls on `subjects` with lo <= stream sequence < hi, oldest first, with their sequences:
    one ephemeral consumer filtered on the server, a fetch batch in memory at a time. A caller that
    stops early should close it (aclosing) so the consumer is deleted at once."""
    info = await js.add_consumer(bus.CALLS_STREAM, ConsumerConfig(
        filter_subjects=subjects,
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=lo,
        ack_policy=AckPolicy.NONE,
        mem_storage=True,
        num_replicas=1,
        inactive_threshold=CONSUMER_IDLE_SECONDS,
    ))
    try:
        pending = int(info.num_pending or 0)
        if pending == 0:
            return
        sub = await js.pull_subscribe_bind(stream=bus.CALLS_STREAM, consumer=info.name)
        try:
            while pending > 0:
                # Fetch no more than is pending: a fetch for more would wait out its timeout.
                for msg in await sub.fetch(min(pending, FETCH_BATCH), timeout=FETCH_TIMEOUT):
                    meta = msg.metadata
                    if meta.sequence.stream >= hi:
                        return
                    pending = meta.num_pending
                    if msg.data:
                        yield meta.sequence.stream, CallRequest.read(msg.data)
        finally:
            await sub.unsubscribe()
    finally:
        await js.delete_consumer(bus.CALLS_STREAM, info.name)
