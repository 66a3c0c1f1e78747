"""POST /api/v1/webhooks/ingest: a marketing platform's webhook becomes a durably queued call."""

from __future__ import annotations

import json
import logging
import re
from datetime import datetime, timezone
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Request
from nats.errors import Error as NatsError
from pydantic import ValidationError
from starlette.responses import Response

from agentstudio import call_windows, calls, clock, json_schema, phone, tracing
from agentstudio.bundle import Bundle
from agentstudio.ingest.auth import Principal, require_scope, service_of, unavailable
from agentstudio.ingest.errors import ApiError, responses
from agentstudio.ingest.schemas import CallAccepted, IngestRequest
from agentstudio.ingest.service import IngestService

log = logging.getLogger("agentstudio.ingest")
router = APIRouter(prefix="/api/v1", tags=["calls"])

IDEMPOTENCY_HEADER = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "maxLength": 255},
    "description": "A retry with the same key within 24 h returns the same call_id and queues nothing new.",
}


@router.post(
    "/webhooks/ingest",
    status_code=201,
    response_model=CallAccepted,
    responses={
        200: {
            "model": CallAccepted,
            "description": "Queued, for a key whose successStatus is 200 (the default of platform webengage, "
                           "which counts only 200 as success): the same body as 201.",
        },
        **responses(400, 401, 403, 404, 409, 413, 415, 422, 429, 503),
    },
    openapi_extra={
        # Declared here rather than as a Header() parameter: FastAPI's parameter machinery is a
        # measurable share of this route's time.
        "parameters": [IDEMPOTENCY_HEADER],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": IngestRequest.model_json_schema()}},
        }
    },
    summary="Queue a call from a marketing platform's webhook",
)
async def ingest(
    request: Request,
    principal: Annotated[Principal, Depends(require_scope("calls:create"))],
) -> Response:
    svc = service_of(request)
    idempotency_key = request.headers.get("idempotency-key")
    if idempotency_key is not None and len(idempotency_key) > 255:
        raise ApiError(400, "invalid_header", "Idempotency-Key is longer than 255 characters", "Idempotency-Key")
    body = await _read_json_body(request, svc.settings.max_body_bytes)
    req = _parse(body, principal.key.unfilled)
    bundle = principal.bundle
    if req.workflow_slug:
        workflow = bundle.workflows.get(req.workflow_slug)
        if workflow is None:
            raise ApiError(404, "not_found", f"workflow {req.workflow_slug!r} not found", "workflow_slug")
        if workflow.user_context_schema is not None:
            _check_user_context(workflow.user_context_schema, req.user_context)
    elif req.agent_slug not in bundle.agents:
        raise ApiError(404, "not_found", f"agent {req.agent_slug!r} not found", "agent_slug")
    await _refuse_do_not_call(svc, principal.tenant, req.phone_number)

    now = clock.now()
    scheduled_for = _scheduled_for(req.scheduled_at, now)
    reason = "scheduled_at" if scheduled_for else None
    if (opening := _window_opening(bundle, req, scheduled_for or now)) is not None:
        scheduled_for, reason = call_windows.reachable(opening, now), "calling_hours"
    call = calls.CallRequest(
        call_id=calls.new_call_id(principal.tenant, principal.key.name, idempotency_key or None),
        tenant=principal.tenant,
        api_key=principal.key.name,
        workflow_slug=req.workflow_slug,
        agent_slug=req.agent_slug if not req.workflow_slug else None,
        phone_number=req.phone_number,
        user_id=req.user_id,
        user_context=req.user_context,
        metadata=req.metadata,
        test=principal.key.mode == "test",
        created_at=datetime.now(timezone.utc),
        bundle_version=bundle.version,
        scheduled_for=scheduled_for,
        scheduled_reason=reason,
    )
    tracing.annotate(call_id=call.call_id, tenant=call.tenant, workflow=call.workflow_slug or "",
                     agent=call.agent_slug or "", api_key_name=call.api_key, test=call.test)
    if not svc.connected:
        raise unavailable(svc)
    try:
        new = await calls.enqueue(svc.js, call, svc.settings.publish_timeout_seconds, keyed=bool(idempotency_key))
    except (NatsError, TimeoutError) as exc:
        log.warning("queue unavailable", extra={"tenant": principal.tenant, "error": type(exc).__name__})
        raise unavailable(svc) from exc
    log.info(
        "call queued" if new else "call already queued (idempotent retry)",
        extra={
            "call_id": call.call_id,
            "tenant": call.tenant,
            "api_key": call.api_key,
            "phone": phone.mask(call.phone_number),
            "test": call.test,
        },
    )
    if new:
        svc.usage.accepted(call.tenant, call.api_key)
    headers = {} if new else {"Idempotent-Replayed": "true"}
    answer: dict[str, Any] = {"call_id": call.call_id, "status": "pending"}
    if scheduled_for is not None:
        answer |= {"status": "scheduled", "scheduled_for": scheduled_for.isoformat().replace("+00:00", "Z")}
    return Response(
        orjson.dumps(answer),
        status_code=principal.key.success_status,
        media_type="application/json",
        headers=headers,
    )


