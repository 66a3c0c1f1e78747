"""Twilio's requests to us, each signature-checked: call status callbacks (mapped onto the call state
machine; duplicates and out-of-order callbacks change nothing wrongly), the async answering-machine
detection verdict (a machine: queued for the dialers to hang up or leave the policy's message), and
the `<Connect action>` request when a ConversationRelay session ends (hang up, or dial the human of a
transfer)."""

from __future__ import annotations

import logging
import re
from urllib.parse import parse_qsl

import orjson
from fastapi import APIRouter, Request
from nats.errors import Error as NatsError
from starlette.responses import Response
from twilio.request_validator import RequestValidator
from twilio.twiml.voice_response import VoiceResponse

from agentstudio import bus
from agentstudio.callstate import CallError
from agentstudio.ingest.auth import service_of, unavailable
from agentstudio.resources import E164_PATTERN
from agentstudio.ingest.errors import ApiError, responses
from agentstudio.settings import Settings
from agentstudio.twilio_callbacks import (AMD_CALLBACK_PATH, RELAY_ENDED_PATH, STATUS_CALLBACK_PATH, TWILIO_STATUS,
                                          MachineVerdict)

log = logging.getLogger("agentstudio.ingest")
router = APIRouter(tags=["providers"])


async def _verified_form(request: Request, settings: Settings) -> dict[str, str]:
    """Twilio's form parameters, once X-Twilio-Signature proves Twilio sent them (else 403)."""
    # Twilio posts application/x-www-form-urlencoded; the stdlib parses it (no multipart needed).
    params = dict(parse_qsl((await request.body()).decode("utf-8", "replace"), keep_blank_values=True))
    url = settings.public_base_url.rstrip("/") + request.url.path
    if request.url.query:
        url += "?" + request.url.query
    signature = request.headers.get("x-twilio-signature", "")
    if not signature or not settings.twilio_auth_token or not RequestValidator(
        settings.twilio_auth_token
    ).validate(url, params, signature):
        raise ApiError(403, "forbidden", "missing or invalid X-Twilio-Signature", "X-Twilio-Signature")
    return params


@router.post(
    STATUS_CALLBACK_PATH,
    status_code=204,
    responses=responses(400, 403, 503),
    summary="Twilio call status callback (X-Twilio-Signature checked)",
)
async def twilio_status(request: Request) -> Response:
    svc = service_of(request)
    params = await _verified_form(request, svc.settings)
    call_id, tenant = request.query_params.get("call_id"), request.query_params.get("tenant")
    status = TWILIO_STATUS.get(params.get("CallStatus", ""))
    if not call_id or not tenant or status is None:
        raise ApiError(400, "invalid_callback", "callback without call_id, tenant or a known CallStatus")
    error = None
    if status == "failed":
        code = params.get("ErrorCode") or params.get("SipResponseCode") or "unknown"
        error = CallError(code=f"twilio_{code}", message=params.get("ErrorMessage") or "the call failed")
    duration = int(params["CallDuration"]) if params.get("CallDuration", "").isdigit() else None
    try:
        await svc.tracker.advance(tenant, call_id, status, error=error, duration_seconds=duration,
                                  provider_call_id=params.get("CallSid") or None,
                                  detail=f"twilio {params.get('CallStatus')} #{params.get('SequenceNumber', '?')}")
    except (NatsError, TimeoutError) as exc:
        raise unavailable(svc) from exc  # Twilio retries on 5xx
    return Response(status_code=204)


@router.post(
    AMD_CALLBACK_PATH,
    status_code=204,
    responses=responses(400, 403, 503),
    summary="Twilio's async answering-machine detection verdict (X-Twilio-Signature checked)",
)
async def twilio_amd(request: Request) -> Response:
    """AnsweredBy for the attempt Twilio placed as CallSid. A machine, under a voicemail policy (the
    call was placed with AMD only then), is recorded on the call and queued for the dialers, which
    redirect the call: hung up, or the policy's message said and then hung up. Ingest holds no Twilio
    credential for that and reaches nothing but NATS. The call's outcome is then voicemail, decided
    when it completes."""
    svc = service_of(request)
    params = await _verified_form(request, svc.settings)
    call_id, tenant = request.query_params.get("call_id"), request.query_params.get("tenant")
    sid, answered_by = params.get("CallSid", ""), params.get("AnsweredBy", "")
    if not call_id or not tenant or not sid or not answered_by:
        raise ApiError(400, "invalid_callback", "callback without call_id, tenant, CallSid or AnsweredBy")
    verdict = MachineVerdict(tenant=tenant, call_id=call_id, provider_call_id=sid, answered_by=answered_by)
    try:
        state, _ = await svc.tracker.store.change(
            tenant, call_id,
            lambda s: s.machine_answered(answered_by) if s is not None and s.provider_call_id in (None, sid)
            and s.attempt_of(sid) is None else None)
        # Decided on the record, not on whether this request changed it: a verdict recorded by a try
        # answered 503 is queued when Twilio sends it again; the message id queues it once.
        if verdict.due(state):
            await svc.js.publish(bus.voicemail_subject(tenant, call_id), verdict.model_dump_json().encode(),
                                 stream=bus.VOICEMAIL_STREAM, headers={"Nats-Msg-Id": f"{call_id}.{sid}"})
            log.info("machine answered", extra={"call_id": call_id, "tenant": tenant, "answered_by": answered_by})
    except (NatsError, TimeoutError) as exc:
        raise unavailable(svc) from exc  # Twilio retries on 5xx
    return Response(status_code=204)  # a person (the agent goes on), or an earlier attempt's verdict


@router.post(
    RELAY_ENDED_PATH,
    responses=responses(403),
    summary="Twilio's <Connect action>: the ConversationRelay session ended (X-Twilio-Signature checked)",
)
async def twilio_relay_ended(request: Request) -> Response:
    """What the call does after the agent: connect a human (a transfer), else hang up. A session that
    failed (SessionStatus=failed with an ErrorCode, e.g. 64102 when Twilio could not open our
    WebSocket) fails the call, so it is not hung up and later recorded as if it had gone well."""
    svc = service_of(request)
    params = await _verified_form(request, svc.settings)
    call_id, tenant = request.query_params.get("call_id"), request.query_params.get("tenant")
    if params.get("SessionStatus") == "failed" and call_id and tenant:
        code = params.get("ErrorCode") or "unknown"
        error = CallError(code=f"twilio_{code}", message=params.get("ErrorMessage") or "the relay session failed")
        try:
            await svc.tracker.advance(tenant, call_id, "failed", error=error, end_reason="relay_failed",
                                      provider_call_id=params.get("CallSid") or None,
                                      detail=f"twilio relay session failed ({code})")
        except (NatsError, TimeoutError):
            # The call still ends (below); its final status callback records it, without the cause.
            log.exception("relay failure not recorded", extra={"call_id": call_id, "tenant": tenant})
    try:
        data = orjson.loads(params.get("HandoffData") or "{}")
    except orjson.JSONDecodeError:
        data = {}
    response = VoiceResponse()
    number = data.get("transfer_to") if isinstance(data, dict) else None
    if data.get("reason") == "transfer" and isinstance(number, str) and re.fullmatch(E164_PATTERN, number):
        response.dial(number)
    else:
        response.hangup()
    return Response(str(response), media_type="application/xml")
