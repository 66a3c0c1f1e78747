"""Moving calls through their states, from dialers and provider callbacks alike: the compare-and-set
write, the status event for webhooks, freeing the tenant's concurrency slot at the end, and queueing
the next attempt of a call its CallPolicy retries."""

from __future__ import annotations

import logging
import uuid
from collections import OrderedDict
from datetime import datetime, timedelta
from typing import Any

import orjson
from nats.js import JetStreamContext
from prometheus_client import Counter

from agentstudio import bus, calls, clock, tracing, transcripts
from agentstudio.metrics import end_reason_label
from agentstudio.callstate import TERMINAL, Attempt, CallError, CallState, CallStatus, CallStore, now
from agentstudio.concurrency import Concurrency

log = logging.getLogger("agentstudio.tracking")

EVENT_TYPES: dict[str, str] = {
    "in_progress": "call.answered",
    "completed": "call.completed",
    "failed": "call.failed",
    "no_answer": "call.no_answer",
    "busy": "call.busy",
    "canceled": "call.canceled",
}
# An attempt that is retried ends with the event of its status; voicemail is a completed call.
ATTEMPT_STATUS: dict[str, str] = {"voicemail": "completed"}
ATTEMPT_EVENT_TYPES: dict[str, str] = {o: EVENT_TYPES[ATTEMPT_STATUS.get(o, o)]
                                       for o in ("no_answer", "busy", "failed", "voicemail")}
_EVENT_NAMESPACE = uuid.UUID("0f3e8f0a-7c55-4f55-9a43-6a3f4a5e2b10")


