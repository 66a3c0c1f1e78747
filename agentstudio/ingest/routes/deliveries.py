"""Dead-lettered webhook deliveries of the key's tenant: list them a page at a time, replay one or a
subscription's in bulk (scope webhooks:manage)."""

from __future__ import annotations

import asyncio
import base64
import re
from contextlib import aclosing
from datetime import datetime, timezone
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Query, Request
from nats.errors import Error as NatsError
from nats.js.errors import KeyNotFoundError
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from agentstudio import bus
from agentstudio.ingest.auth import Principal, require_scope, service_of, unavailable
from agentstudio.ingest.errors import ApiError, responses
from agentstudio.ingest.service import IngestService

router = APIRouter(prefix="/api/v1/webhooks/dead-letters", tags=["webhooks"])
Manager = Annotated[Principal, Depends(require_scope("webhooks:manage"))]

# A subscription is a resource name: one key token, never a wildcard.
_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_EVENT_ID = r"[-_=A-Za-z0-9]+"
PAGE_DEFAULT, PAGE_MAX = 50, 500
REPLAY_DEFAULT, REPLAY_MAX = 500, 1000
_REPLAY_BATCH = 64  # replays in flight at once


class DeadLetter(BaseModel):
    subscription: str
    event_id: str
    event_type: str
    call_id: str
    attempts: int
    last_error: str
    failed_at: float = Field(description="Unix time of the last attempt.")
    event: dict[str, Any] = Field(description="The event body as it was sent.")


class DeadLetters(BaseModel):
    """One page of dead letters, oldest first."""

    data: list[DeadLetter]
    next_cursor: str | None = Field(
        description="Pass as `cursor` to get the next (newer) page; null on the last page. Opaque.")


class Replayed(BaseModel):
    replayed: str


class BulkReplay(BaseModel):
    """Which dead letters to deliver again: those of one subscription, narrowed by the others given."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"subscription": "results"},
                                        {"subscription": "results", "event_type": "call.completed",
                                         "failed_before": "2026-03-02T06:00:00Z", "limit": 200}]},
    )

    subscription: str = Field(pattern=_NAME, description="The subscription whose receiver is back up.")
    event_type: str | None = Field(None, min_length=1, description="Only events of this type, e.g. call.completed.")
    failed_before: datetime | None = Field(
        None, description="ISO 8601; only those whose last attempt was before it (UTC when no offset is given).")
    limit: int = Field(REPLAY_DEFAULT, ge=1, le=REPLAY_MAX, description="At most this many in this request.")

    @field_validator("failed_before", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        # pydantic would read a number as Unix time, as the calls' cancel filter found.
        if value is not None and not isinstance(value, str):
            raise PydanticCustomError("datetime_type", "must be an ISO 8601 date-time string")
        return value


class BulkReplayed(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"queued": 500, "more": True}]})

    queued: int = Field(description="Dead letters this request queued again (and removed from the list).")
    more: bool = Field(description="true: more match; send the same request again for the next ones.")


def _invalid(field: str, message: str) -> ApiError:
    return ApiError(400, "invalid_request", message, field)


def encode_cursor(after: int) -> str:
    return base64.urlsafe_b64encode(orjson.dumps({"after": after})).rstrip(b"=").decode()


def decode_cursor(cursor: str) -> int:
    """The bucket sequence a cursor continues after; ValueError for anything we did not issue."""
    try:
        after = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))["after"]
    except (ValueError, TypeError, KeyError) as exc:  # bad base64 or JSON are ValueErrors
        raise ValueError("not a cursor this API issued") from exc
    if not isinstance(after, int) or isinstance(after, bool) or after < 1:
        raise ValueError("not a cursor this API issued")
    return after


_LIST_PARAMS = frozenset({"subscription", "limit", "cursor"})


@router.get(
    "",
    response_model=DeadLetters,
    responses=responses(400, 401, 403, 429, 503),
    summary="Webhook deliveries that exhausted their retries, oldest first",
    description="The key's tenant's dead letters in the order they were dead-lettered, oldest first, a page"
                " at a time: pass `next_cursor` back as `cursor`. Ones dead-lettered after the first page come"
                " on later pages; replayed ones leave the list, so paging on never repeats one. Replay them"
                " one by one or all of a subscription's with POST /api/v1/webhooks/dead-letters/replay.",
)
async def list_dead_letters(
    request: Request,
    principal: Manager,
    subscription: Annotated[str | None, Query(pattern=_NAME, description="Only this subscription's.",
                                              examples=["results"])] = None,
    limit: Annotated[int, Query(ge=1, le=PAGE_MAX, description="Dead letters per page.")] = PAGE_DEFAULT,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page.")] = None,
) -> DeadLetters:
    for name in request.query_params:
        if name not in _LIST_PARAMS:
            raise _invalid(name, f"unknown query parameter {name!r}")
    return await dead_letters(service_of(request), principal.tenant, subscription, limit, cursor)


def _prefix(tenant: str, subscription: str | None) -> str:
    """The key prefix read; the console passes the subscription unchecked, and a dot or wildcard in it
    would read other keys."""
    if subscription is None:
        return f"{tenant}."
    if not re.fullmatch(_NAME, subscription):
        raise _invalid("subscription", f"{subscription!r} is not a subscription name")
    return f"{tenant}.{subscription}."


async def dead_letters(svc: IngestService, tenant: str, subscription: str | None = None,
                       limit: int = PAGE_DEFAULT, cursor: str | None = None) -> DeadLetters:
    """One page of the tenant's dead letters after `cursor`, oldest first (the API's list and the console's)."""
    try:
        after = decode_cursor(cursor) if cursor is not None else 0
    except ValueError as exc:
        raise _invalid("cursor", str(exc)) from None
    prefix = _prefix(tenant, subscription)
    page: list[tuple[DeadLetter, int]] = []
    more = False
    try:
        await bus.ensure_webhooks(svc.js)
        # One past the page says whether there is a next one.
        async with aclosing(bus.kv_after(svc.js, bus.DEAD_LETTER_BUCKET, prefix, after,
                                         batch=limit + 1)) as found:
            async for _, value, revision in found:
                if len(page) == limit:
                    more = True
                    break
                page.append((_letter(orjson.loads(value)), revision))
    except (NatsError, TimeoutError) as exc:
        raise unavailable(svc) from exc
    return DeadLetters(data=[letter for letter, _ in page], next_cursor=encode_cursor(page[-1][1]) if more else None)