def _scheduled_for(at: datetime | None, now: datetime) -> datetime | None:
    """When a call asked to wait may be dialed: None for now (absent or past); at most
    calls.MAX_SCHEDULE_AHEAD ahead, so it fires inside the queue's retention."""
    if at is None or at <= now:
        return None
    if at - now > calls.MAX_SCHEDULE_AHEAD:
        raise ApiError(400, "invalid_request", f"scheduled_at: at most {calls.MAX_SCHEDULE_AHEAD.days} days ahead",
                       "scheduled_at")
    return at.astimezone(timezone.utc)


def _window_opening(bundle: Bundle, req: IngestRequest, at: datetime) -> datetime | None:
    """The opening of the call's calling window after `at`, None when open at `at` (or no policy).
    A window that never opens is a 422: the request is well formed but the tenant's own policy
    forbids it, and a platform must not retry it (it retries 5xx and 429 only)."""
    policy = bundle.policy_for(req.workflow_slug, req.agent_slug)
    try:
        found = call_windows.opening(call_windows.rules_for(policy, req.phone_number), req.phone_number, at)
    except call_windows.NeverOpen as exc:
        name = bundle.policy_name_for(req.workflow_slug, req.agent_slug)
        raise ApiError(422, "no_calling_window", f"phone_number cannot be called under CallPolicy {name!r}: {exc};"
                       " no call was queued", "phone_number") from None
    return found if found > at else None


async def _refuse_do_not_call(svc: IngestService, tenant: str, number: str) -> None:
    """A listed number is a final 409: platforms retry 5xx and 429 but log any other 4xx, and a
    number that asked not to be called must not be queued by a retry either."""
    try:
        listed = await svc.dnc.listed(tenant, number)
    except (NatsError, TimeoutError) as exc:
        raise unavailable(svc) from exc
    if listed:
        log.info("call refused: number on the do-not-call list", extra={"tenant": tenant, "phone": phone.mask(number)})
        raise ApiError(409, "do_not_call", "phone_number is on the do-not-call list; no call was queued", "phone_number")


async def _read_json_body(request: Request, limit: int) -> bytes:
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";", 1)[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise ApiError(415, "unsupported_media_type", "Content-Type must be application/json", "Content-Type")
    declared = request.headers.get("content-length")
    too_large = ApiError(413, "payload_too_large", f"body is larger than {limit} bytes")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


_FIRST = {"both_slugs": 0}  # a 422 is only reported when nothing else is wrong


def _parse(body: bytes, unfilled: re.Pattern[str] | None) -> IngestRequest:
    try:
        req = IngestRequest.model_validate_json(body, context={"unfilled": unfilled} if unfilled is not None else None)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        error = min(errors, key=lambda e: _FIRST.get(e["type"], 1))
        raise _to_api_error(error) from None
    if (repeated := _repeated_key(body)) is not None:
        raise ApiError(400, "duplicate_key", f"{repeated} appears more than once in its object", repeated)
    return req


class _Repeating(dict[str, Any]):
    """A JSON object of the body in which `key` appears more than once."""

    key = ""


def _repeated_key(body: bytes) -> str | None:
    """The path of the first key repeated within one object of `body`, which pydantic took as valid.
    A parser keeps the last of repeated keys and another the first, so a body that holds two values
    for one field is refused rather than read one way here and another by whoever sent it."""
    found = False

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal found
        obj = dict(items)
        if len(obj) == len(items):
            return obj
        found = True
        repeating = _Repeating(obj)
        seen: set[str] = set()
        repeating.key = next(k for k, _ in items if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        return repeating

    def find(value: Any, path: list[str]) -> str | None:
        if isinstance(value, list):
            return next((f for i, v in enumerate(value) if (f := find(v, [*path, str(i)])) is not None), None)
        if not isinstance(value, dict):
            return None
        if isinstance(value, _Repeating):
            return ".".join([*path, value.key])
        return next((f for k, v in value.items() if (f := find(v, [*path, k])) is not None), None)

    parsed = json.loads(body, object_pairs_hook=pairs)
    return find(parsed, []) if found else None


def _to_api_error(error: Any) -> ApiError:
    kind = error["type"]
    loc = [str(p) for p in error["loc"]]
    field = ".".join(loc) or None
    if kind == "json_invalid":
        # pydantic's reason says where (line and column) and what: bad UTF-8, nesting past its limit, ...
        return ApiError(400, "invalid_json", f"body is not valid JSON: {error.get('ctx', {}).get('error', error['msg'])}")
    if kind in ("model_type", "model_attributes_type") and not loc:
        return ApiError(400, "invalid_body", "body must be a JSON object")
    if kind == "both_slugs":
        return ApiError(422, "conflicting_fields", error["msg"], "workflow_slug")
    if kind in ("missing", "missing_slug"):
        field = field or "workflow_slug"
        return ApiError(400, "missing_field", f"{field} is required" if kind == "missing" else error["msg"], field)
    if kind == "extra_forbidden":
        return ApiError(400, "unknown_field", f"unknown field {field}", field)
    if kind == "phone_number":
        return ApiError(400, "invalid_phone_number", f"phone_number: {error['msg']}", "phone_number")
    if kind == "dict_type":
        return ApiError(400, "invalid_field", f"{field} must be a JSON object", field)
    return ApiError(400, "invalid_field", f"{field}: {error['msg']}", field)


def _check_user_context(schema: dict[str, Any], user_context: dict[str, Any]) -> None:
    violation = json_schema.compiled(schema).violation(user_context)
    if violation is not None:
        field = ".".join(["user_context", *violation.path])
        raise ApiError(400, "invalid_user_context", f"{field}: {violation.message}", field)
