"""A simulated phone line: Twilio ConversationRelay's side of the WebSocket, for simulated calls.

When a simulated call is answered and someone is on the line (the terminal in `agent-studio dev
--chat`, a scripted callee in tests), the simulated provider connects to our relay WebSocket exactly
as Twilio would — the same setup message with the call's sid and custom parameters, prompts,
interrupts, DTMF — so a conversation runs through the same code as a real call.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import orjson
import websockets
from twilio.request_validator import RequestValidator

from agentstudio.calls import CallRequest


class Line:
    """The callee's end of the call: hear the agent, speak, press keys, barge in, hang up."""

    def __init__(self, ws: websockets.ClientConnection, on_token: Callable[[str], None] | None = None) -> None:
        self._ws = ws
        self._on_token = on_token
        self._utterances: asyncio.Queue[str | None] = asyncio.Queue()
        self._words: list[str] = []
        self.handoff_data: dict[str, Any] | None = None  # what the agent's `end` carried
        self.hung_up = False
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for raw in self._ws:
                message = orjson.loads(raw)
                if message.get("type") == "text":
                    token = str(message.get("token", ""))
                    if token and self._on_token is not None:
                        self._on_token(token)
                    self._words.append(token)
                    if message.get("last"):
                        self._utterances.put_nowait("".join(self._words))
                        self._words.clear()
                elif message.get("type") == "end":
                    self.handoff_data = orjson.loads(message.get("handoffData") or "{}")
                    break
        except websockets.ConnectionClosed:
            pass
        finally:
            if self._words:
                self._utterances.put_nowait("".join(self._words))
            self._utterances.put_nowait(None)

    @property
    def ended(self) -> bool:
        """The agent ended the call (its `end` message arrived)."""
        return self.handoff_data is not None

    async def hear(self, timeout: float | None = 30.0) -> str | None:
        """The agent's next whole utterance; None once the agent has ended the call."""
        item = await asyncio.wait_for(self._utterances.get(), timeout)
        if item is None:
            self._utterances.put_nowait(None)  # stays ended for every later call
        return item

    async def say(self, text: str) -> None:
        await self._send({"type": "prompt", "voicePrompt": text, "lang": "en-US", "last": True})

    async def press(self, digit: str) -> None:
        await self._send({"type": "dtmf", "digit": digit})

    async def barge_in(self, heard: str, after_ms: int = 800) -> None:
        """Start talking over the agent, who had got `heard` across."""
        await self._send({"type": "interrupt", "utteranceUntilInterrupt": heard, "durationUntilInterruptMs": after_ms})

    async def hang_up(self) -> None:
        self.hung_up = True
        await self._ws.close()

    async def _send(self, message: dict[str, Any]) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            await self._ws.send(orjson.dumps(message).decode())

    async def wait_closed(self) -> None:
        await self._reader
        with contextlib.suppress(websockets.ConnectionClosed):
            await self._ws.close()


class Callee(Protocol):
    """Whoever answers a simulated call; returns when they are done (the line closes after)."""

    async def __call__(self, line: Line) -> None: ...


@contextlib.asynccontextmanager
async def connect(
    relay_url: str,
    call: CallRequest,
    call_sid: str,
    on_token: Callable[[str], None] | None = None,
    auth_token: str = "",
) -> AsyncIterator[Line]:
    """Open the relay WebSocket for an answered call, as Twilio does (signed when there is an auth
    token to sign with), and send its setup."""
    headers = {"X-Twilio-Signature": RequestValidator(auth_token).compute_signature(relay_url, {})} \
        if auth_token else {}
    async with websockets.connect(relay_url, max_size=2**20, additional_headers=headers) as ws:
        await ws.send(orjson.dumps({
            "type": "setup",
            "sessionId": "VX" + uuid.uuid4().hex,
            "accountSid": "AC" + "0" * 32,
            "callSid": call_sid,
            "from": "+15005550006",
            "to": call.phone_number,
            "forwardedFrom": call.phone_number,
            "callerName": "",
            "direction": "outbound-api",
            "callType": "PSTN",
            "callStatus": "IN-PROGRESS",
            "customParameters": {"call_id": call.call_id, "tenant": call.tenant},
        }).decode())
        line = Line(ws, on_token)
        try:
            yield line
        finally:
            await line.wait_closed() if line.ended else await line.hang_up()
