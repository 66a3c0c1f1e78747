"""Finding a tenant's calls: the filters a listing or export applies, newest-first reads of the
tenant's dispatch messages in the CALLS stream joined with each call's state, and paging cursors.

What it costs, honestly: there is no index. A read walks the tenant's dispatch messages
(`calls.<tenant>.dispatch.*`) backwards from its newest to its oldest (two gets find them), one
window of stream sequences at a time: one ephemeral consumer per window, filtered to the tenant on
the server, so other tenants' messages are not sent but are still stepped over there. Every call
that passes the request filters (slugs, metadata, times, test) costs one KV get for its state, a
batch at a time. The first page of a listing reads a window or a few; a deep page, a sparse filter
and every export read as far back as they must, at worst all of the tenant's calls in the stream's
7-day retention; a CSV export reads the stream twice (see the export route). That is fine within
the retention window; the cost grows with the tenant's week of calls, not with the page size.
At scale it is replaced by an index written as calls happen: a consumer of the dispatch and status
subjects projecting (tenant, created_at, call_id, status, slugs, test, metadata) into a database
(Postgres with an index on (tenant, created_at, call_id) and a GIN index on metadata, or ClickHouse
for exports), which would also outlive the 7 days.
"""

from __future__ import annotations

import asyncio
import base64
from collections import deque
from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, get_args

import orjson
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from agentstudio import bus
from agentstudio.calls import CallRequest, waiting_status
from agentstudio.callstate import CallState, CallStatus, CallStore

# "scheduled" is a listing status only: a pending call waiting for its time (see status_of).
STATUSES: tuple[str, ...] = ("scheduled", *get_args(CallStatus))

# The first window spans this many stream sequences (all tenants' messages count); it grows 4× while
# windows come back sparse, so a small tenant in a busy stream costs few windows.
FIRST_SPAN = 256
# At most this many of the tenant's messages are held from one window (memory stays bounded
# however dense the window turns out); the older rest is read again as the next window.
WINDOW_MAX = 1024
FETCH_BATCH = 256
FETCH_TIMEOUT = 5.0
# A window's consumer is deleted when the read ends; this reclaims it if the reader is cut off.
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


async def top(js: JetStreamContext) -> int:
    """The sequence just above the newest message in the stream now. A read bounded by it is a
    snapshot: calls queued later get higher sequences and stay out of it."""
    return int((await js.stream_info(bus.CALLS_STREAM)).state.last_seq) + 1


async def find(
    js: JetStreamContext,
    store: CallStore,
    tenant: str,
    which: CallFilter,
    below: int | None = None,
    batch: int = 64,
) -> AsyncIterator[Found]:
    """The tenant's calls that pass `which`, newest first, from stream sequence `below` down (from
    the newest when None). States are read `batch` calls at a time."""
    listed: set[str] = set()
    async with aclosing(_windows(js, tenant, below)) as windows:
        async for window in windows:
            # A call is listed where it was accepted: its re-queued copies (deferred, retried) would
            # list it again, on another page, out of its place in "newest first".
            admitted = [(seq, call) for seq, call in window
                        if not call.requeued and which.admits(call) and call.call_id not in listed]
            listed.update(call.call_id for _, call in admitted)
            for start in range(0, len(admitted), batch):
                part = admitted[start:start + batch]
                states = await asyncio.gather(*(store.get(tenant, call.call_id) for _, call in part))
                for (seq, call), state in zip(part, states):
                    found = Found(seq, call, state)
                    if which.admits_status(found.status):
                        yield found


@dataclass(frozen=True)
class Page:
    calls: list[Found]
    next_below: int | None  # where the next page starts; None when this is the last


async def page(
    js: JetStreamContext, store: CallStore, tenant: str, which: CallFilter, limit: int, below: int | None
) -> Page:
    """Up to `limit` calls below `below`, newest first. One more is looked for, so the last page
    says it is the last instead of leading to an empty one."""
    found: list[Found] = []
    async with aclosing(find(js, store, tenant, which, below, batch=min(limit + 1, 64))) as calls:
        async for item in calls:
            found.append(item)
            if len(found) > limit:
                break
    if len(found) > limit:
        return Page(found[:limit], found[limit - 1].seq)
    return Page(found, None)


async def metadata_keys(js: JetStreamContext, tenant: str, which: CallFilter, below: int) -> list[str]:
    """Every metadata key of the calls below `below` that pass `which` apart from its statuses
    (those need a KV read per call, and a status can change while an export runs), sorted: the
    metadata columns of a CSV export. A superset when statuses are filtered: a column may be empty."""
    keys: set[str] = set()
    async with aclosing(_windows(js, tenant, below)) as windows:
        async for window in windows:
            for _, call in window:
                if which.admits(call):
                    keys.update(call.metadata)
    return sorted(keys)


async def _windows(
    js: JetStreamContext, tenant: str, below: int | None
) -> AsyncIterator[list[tuple[int, CallRequest]]]:
    """The tenant's queued calls below sequence `below`, newest first, a window at a time.

    JetStream reads forward only, so the stream is walked backwards in windows [lo, hi) read
    forwards and handed out reversed. A yield never happens while a consumer is open, so a reader
    that stops early leaves nothing behind."""
    # Queued calls, and scheduled ones still waiting (the server moves each to its dispatch subject
    # when due, so a call is on one of the two; one seen on both mid-move is listed once, see find).
    subjects = [bus.dispatch_subject(tenant, "*"), bus.schedule_subject(tenant, "*")]
    # The tenant's newest and oldest messages bound the walk, so a tenant with calls only in the
    # last hour does not walk the whole week of everyone's calls to find its last page.
    newest, oldest = 0, None
    for subject in subjects:
        try:
            newest = max(newest, int((await js.get_last_msg(bus.CALLS_STREAM, subject)).seq))
            seq = int((await js.get_msg(bus.CALLS_STREAM, seq=1, subject=subject, next=True, direct=True)).seq)
        except NotFoundError:
            continue
        oldest = seq if oldest is None else min(oldest, seq)
    if oldest is None:
        return  # no calls (or none left in the retention)
    first = oldest
    hi = newest + 1 if below is None else min(below, newest + 1)
    span = FIRST_SPAN
    while hi > first:
        lo = max(first, hi - span)
        window, cut = await _read(js, subjects, lo, hi, WINDOW_MAX)
        if window:
            yield window[::-1]
        if cut:  # older messages of [lo, hi) were dropped: they are the next window
            span = max(1, hi - window[0][0])
            hi = window[0][0]
        else:
            hi = lo
            if len(window) < WINDOW_MAX // 4:
                span *= 4


async def _read(
    js: JetStreamContext, subjects: list[str], lo: int, hi: int, keep: int
) -> tuple[list[tuple[int, CallRequest]], bool]:
    """Messages on `subjects` with lo <= sequence < hi, oldest first: the newest `keep` of them, and
    whether older ones were dropped to stay within it."""
    kept: deque[tuple[int, CallRequest]] = deque(maxlen=keep)
    seen = 0
    async with aclosing(scan(js, subjects, lo, hi)) as found:
        async for item in found:
            kept.append(item)
            seen += 1
    return list(kept), seen > len(kept)


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
                        yield meta.sequence.stream, CallRequest.model_validate_json(msg.data)
        finally:
            await sub.unsubscribe()
    finally:
        await js.delete_consumer(bus.CALLS_STREAM, info.name)