@router.post("/{subscription}/{event_id}/replay", response_model=Replayed, status_code=202,
             responses=responses(401, 403, 404, 429, 503), summary="Deliver a dead-lettered event again")
async def replay(request: Request, subscription: str, event_id: str, principal: Manager) -> Replayed:
    """Queued again for the subscription, with the same webhook-id, and removed from the list."""
    await replay_dead_letter(service_of(request), principal.tenant, subscription, event_id)
    return Replayed(replayed=event_id)


async def replay_dead_letter(svc: IngestService, tenant: str, subscription: str, event_id: str) -> None:
    """Deliver a dead letter again (the API's replay and the console's), or a 404."""
    not_found = ApiError(404, "not_found", f"no dead letter {event_id!r} for {subscription!r}", "event_id")
    # Only what a key token can hold: a dot or wildcard would name other keys, and any other character
    # is no valid key (the bucket refuses it; that is no outage).
    if not re.fullmatch(_NAME, subscription) or not re.fullmatch(_EVENT_ID, event_id):
        raise not_found
    try:
        dead, _ = await bus.ensure_webhooks(svc.js)
        key = bus.dead_letter_key(tenant, subscription, event_id)
        try:
            entry = await dead.get(key)
        except KeyNotFoundError:
            raise not_found from None
        if not entry.value:
            raise not_found
        await _replay(svc, tenant, key, orjson.loads(entry.value), entry.revision)
    except (NatsError, TimeoutError) as exc:
        raise unavailable(svc) from exc


@router.post(
    "/replay",
    response_model=BulkReplayed,
    status_code=202,
    responses=responses(400, 401, 403, 429, 503),
    summary="Deliver a subscription's dead letters again, in bulk",
    description="Queues again, oldest first, up to `limit` of the subscription's dead letters that match, each"
                " as the single replay does: with its webhook-id, and removed from the list. `more` true:"
                " send the same request again for the next ones. Safe to retry: a request cut off half way"
                " queued and removed some; the next one queues the rest, and one queued but not yet removed"
                " is queued again under the same message id, which the queue drops as a duplicate.",
)
async def replay_many(request: Request, principal: Manager, body: BulkReplay) -> BulkReplayed:
    before = body.failed_before
    if before is not None and before.tzinfo is None:
        before = before.replace(tzinfo=timezone.utc)
    return await replay_dead_letters(service_of(request), principal.tenant, body.subscription, body.event_type,
                                     before.timestamp() if before is not None else None, body.limit)


async def replay_dead_letters(svc: IngestService, tenant: str, subscription: str, event_type: str | None,
                              failed_before: float | None, limit: int) -> BulkReplayed:
    """Deliver up to `limit` of a subscription's dead letters again (the API's bulk replay and the console's)."""
    prefix = _prefix(tenant, subscription)
    picked: list[tuple[str, dict[str, Any], int]] = []
    more = False
    try:
        await bus.ensure_webhooks(svc.js)
        async with aclosing(bus.kv_after(svc.js, bus.DEAD_LETTER_BUCKET, prefix, batch=min(limit + 1, 512))) as found:
            async for key, value, revision in found:
                record = orjson.loads(value)
                if event_type is not None and record["event"]["type"] != event_type:
                    continue
                if failed_before is not None and record["failed_at"] >= failed_before:
                    continue
                if len(picked) == limit:
                    more = True
                    break
                picked.append((key, record, revision))
        for i in range(0, len(picked), _REPLAY_BATCH):
            await asyncio.gather(*(_replay(svc, tenant, *one) for one in picked[i:i + _REPLAY_BATCH]))
    except (NatsError, TimeoutError) as exc:
        raise unavailable(svc) from exc
    return BulkReplayed(queued=len(picked), more=more)


async def _replay(svc: IngestService, tenant: str, key: str, record: dict[str, Any], revision: int) -> None:
    """Queue the event again, then take it off the list. The message id names the dead letter's revision:
    a retry after the publish but before the removal is dropped by the stream as a duplicate, and an event
    dead-lettered again later (a new revision) can be replayed again."""
    event = record["event"]
    subscription = record["subscription"]
    await svc.js.publish(
        bus.delivery_subject(tenant, subscription), orjson.dumps(event),
        stream=bus.WEBHOOKS_STREAM, headers={"Nats-Msg-Id": f"{event['id']}.{subscription}.replay.{revision}"},
    )
    await bus.kv_remove(svc.js, bus.DEAD_LETTER_BUCKET, key, revision)


def _letter(record: dict[str, Any]) -> DeadLetter:
    event = record["event"]
    return DeadLetter(subscription=record["subscription"], event_id=event["id"], event_type=event["type"],
                      call_id=event["data"]["call_id"], attempts=record["attempts"],
                      last_error=record["last_error"], failed_at=record["failed_at"], event=event)