class CallTracker:
    def __init__(self, js: JetStreamContext, store: CallStore, concurrency: Concurrency, remember: int = 0,
                 ended: Counter | None = None) -> None:
        self.js = js
        self.store = store
        self.concurrency = concurrency
        self._ended = ended  # metrics.calls_ended of the process, if it exports one
        # The requests of the calls this process placed, so their events need not read them back
        # from the stream (two direct gets an event).
        self._remember = remember
        self._requests: OrderedDict[tuple[str, str], calls.CallRequest] = OrderedDict()

    def remember(self, call: calls.CallRequest) -> None:
        """The request of a call this process is placing: its events and retry are made from it."""
        if self._remember:
            self._requests[(call.tenant, call.call_id)] = call
            self._requests.move_to_end((call.tenant, call.call_id))
            while len(self._requests) > self._remember:
                self._requests.popitem(last=False)

    async def request(self, tenant: str, call_id: str) -> calls.CallRequest | None:
        """The call's request: as remembered, else as last queued."""
        return self._requests.get((tenant, call_id)) or await calls.fetch(self.js, tenant, call_id)

    async def advance(
        self,
        tenant: str,
        call_id: str,
        status: CallStatus,
        *,
        at: datetime | None = None,
        detail: str | None = None,
        error: CallError | None = None,
        duration_seconds: int | None = None,
        end_reason: str | None = None,
        provider_call_id: str | None = None,
        provider: str | None = None,
    ) -> CallState | None:
        """Record that the call reached `status` (no-op when it is already there or beyond), then
        publish its event. Re-driving the same report publishes the same event id, which JetStream
        de-duplicates, so a crash between the write and the publish is healed by any retry.

        `provider_call_id` names the attempt a provider's report is about. Only such a report ends an
        attempt its policy retries (a request the provider refused, or a stale call, ends the call);
        a report about an earlier attempt (a late callback) changes nothing of the current one.
        A report naming its `provider` records its call id on a claim that has none yet (a provider
        that `records_call_id`)."""
        at = at or now()

        def step(s: CallState | None) -> CallState | None:
            if s is None:
                return None
            if provider_call_id is not None and (
                    s.attempt_of(provider_call_id) is not None or s.provider_call_id not in (None, provider_call_id)):
                return None  # an earlier attempt's report
            if provider_call_id is not None and status in TERMINAL:
                delay = s.retry_delay(s.outcome(status))
                if delay is not None:
                    # Due on the clock windows read (`dev --now`), as every other wait is.
                    return s.retried(status, retry_time(clock.reading_at(at), delay), at=at, detail=detail, error=error,
                                     duration_seconds=duration_seconds)
            moved = s.advanced(status, at=at, detail=detail, error=error, duration_seconds=duration_seconds,
                               end_reason=end_reason)
            if provider is not None and provider_call_id is not None and s.provider_call_id is None \
                    and s.status != "pending":  # not once the attempt has ended and the call waits for its next
                moved = (moved or s).model_copy(update={"provider": provider, "provider_call_id": provider_call_id})
            return moved

        state, changed = await self.store.change(tenant, call_id, step)
        if state is None:
            return None
        ended = state.attempt_of(provider_call_id) if provider_call_id is not None else None
        if ended is not None:
            if status in TERMINAL and ended.next_attempt_at is not None:
                await self._retry(state, ended)  # just now, or again for a re-driven report: idempotent
            return state
        current = [e for e in state.events if e.attempt == state.attempt]
        reached = changed or state.status == status or any(e.status == status for e in current)
        # The end of a call with an agent still talking waits for its final transcript: the
        # conversation publishes the event when it closes (conversation_closed).
        held = state.terminal and state.conversation == "open"
        if reached and status in EVENT_TYPES and not held:
            await self.publish_event(state, EVENT_TYPES[status])
        if state.terminal:
            await self.concurrency.release(tenant, call_id)
        if changed:
            log.info("call %s", state.status, extra={"call_id": call_id, "tenant": tenant, "status": state.status})
            self._count_end(state)
        return state

    def _count_end(self, state: CallState) -> None:
        """Once per call: only the write that moved it to its final status (the compare-and-set
        decides between processes) counts it."""
        if state.terminal and self._ended is not None:
            self._ended.labels(state.tenant, state.status, end_reason_label(state.end_reason)).inc()

    async def _retry(self, state: CallState, ended: Attempt) -> None:
        """Queue the attempt after `ended` for its time, free the tenant's slot, send `ended`'s event.
        Each step is idempotent (the re-queue's message id names the attempt), so a report re-driven
        after a crash completes what the first one began."""
        assert ended.next_attempt_at is not None
        request = await self.request(state.tenant, state.call_id)
        if request is None:
            log.error("call has no request record; not retried", extra={"call_id": state.call_id})
            return
        await calls.defer(self.js, request, ended.next_attempt_at,
                          msg_id=f"{state.call_id}-attempt-{ended.attempt + 1}", reason="retry")
        await self.concurrency.release(state.tenant, state.call_id)
        await self._publish(request, state, ATTEMPT_EVENT_TYPES[ended.outcome], ended)
        log.info("call attempt %d %s; retried at %s", ended.attempt, ended.outcome, ended.next_attempt_at.isoformat(),
                 extra={"call_id": state.call_id, "tenant": state.tenant})

    async def cancel(self, call: calls.CallRequest, reason: str) -> tuple[CallState, bool]:
        """Cancel a call no dialer has claimed yet: (its record now, whether this canceled it).
        The record's compare-and-set decides against a dialer claiming it at the same moment; a
        call past pending comes back unchanged. Canceling again re-sends the same event id, which
        JetStream de-duplicates."""

        def cancel(s: CallState | None) -> CallState | None:
            current = s or CallState.new(call)  # no dialer has read it yet
            return current.advanced("canceled", detail=reason, end_reason=reason) if current.status == "pending" else None

        state, changed = await self.store.change(call.tenant, call.call_id, cancel)
        assert state is not None  # a missing record is always created canceled
        if state.status == "canceled":
            await self.publish_event(state, EVENT_TYPES["canceled"])
            # A dialer may hold a slot for it while it waits under the tenant's cap.
            await self.concurrency.release(call.tenant, call.call_id)
        if changed:
            log.info("call canceled", extra={"call_id": call.call_id, "tenant": call.tenant, "reason": reason})
            self._count_end(state)
        return state, changed

    async def conversation_closed(self, state: CallState) -> None:
        """The agent's part is over and recorded: send the end event it held back, if the call ended."""
        if state.terminal:
            await self.publish_event(state, EVENT_TYPES[state.status])

    async def publish_event(self, state: CallState, event_type: str) -> None:
        request = await self.request(state.tenant, state.call_id)
        if request is None:
            log.error("call has no request record; event not sent", extra={"call_id": state.call_id})
            return
        await self._publish(request, state, event_type)

    async def _publish(self, request: calls.CallRequest, state: CallState, event_type: str,
                       ended: Attempt | None = None) -> None:
        if ended is None:
            state = await transcripts.filled(self.js, state) or state
        event = status_event(request, state, event_type, ended)
        headers = {"Nats-Msg-Id": event["id"]}
        if state.traceparent is not None and tracing.on():  # its webhook deliveries join the call's trace
            headers["traceparent"] = state.traceparent
        await self.js.publish(bus.event_subject(state.tenant, state.call_id), orjson.dumps(event), headers=headers)


