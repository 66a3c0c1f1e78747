"""The call request record: what ingest queues and dialers consume, and how to queue and read it.

The JetStream message *is* the record (subject `calls.<tenant>.dispatch.<call_id>`), so accepting a
call costs one round trip to NATS: publish and wait for the ack. Reading a call back is a direct get
by subject.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

import orjson
from nats.js import JetStreamContext
from nats.js.errors import APIError, NotFoundError
from pydantic import ConfigDict

from agentstudio import bus, clock, tracing
from agentstudio.stored import Stored

# How far ahead a call may be scheduled: it must fire well inside the stream's retention.
MAX_SCHEDULE_AHEAD = timedelta(seconds=bus.CALL_RETENTION - bus.DAY)
# Idempotency keys map to call ids deterministically, so racing retries publish the same
# Nats-Msg-Id and JetStream's de-duplication keeps exactly one.
_IDEMPOTENCY_NAMESPACE = uuid.UUID("9d6c1f0e-3b8a-4a57-9d52-8f7f0c1b2a61")


class CallRequest(Stored):
    model_config = ConfigDict(frozen=True)

    call_id: str
    tenant: str
    api_key: str  # name of the ApiKey that queued it (never the key)
    workflow_slug: str | None = None
    agent_slug: str | None = None
    phone_number: str
    user_id: str | None = None
    user_context: dict[str, Any]
    metadata: dict[str, Any]
    test: bool
    created_at: datetime
    bundle_version: int
    status: Literal["pending"] = "pending"
    scheduled_for: datetime | None = None  # dialed no earlier than this (a JetStream message schedule)
    requeued: int = 0  # 0: as accepted; n: the n-th time it was queued again (defer)
    # Why it waits: scheduled_at (the body asked), calling_hours, frequency_cap or retry.
    scheduled_reason: str | None = None


def new_call_id(tenant: str, api_key: str, idempotency_key: str | None) -> str:
    if idempotency_key is None:
        return str(uuid.uuid4())
    return str(uuid.uuid5(_IDEMPOTENCY_NAMESPACE, f"{tenant}\x00{api_key}\x00{idempotency_key}"))


def encode(call: CallRequest) -> bytes:
    return orjson.dumps(call.model_dump(mode="json"))


def waiting_status(call: CallRequest) -> str:
    """What a call no dialer has taken yet is: scheduled until it is due, then pending."""
    due = call.scheduled_for
    return "scheduled" if due is not None and due > clock.now() else "pending"


async def enqueue(js: JetStreamContext, call: CallRequest, timeout: float, *, keyed: bool = False) -> bool:
    """Queue durably; returns False when JetStream already had this call id (a retry).

    A scheduled call is stored on its schedule subject and the server itself publishes it to the
    dispatch subject at `scheduled_for` (JetStream message schedules): until then it is in no
    consumer's view, holds no ack-pending slot and no dialer memory, whatever the backlog.

    `keyed`: the id comes from an Idempotency-Key, so a retry may come at any time. The stream
    de-duplicates a Nats-Msg-Id for the idempotency window (a day) only, while the call is kept for
    the retention (a week): any message of the call, found by subject, says it was queued. Retries
    racing each other are minutes apart at most, well inside the window, which keeps one of them."""
    if keyed and await _known(js, call.tenant, call.call_id):
        return False
    return await _publish(js, call, call.call_id, timeout)


async def _known(js: JetStreamContext, tenant: str, call_id: str) -> bool:
    """Whether the stream holds any message of the call (dispatch, schedule or dead): one direct get."""
    try:
        await js.get_last_msg(bus.CALLS_STREAM, f"calls.{tenant}.*.{call_id}", direct=True)
    except NotFoundError:
        return False
    return True


async def defer(js: JetStreamContext, call: CallRequest, until: datetime, msg_id: str, timeout: float = 5.0,
                reason: str | None = None, replacing: int | None = None) -> CallRequest:
    """Queue the call again to be dispatched at `until` (outside its calling window, under its
    frequency cap, paused, or waiting to retry), the same way as a scheduled call. `msg_id` names
    this deferral, so the dialer that defers and then dies before acking re-publishes nothing new.
    With `replacing` (the stream sequence of the schedule read), it replaces that schedule only if it
    still waits: one that has fired, or been replaced since, raises Moved and nothing is queued."""
    later = call.model_copy(update={"scheduled_for": until, "scheduled_reason": reason, "requeued": call.requeued + 1})
    try:
        await _publish(js, later, msg_id, timeout, replacing)
    except APIError as exc:
        if exc.err_code == _WRONG_LAST_SEQUENCE:
            raise Moved(call.call_id) from exc
        raise
    return later


class Moved(Exception):
    """The schedule a deferral was to replace is no longer the call's last (see `defer`)."""


_WRONG_LAST_SEQUENCE = 10071  # JetStream's error code for a failed Nats-Expected-Last-Subject-Sequence


async def _publish(js: JetStreamContext, call: CallRequest, msg_id: str, timeout: float,
                   replacing: int | None = None) -> bool:
    headers = {"Nats-Msg-Id": msg_id}
    if replacing is not None:
        headers["Nats-Expected-Last-Subject-Sequence"] = str(replacing)
    subject = bus.dispatch_subject(call.tenant, call.call_id)
    if call.scheduled_for is not None:
        # Schedules have one-second resolution: rounded up, so the call is never dialed early.
        due = clock.real(call.scheduled_for).astimezone(timezone.utc)
        due = due.replace(microsecond=0) + (timedelta(seconds=1) if due.microsecond else timedelta(0))
        headers |= {"Nats-Schedule": "@at " + due.strftime("%Y-%m-%dT%H:%M:%SZ"),
                    "Nats-Schedule-Target": subject}
        subject = bus.schedule_subject(call.tenant, call.call_id)
    with tracing.span("calls publish", kind=tracing.SpanKind.PRODUCER,
                      attributes={"call_id": call.call_id, "tenant": call.tenant,
                                  "messaging.destination.name": bus.dispatch_subject(call.tenant, "*")}) as span:
        # The dialer's spans join the trace through this message's traceparent header.
        ack = await js.publish(subject, encode(call), timeout=timeout, headers=tracing.inject(headers))
        span.set_attribute("duplicate", bool(ack.duplicate))
    return not ack.duplicate


async def fetch(js: JetStreamContext, tenant: str, call_id: str) -> CallRequest | None:
    """The call as last queued: on its dispatch subject, or on its schedule subject while it waits
    (the newer of the two when it was deferred after a dispatch)."""
    found: list[tuple[int, bytes]] = []
    for subject in (bus.dispatch_subject(tenant, call_id), bus.schedule_subject(tenant, call_id)):
        try:
            msg = await js.get_last_msg(bus.CALLS_STREAM, subject, direct=True)
        except NotFoundError:
            continue
        if msg.data:
            found.append((msg.seq or 0, msg.data))
    return CallRequest.read(max(found)[1]) if found else None
