"""The calls of the key's tenant: GET /api/v1/calls (filtered, paged), /api/v1/calls/export (CSV or
JSON Lines, streamed) and /api/v1/calls/{call_id}; canceling calls not yet dialed, one or by filter."""

from __future__ import annotations

import asyncio
import csv
import io
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from nats.errors import Error as NatsError

from agentstudio import calls, calls_index, calls_table, transcripts
from agentstudio.calls_index import CallFilter, Found
from agentstudio.callstate import CallState
from agentstudio.ingest.auth import Principal, require_scope, service_of, unavailable
from agentstudio.ingest.errors import ApiError, responses
from agentstudio.ingest.service import IngestService
from agentstudio.ingest.schemas import CallPage, CallRecord, CancelFilter, CancelResult, TimelineEntry
from agentstudio.tracking import CallTracker

router = APIRouter(prefix="/api/v1", tags=["calls"])

_FILTERS = frozenset({"status", "workflow_slug", "agent_slug", "created_after", "created_before", "test"})
_METADATA = "metadata."
CSV_COLUMNS = (
    "call_id", "created_at", "status", "workflow_slug", "agent_slug", "user_id", "phone_number", "test",
    "duration_seconds", "answered_at", "ended_at", "error_code", "error_message", "end_reason", "captured",
)
_FLUSH_BYTES = 16 * 1024


def _invalid(field: str, message: str) -> ApiError:
    return ApiError(400, "invalid_request", message, field)


def filters(*route_params: str) -> Callable[..., Coroutine[Any, Any, CallFilter]]:
    """The filter query parameters as a dependency; `route_params` are the route's own others.
    An unknown parameter is a 400 naming it: a misspelt filter must not export every call."""
    allowed = _FILTERS | set(route_params)

    async def dependency(
        request: Request,
        status: Annotated[list[str] | None, Query(
            description="Only calls in these statuses (repeat the parameter or separate with commas): "
                        + ", ".join(calls_index.STATUSES) + ".")] = None,
        workflow_slug: Annotated[str | None, Query(min_length=1, description="Only calls of this workflow.")] = None,
        agent_slug: Annotated[str | None, Query(
            min_length=1, description="Only single-agent calls of this agent.")] = None,
        created_after: Annotated[datetime | None, Query(
            description="ISO 8601; calls created at or after it (UTC when no offset is given).")] = None,
        created_before: Annotated[datetime | None, Query(
            description="ISO 8601; calls created before it (UTC when no offset is given).")] = None,
        test: Annotated[bool | None, Query(description="true: only test-key calls; false: only live ones.")] = None,
    ) -> CallFilter:
        metadata: dict[str, set[str]] = {}
        for name, value in request.query_params.multi_items():
            if name.startswith(_METADATA):
                metadata.setdefault(name[len(_METADATA):], set()).add(value)
            elif name not in allowed:
                raise _invalid(name, f"unknown query parameter {name!r}")
        return call_filter(status, workflow_slug, agent_slug, metadata, created_after, created_before, test)

    return dependency


def call_filter(
    status: list[str] | None,
    workflow_slug: str | None,
    agent_slug: str | None,
    metadata: dict[str, set[str]],
    created_after: datetime | None,
    created_before: datetime | None,
    test: bool | None,
) -> CallFilter:
    """The listing's filter from its parameters (the API's query and the console's form), or a 400
    naming what is wrong."""
    if "" in metadata:
        raise _invalid(_METADATA, "metadata filters are metadata.<key>=<value>; the key is missing")
    statuses = {s.strip() for value in status or () for s in value.split(",") if s.strip()}
    if status is not None and not statuses:
        raise _invalid("status", "status names no status")
    if unknown := sorted(statuses - set(calls_index.STATUSES)):
        raise _invalid("status", f"unknown status {unknown[0]!r}; one of {', '.join(calls_index.STATUSES)}")
    after, before = _utc(created_after), _utc(created_before)
    if after is not None and before is not None and before <= after:
        raise _invalid("created_before", "created_before must be later than created_after")
    return CallFilter(
        statuses=frozenset(statuses),
        workflow_slug=workflow_slug,
        agent_slug=agent_slug,
        metadata={k: frozenset(v) for k, v in metadata.items()},
        created_after=after,
        created_before=before,
        test=test,
    )


