"""Moving calls through their states, from dialers and provider callbacks alike: the compare-and-set
write, the status event for webhooks, and freeing the tenant's concurrency slot at the end."""

from __future__ import annotations

import logging
import uuid
from datetime import datetime
from typing import Any

import orjson
from nats.js import JetStreamContext

from agentstudio import bus, calls
from agentstudio.callstate import CallError, CallState, CallStatus, CallStore, now
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
_EVENT_NAMESPACE = uuid.UUID("0f3e8f0a-7c55-4f55-9a43-6a3f4a5e2b10")


class CallTracker:
    def __init__(self, js: JetStreamContext, store: CallStore, concurrency: Concurrency) -> None:
        self.js = js
        self.store = store
        self.concurrency = concurrency

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
    ) -> CallState | None:
        """Record that the call reached `status` (no-op when it is already there or beyond), then
        publish its event. Re-driving the same report publishes the same event id, which JetStream
        de-duplicates, so a crash between the write and the publish is healed by any retry."""
        state, changed = await self.store.change(
            tenant,
            call_id,
            lambda s: s.advanced(status, at=at, detail=detail, error=error, duration_seconds=duration_seconds,
                                 end_reason=end_reason)
            if s is not None
            else None,
        )
        if state is None:
            return None
        reached = changed or state.status == status or any(e.status == status for e in state.events)
        # The end of a call with an agent still talking waits for its final transcript: the
        # conversation publishes the event when it closes (conversation_closed).
        held = state.terminal and state.conversation == "open"
        if reached and status in EVENT_TYPES and not held:
            await self.publish_event(state, EVENT_TYPES[status])
        if state.terminal:
            await self.concurrency.release(tenant, call_id)
        if changed:
            log.info("call %s", state.status, extra={"call_id": call_id, "tenant": tenant, "status": state.status})
        return state

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
        return state, changed

    async def conversation_closed(self, state: CallState) -> None:
        """The agent's part is over and recorded: send the end event it held back, if the call ended."""
        if state.terminal:
            await self.publish_event(state, EVENT_TYPES[state.status])

    async def publish_event(self, state: CallState, event_type: str) -> None:
        request = await calls.fetch(self.js, state.tenant, state.call_id)
        if request is None:
            log.error("call has no request record; event not sent", extra={"call_id": state.call_id})
            return
        event = status_event(request, state, event_type)
        await self.js.publish(
            bus.event_subject(state.tenant, state.call_id),
            orjson.dumps(event),
            headers={"Nats-Msg-Id": event["id"]},
        )


def status_event(request: calls.CallRequest, state: CallState, event_type: str) -> dict[str, Any]:
    """The call status webhook body (the seed's receivers read data.user_id, data.duration_seconds)."""
    data: dict[str, Any] = {
        "call_id": state.call_id,
        "status": state.status if event_type != "call.answered" else "in_progress",
        "user_id": request.user_id,
        "phone_number": request.phone_number,
        "metadata": request.metadata,
        "duration_seconds": state.duration_seconds or 0,
        "transcript": state.transcript,
        "captured": state.captured,
        "end_reason": state.end_reason,
        "test": request.test,
    }
    if request.workflow_slug:
        data["workflow_slug"] = request.workflow_slug
    else:
        data["agent_slug"] = request.agent_slug
    if event_type == "call.failed" and state.error is not None:
        data["error"] = state.error.model_dump()
    at = next((e.at for e in reversed(state.events) if EVENT_TYPES.get(e.status) == event_type), now())
    return {
        "type": event_type,
        "id": "evt_" + uuid.uuid5(_EVENT_NAMESPACE, f"{state.tenant}/{state.call_id}/{event_type}").hex,
        "created_at": at.isoformat(),
        "data": data,
    }
