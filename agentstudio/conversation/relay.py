"""Twilio ConversationRelay: the WebSocket the dialer's TwiML connects each answered call to.

Twilio does speech-to-text and text-to-speech and exchanges JSON text frames with us: it sends
setup, prompt, interrupt, dtmf and error; we send text tokens, language and end. The setup's
callSid must be the call record's provider call id, or the socket is closed (policy violation).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from twilio.request_validator import RequestValidator

from agentstudio.conversation.runtime import Refused, VoiceRuntime

log = logging.getLogger("agentstudio.relay")
router = APIRouter(tags=["conversation"])

RELAY_PATH = "/api/v1/relay"
SETUP_TIMEOUT_SECONDS = 10.0
POLICY_VIOLATION = 1008


def relay_url(public_base_url: str) -> str:
    """Where Twilio (or the simulated line) opens the relay WebSocket."""
    base = public_base_url.rstrip("/")
    return base.replace("https://", "wss://", 1).replace("http://", "ws://", 1) + RELAY_PATH


class RelayVoice:
    """Our side of the protocol. A frame to a socket that is already gone is dropped: the
    conversation learns of the hang-up from the reader."""

    def __init__(self, ws: WebSocket) -> None:
        self._ws = ws

    async def _send(self, message: dict[str, Any]) -> None:
        try:
            await self._ws.send_text(orjson.dumps(message).decode())
        except (WebSocketDisconnect, RuntimeError):
            pass

    async def text(self, token: str, last: bool) -> None:
        await self._send({"type": "text", "token": token, "last": last})

    async def language(self, code: str) -> None:
        await self._send({"type": "language", "ttsLanguage": code, "transcriptionLanguage": code})

    async def end(self, data: dict[str, Any]) -> None:
        await self._send({"type": "end", "handoffData": orjson.dumps(data).decode()})


def signed_by_twilio(ws: WebSocket, runtime: VoiceRuntime) -> bool:
    """Twilio signs the upgrade request (X-Twilio-Signature) over the wss:// URL it was given, with the
    query string's parameters as the signed parameters; without an auth token configured (a local
    run) only the call sid check applies."""
    if not runtime.twilio_auth_token:
        return True
    signature = ws.headers.get("x-twilio-signature", "")
    url = relay_url(runtime.public_base_url)
    params = dict(ws.query_params)
    return bool(signature) and RequestValidator(runtime.twilio_auth_token).validate(url, params, signature)


@router.websocket(RELAY_PATH)
async def relay(ws: WebSocket) -> None:
    runtime: VoiceRuntime = ws.app.state.voice
    await ws.accept()
    if not signed_by_twilio(ws, runtime):
        log.warning("relay refused: missing or invalid X-Twilio-Signature")
        runtime.metrics.refused.inc()
        await _close(ws, "missing or invalid X-Twilio-Signature")
        return
    try:
        setup = orjson.loads(await asyncio.wait_for(ws.receive_text(), SETUP_TIMEOUT_SECONDS))
    except (TimeoutError, orjson.JSONDecodeError, WebSocketDisconnect, KeyError):
        await _close(ws, "expected a setup message")
        return
    params = (setup.get("customParameters") or {}) if isinstance(setup, dict) else None
    if not isinstance(setup, dict) or setup.get("type") != "setup" or not isinstance(params, dict):
        await _close(ws, "expected a setup message")
        return
    call_id, tenant = str(params.get("call_id", "")), str(params.get("tenant", ""))
    try:
        session = await runtime.open(tenant, call_id, str(setup.get("callSid") or ""), RelayVoice(ws))
    except Refused as exc:
        log.warning("relay refused", extra={"call_id": call_id, "tenant": tenant, "reason": str(exc)})
        runtime.metrics.refused.inc()
        await _close(ws, str(exc))
        return
    conversation = session.conversation
    try:
        await conversation.start()
        while True:
            try:
                message = orjson.loads(await ws.receive_text())
            except (orjson.JSONDecodeError, KeyError):  # an invalid or binary frame is dropped, as Twilio does
                continue
            kind = message.get("type") if isinstance(message, dict) else None
            if kind == "prompt" and message.get("last", True) is not False:
                await conversation.prompt(str(message.get("voicePrompt") or ""))
            elif kind == "interrupt":
                await conversation.interrupt(str(message.get("utteranceUntilInterrupt") or ""))
            elif kind == "dtmf":
                await conversation.dtmf(str(message.get("digit") or ""))
            elif kind == "error":
                log.warning("relay error from twilio", extra={"call_id": call_id,
                                                              "description": str(message.get("description"))[:500]})
    except WebSocketDisconnect:
        pass
    finally:
        await runtime.close(session)


async def _close(ws: WebSocket, reason: str) -> None:
    try:
        await ws.close(code=POLICY_VIOLATION, reason=reason[:120])
    except RuntimeError:
        pass