def _utc(moment: datetime | None) -> datetime | None:
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=timezone.utc)


_METADATA_DOC = (
    " Filter on metadata with `metadata.<key>=<value>` (any number; exact equality with the value as"
    " text, JSON for non-strings; repeat a key for any of several values)."
)

# Declared before /calls/{call_id}, which would otherwise take "export" for a call id.


@router.get(
    "/calls",
    response_model=CallPage,
    responses=responses(400, 401, 403, 429, 503),
    summary="List calls, newest first",
    description="The key's tenant's calls in the stream's retention (7 days), newest first, a page at a"
                " time: pass `next_cursor` back as `cursor`. Calls queued after the first page come"
                " before it, so paging on never skips or repeats a call." + _METADATA_DOC,
)
async def list_calls(
    request: Request,
    principal: Annotated[Principal, Depends(require_scope("calls:read"))],
    which: Annotated[CallFilter, Depends(filters("limit", "cursor"))],
    limit: Annotated[int, Query(ge=1, le=500, description="Calls per page.")] = 50,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page.")] = None,
) -> CallPage:
    return await list_page(service_of(request), principal.tenant, which, limit, cursor)


async def list_page(svc: IngestService, tenant: str, which: CallFilter, limit: int, cursor: str | None,
                    with_transcripts: bool = True) -> CallPage:
    """One page of the tenant's calls below `cursor` (the API's listing and the console's, which shows
    no transcript in its list and so reads none)."""
    try:
        below = calls_index.decode_cursor(cursor) if cursor is not None else None
    except ValueError as exc:
        raise _invalid("cursor", str(exc)) from None
    try:
        found = await calls_index.page(svc.table, svc.js, svc.tracker.store, tenant, which, limit, below)
        states = (await asyncio.gather(*(transcripts.filled(svc.js, f.state) for f in found.calls))
                  if with_transcripts else [f.state for f in found.calls])
    except (NatsError, TimeoutError, sqlite3.Error) as exc:
        raise unreadable(svc, exc) from exc
    return CallPage(
        data=[record(f.call, state) for f, state in zip(found.calls, states)],
        next_cursor=calls_index.encode_cursor(found.next_below) if found.next_below is not None else None,
    )


_EXPORT_TYPES = {"csv": "text/csv; charset=utf-8", "jsonl": "application/x-ndjson"}


@router.get(
    "/calls/export",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "Every matching call, streamed. CSV: a header row, then one row per call with"
                           f" {', '.join(CSV_COLUMNS)} and one metadata.<key> column per metadata key."
                           " JSON Lines: one CallRecord per line.",
            "content": {"text/csv": {"schema": {"type": "string"}},
                        "application/x-ndjson": {"schema": {"type": "string"}}},
        },
        **responses(400, 401, 403, 429, 503),
    },
    summary="Export calls as CSV or JSON Lines",
    description="All of the key's tenant's calls that match the filters, newest first, as a download."
                + _METADATA_DOC,
)
async def export_calls(
    request: Request,
    principal: Annotated[Principal, Depends(require_scope("calls:read"))],
    which: Annotated[CallFilter, Depends(filters("format"))],
    format_: Annotated[Literal["csv", "jsonl"], Query(alias="format", description="csv or jsonl.")] = "csv",
) -> StreamingResponse:
    return await export(service_of(request), principal.tenant, which, format_)


