"""Dead-lettered webhook deliveries of the key's tenant: list them, replay one (scope webhooks:manage)."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Request
from nats.errors import Error as NatsError
from nats.js.errors import KeyNotFoundError
from pydantic import BaseModel, Field

from agentstudio import bus
from agentstudio.ingest.auth import Principal, require_scope, service_of, unavailable
from agentstudio.ingest.errors import ApiError, responses
from agentstudio.ingest.service import IngestService

router = APIRouter(prefix="/api/v1/webhooks/dead-letters", tags=["webhooks"])
Manager = Annotated[Principal, Depends(require_scope("webhooks:manage"))]


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
    data: list[DeadLetter]


class Replayed(BaseModel):
    replayed: str


@router.get("", response_model=DeadLetters, responses=responses(401, 403, 429, 503),
            summary="Webhook deliveries that exhausted their retries")
async def list_dead_letters(request: Request, principal: Manager) -> DeadLetters:
    return DeadLetters(data=await dead_letters(service_of(request), principal.tenant))


async def dead_letters(svc: IngestService, tenant: str) -> list[DeadLetter]:
    """The tenant's dead-lettered deliveries (the API's list and the console's)."""
    try:
        dead, _ = await bus.ensure_webhooks(svc.js)
        records = []
        for key in await bus.kv_keys(svc.js, bus.DEAD_LETTER_BUCKET, f"{tenant}."):
            try:
                entry = await dead.get(key)
            except KeyNotFoundError:  # replayed (deleted) since
                continue
            if entry.value:
                records.append(orjson.loads(entry.value))
    except (NatsError, TimeoutError) as exc:
        raise unavailable(svc) from exc
    return [_letter(r) for r in records]


@router.post("/{subscription}/{event_id}/replay", response_model=Replayed, status_code=202,
             responses=responses(401, 403, 404, 429, 503), summary="Deliver a dead-lettered event again")
async def replay(request: Request, subscription: str, event_id: str, principal: Manager) -> Replayed:
    """Queued again for the subscription, with the same webhook-id, and removed from the list."""
    await replay_dead_letter(service_of(request), principal.tenant, subscription, event_id)
    return Replayed(replayed=event_id)


async def replay_dead_letter(svc: IngestService, tenant: str, subscription: str, event_id: str) -> None:
    """Deliver a dead letter again (the API's replay and the console's), or a 404."""
    not_found = ApiError(404, "not_found", f"no dead letter {event_id!r} for {subscription!r}", "event_id")
    if "." in subscription or "." in event_id or "*" in subscription + event_id or ">" in subscription + event_id:
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
        record = orjson.loads(entry.value)
        await svc.js.publish(
            bus.delivery_subject(tenant, subscription), orjson.dumps(record["event"]),
            stream=bus.WEBHOOKS_STREAM, headers={"Nats-Msg-Id": f"{event_id}.{subscription}.replay.{entry.revision}"},
        )
        await dead.delete(key)
    except (NatsError, TimeoutError) as exc:
        raise unavailable(svc) from exc


def _letter(record: dict[str, Any]) -> DeadLetter:
    event = record["event"]
    return DeadLetter(subscription=record["subscription"], event_id=event["id"], event_type=event["type"],
                      call_id=event["data"]["call_id"], attempts=record["attempts"],
                      last_error=record["last_error"], failed_at=record["failed_at"], event=event)