def retry_time(ended: datetime, delay_seconds: int) -> datetime:
    """When the next attempt is due: `delay_seconds` after the end, up to the whole second (a message
    schedule fires on whole seconds, and must not fire before the delay is over)."""
    due = ended + timedelta(seconds=delay_seconds)
    return due.replace(microsecond=0) + timedelta(seconds=1) if due.microsecond else due


def status_event(request: calls.CallRequest, state: CallState, event_type: str,
                 ended: Attempt | None = None) -> dict[str, Any]:
    """The call status webhook body (the seed's receivers read data.user_id, data.duration_seconds).
    `ended`: an earlier attempt that was retried, whose own end this event reports. `state` has its
    transcript filled in (transcripts.filled)."""
    if ended is not None:
        return _attempt_event(request, state, event_type, ended)
    transcript, omitted = transcripts.for_event(state.transcript)
    data = _call_data(request, state) | {
        "status": state.status if event_type != "call.answered" else "in_progress",
        "duration_seconds": state.duration_seconds or 0,
        "transcript": transcript,
        "captured": state.captured,
        "end_reason": state.end_reason,
        "attempt": state.attempt,
        "attempts": _attempts(state.all_attempts),
    }
    if omitted:
        # Too big for one event: the last turns, and how many came before them; the calls API has all.
        data |= {"transcript_truncated": True, "transcript_omitted_turns": omitted}
    if state.terminal:
        data["will_retry"] = False
    if state.answered_by is not None:
        data["answered_by"] = state.answered_by
    if state.voicemail_message is not None:
        data["voicemail_message"] = state.voicemail_message
    if event_type == "call.failed" and state.error is not None:
        data["error"] = state.error.model_dump()
    current = [e for e in state.events if e.attempt == state.attempt]
    at = next((e.at for e in reversed(current) if EVENT_TYPES.get(e.status) == event_type), now())
    return {"type": event_type, "id": event_id(state, state.attempt, event_type), "created_at": at.isoformat(),
            "data": data}


def _attempt_event(request: calls.CallRequest, state: CallState, event_type: str, ended: Attempt) -> dict[str, Any]:
    """The end of an attempt the call was retried after: its outcome, and when the next one is due."""
    data = _call_data(request, state) | {
        "status": ATTEMPT_STATUS.get(ended.outcome, ended.outcome),
        "duration_seconds": ended.duration_seconds,
        "transcript": [],
        "captured": {},
        "end_reason": "voicemail" if ended.outcome == "voicemail" else None,
        "attempt": ended.attempt,
        "attempts": _attempts(state.history[:ended.attempt]),
        "will_retry": True,
        "next_attempt_at": ended.next_attempt_at.isoformat() if ended.next_attempt_at else None,
    }
    if ended.answered_by is not None:
        data["answered_by"] = ended.answered_by
    if ended.outcome == "voicemail" and state.voicemail is not None and state.voicemail.action == "leave_message":
        data["voicemail_message"] = state.voicemail.message
    if ended.error is not None:
        data["error"] = ended.error.model_dump()
    return {"type": event_type, "id": event_id(state, ended.attempt, event_type), "created_at": ended.ended_at.isoformat(),
            "data": data}


def _call_data(request: calls.CallRequest, state: CallState) -> dict[str, Any]:
    """What every event says about the call itself, whichever attempt it reports."""
    data: dict[str, Any] = {"call_id": state.call_id, "user_id": request.user_id,
                            "phone_number": request.phone_number, "metadata": request.metadata, "test": request.test}
    if request.workflow_slug:
        data["workflow_slug"] = request.workflow_slug
    else:
        data["agent_slug"] = request.agent_slug
    return data


def _attempts(ended: list[Attempt]) -> list[dict[str, Any]]:
    return [a.model_dump(mode="json") for a in ended]


def event_id(state: CallState, attempt: int, event_type: str) -> str:
    """The event's de-duplication id: one per call, attempt and type. The first attempt keeps the
    id it had before calls were retried, so an event re-sent across an upgrade is still one."""
    name = f"{state.tenant}/{state.call_id}/{event_type}" if attempt == 1 else \
        f"{state.tenant}/{state.call_id}/{attempt}/{event_type}"
    return "evt_" + uuid.uuid5(_EVENT_NAMESPACE, name).hex