async def export(svc: IngestService, tenant: str, which: CallFilter, format_: Literal["csv", "jsonl"]) -> StreamingResponse:
    """Every call of the tenant that passes `which`, as a download (the API's export and the console's)."""
    try:
        # One snapshot for the whole export: calls queued while it streams are not in it.
        below = await svc.table.caught_up(svc.js)
        # CSV's header needs every metadata key before the first row: one indexed query finds them
        # (buffering rows instead would hold the whole export in memory, and one JSON metadata
        # column would not give analysts a column per key). It runs before the response starts so
        # that NATS being down is still a 503, not a cut-off file.
        keys = await svc.table.metadata_keys(tenant, which, below) if format_ == "csv" else []
    except (NatsError, TimeoutError, sqlite3.Error) as exc:
        raise unreadable(svc, exc) from exc
    found = calls_index.find(svc.table, svc.tracker.store, tenant, which, below)
    body = _csv(found, keys) if format_ == "csv" else _jsonl(svc, found)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return StreamingResponse(
        body,
        media_type=_EXPORT_TYPES[format_],
        headers={"Content-Disposition": f'attachment; filename="calls-{tenant}-{stamp}.{format_}"'},
    )


# Both formats are sent in chunks of about _FLUSH_BYTES as the calls are read. An error while
# streaming aborts the response (no final chunk), so a client sees a failed download rather than a
# short file that looks complete.


async def _csv(found: AsyncIterator[Found], keys: list[str]) -> AsyncIterator[bytes]:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([*CSV_COLUMNS, *(_METADATA + k for k in keys)])
    async for item in found:
        writer.writerow(csv_row(record(item.call, item.state), keys))
        if buffer.tell() >= _FLUSH_BYTES:
            yield buffer.getvalue().encode()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue().encode()


async def _jsonl(svc: IngestService, found: AsyncIterator[Found]) -> AsyncIterator[bytes]:
    buffer = bytearray()
    async for item in found:
        state = await transcripts.filled(svc.js, item.state)  # CSV has no transcript column
        buffer += record(item.call, state).model_dump_json().encode() + b"\n"
        if len(buffer) >= _FLUSH_BYTES:
            yield bytes(buffer)
            buffer.clear()
    yield bytes(buffer)


def csv_row(call: CallRecord, keys: list[str]) -> list[str]:
    def text(value: object) -> str:
        if value is None:
            return ""
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, datetime):
            return value.isoformat()
        return str(value)

    fixed = [
        call.call_id, call.created_at, call.status, call.workflow_slug, call.agent_slug, call.user_id,
        call.phone_number, call.test, call.duration_seconds, call.answered_at, call.ended_at,
        call.error.code if call.error else None, call.error.message if call.error else None, call.end_reason,
        orjson.dumps(call.captured).decode() if call.captured else None,  # JSON: tools define their own fields
    ]
    metadata = [calls_index.metadata_text(call.metadata[k]) if k in call.metadata else "" for k in keys]
    return [*map(text, fixed), *metadata]


CANCELED_BY_API = "canceled_by_api"
_CANCEL_BATCH = 64


@router.post(
    "/calls/cancel",
    response_model=CancelResult,
    responses=responses(400, 401, 403, 429, 503),
    summary="Cancel every not-yet-dialed call matching a filter",
    description="Cancels the key's tenant's pending and scheduled calls that match the filter and were queued"
                " before this request (the listing's filter semantics). Each gets status canceled and a call.canceled"
                " event with end_reason canceled_by_api; a call a dialer claims at the same moment is"
                " either dialed or canceled, never both. Needs calls:create.",
)
async def cancel_calls(
    request: Request,
    principal: Annotated[Principal, Depends(require_scope("calls:create"))],
    body: CancelFilter,
) -> CancelResult:
    svc = service_of(request)
    metadata = {k: frozenset(calls_index.metadata_text(v) for v in (vs if isinstance(vs, list) else [vs]))
                for k, vs in body.metadata.items()}
    which = CallFilter(statuses=frozenset({"pending", "scheduled"}), workflow_slug=body.workflow_slug, agent_slug=body.agent_slug,
                       metadata=metadata, created_after=_utc(body.created_after),
                       created_before=_utc(body.created_before), test=body.test)
    canceled = 0
    try:
        below = await svc.table.caught_up(svc.js)  # calls queued after this request are not its to cancel
        batch: list[calls.CallRequest] = []
        async for found in calls_index.find(svc.table, svc.tracker.store, principal.tenant, which, below):
            batch.append(found.call)
            if len(batch) == _CANCEL_BATCH:
                canceled += await _cancel_all(svc.tracker, batch)
                batch = []
        canceled += await _cancel_all(svc.tracker, batch)
    except (NatsError, TimeoutError, sqlite3.Error) as exc:
        raise unreadable(svc, exc) from exc
    return CancelResult(canceled=canceled)


