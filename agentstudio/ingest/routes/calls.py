"""GET /api/v1/calls/{call_id}: the record of one call of the key's tenant."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from nats.errors import Error as NatsError

from agentstudio import calls
from agentstudio.ingest.auth import Principal, require_scope, service_of, unavailable
from agentstudio.ingest.errors import ApiError, responses
from agentstudio.callstate import CallState
from agentstudio.ingest.schemas import CallRecord, TimelineEntry

router = APIRouter(prefix="/api/v1", tags=["calls"])


@router.get(
    "/calls/{call_id}",
    response_model=CallRecord,
    responses=responses(401, 403, 404, 429, 503),
    summary="Read one call",
)
async def get_call(
    request: Request,
    call_id: str,
    principal: Annotated[Principal, Depends(require_scope("calls:read"))],
) -> CallRecord:
    svc = service_of(request)
    not_found = ApiError(404, "not_found", f"call {call_id!r} not found", "call_id")
    try:
        canonical = str(uuid.UUID(call_id))  # also keeps subject wildcards out of the lookup
    except ValueError:
        raise not_found from None
    try:
        call = await calls.fetch(svc.js, principal.tenant, canonical)
        state = await svc.tracker.store.get(principal.tenant, canonical) if call is not None else None
    except (NatsError, TimeoutError) as exc:
        raise unavailable(svc) from exc
    if call is None:
        raise not_found
    return record(call, state)


def record(call: calls.CallRequest, state: CallState | None) -> CallRecord:
    """The request as queued plus what has happened to it since (pending until a dialer takes it)."""
    base = call.model_dump(include=set(CallRecord.model_fields))
    if state is None:
        return CallRecord(**base, events=[TimelineEntry(status="pending", at=call.created_at)])
    progress = state.model_dump(include={"status", "provider", "answered_at", "ended_at", "duration_seconds",
                                         "error", "events", "transcript", "captured"})
    return CallRecord(**{**base, **progress})