async def _cancel_all(tracker: CallTracker, batch: list[calls.CallRequest]) -> int:
    done = await asyncio.gather(*(tracker.cancel(call, CANCELED_BY_API) for call in batch))
    return sum(changed for _, changed in done)


@router.post(
    "/calls/{call_id}/cancel",
    response_model=CallRecord,
    responses=responses(401, 403, 404, 409, 429, 503),
    summary="Cancel one call not yet dialed",
    description="A pending or scheduled call becomes canceled (end_reason canceled_by_api) and a call.canceled event is"
                " sent; canceling it again answers the same. A call a dialer has taken (dialing or later)"
                " is 409. Needs calls:create.",
)
async def cancel_call(
    request: Request,
    call_id: str,
    principal: Annotated[Principal, Depends(require_scope("calls:create"))],
) -> CallRecord:
    svc = service_of(request)
    canonical = _canonical(call_id)
    try:
        call = await calls.fetch(svc.js, principal.tenant, canonical)
        if call is None:
            raise _not_found(call_id)
        state, _ = await svc.tracker.cancel(call, CANCELED_BY_API)
    except (NatsError, TimeoutError) as exc:
        raise unavailable(svc) from exc
    if state.status != "canceled":
        raise ApiError(409, "not_cancelable", f"call {canonical} is {state.status}: only a call not yet dialed"
                       " can be canceled", "call_id")
    return record(call, state)


def _not_found(call_id: str) -> ApiError:
    return ApiError(404, "not_found", f"call {call_id!r} not found", "call_id")


def _canonical(call_id: str) -> str:
    try:
        return str(uuid.UUID(call_id))  # also keeps subject wildcards out of the lookup
    except ValueError:
        raise _not_found(call_id) from None


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
    return await read_call(service_of(request), principal.tenant, call_id)


async def read_call(svc: IngestService, tenant: str, call_id: str) -> CallRecord:
    """One call of the tenant, or a 404 (the API's and the console's)."""
    canonical = _canonical(call_id)
    try:
        call = await calls.fetch(svc.js, tenant, canonical)
        state = await svc.tracker.store.get(tenant, canonical) if call is not None else None
        state = await transcripts.filled(svc.js, state)
    except (NatsError, TimeoutError) as exc:
        raise unavailable(svc) from exc
    if call is None:
        raise _not_found(call_id)
    return record(call, state)


def unreadable(svc: IngestService, exc: Exception) -> ApiError:
    """A read of calls that could not be answered: the index still catching up (a process just
    started on a big week) or NATS unreachable."""
    if isinstance(exc, calls_table.Behind):
        return ApiError(503, "unavailable", f"{exc}; retry shortly",
                        headers={"Retry-After": str(svc.settings.retry_after_seconds)})
    return unavailable(svc)


def record(call: calls.CallRequest, state: CallState | None) -> CallRecord:
    """The request as queued plus what has happened to it since (pending until a dialer takes it)."""
    call = calls_index.waiting_call(call, state)
    base = call.model_dump(include=set(CallRecord.model_fields))
    status = calls_index.status_of(call, state)
    if state is None:
        return CallRecord(**{**base, "status": status}, events=[TimelineEntry(status=status, at=call.created_at)])
    progress = state.model_dump(include={"provider", "answered_at", "ended_at", "duration_seconds", "error", "events",
                                         "transcript", "captured", "end_reason", "attempt", "answered_by", "deferrals"})
    return CallRecord(**{**base, **progress, "status": status}, attempts=[a.model_dump() for a in state.all_attempts],
                      next_attempt_at=state.next_attempt_at if state.status == "pending" else None,
                      voicemail_message=state.voicemail_message)
