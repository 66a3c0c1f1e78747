"""`agent-studio dev DIR --chat SLUG`: be the callee of a simulated call, in the terminal.

The call goes through the whole local stack as a campaign's would — POST to ingest with a key of the
folder, queued, taken by the dialer, answered by the simulated provider — and the terminal is the
phone: the agent's words stream in as the relay WebSocket carries them, each line typed is what the
callee says. Tool calls, handoffs and the end show as they happen, the call record at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

import httpx
import orjson

from agentstudio import calls
from agentstudio.callstate import CallStore
from agentstudio.conversation.transcript import Turn
from agentstudio.dialer.phone_line import Line

HELP = "Type what the callee says. /press 5 sends a keypad digit; /hangup or Ctrl-D hangs up."


@dataclass(frozen=True)
class ChatRequest:
    """What the campaign would send; `slug` is a workflow's, or else an agent's."""

    slug: str
    phone_number: str = "+15005550006"  # Twilio's magic test number: valid, and nobody's phone
    user_id: str | None = "dev-user"
    user_context: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)


class Terminal:
    """Prints the call as it goes, and is the simulated provider's callee for the chat's call."""

    def __init__(self, out: TextIO = sys.stdout) -> None:
        self.out = out
        self.call_id: str | None = None
        self._mid_utterance = False
        # The conversation tells of a tool call as soon as it happens, while the words said before it
        # may still be on their way over the WebSocket: a bracketed line waits for them, counted in
        # characters (the terminal never barges in, so what was said is what arrives).
        self._said: list[Turn] = []
        self._arrived = 0
        self._held: list[tuple[int, str]] = []

    def show(self, text: str, end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    # The simulated provider's hooks: only the chat's own call is put through to the terminal.
    def callee_for(self, call: calls.CallRequest) -> Callable[[Line], Any] | None:
        return self.converse if call.call_id == self.call_id else None

    def on_token_for(self, call: calls.CallRequest) -> Callable[[str], None] | None:
        return self.token if call.call_id == self.call_id else None

    def token(self, token: str) -> None:
        if not self._mid_utterance:
            self.show("agent> ", end="")
            self._mid_utterance = True
        self.show(token, end="")
        self._arrived += len(token)
        self._release()

    def turn(self, call_id: str, item: Turn) -> None:
        """The conversation's observer: what the callee cannot hear, shown in brackets."""
        if call_id != self.call_id:
            return
        if item.kind == "message" and item.speaker == "agent":
            self._said.append(item)  # its text grows as the reply streams
            return
        shown = {
            "tool": lambda: f"[tool {item.tool} {orjson.dumps(item.arguments).decode()} → "
                            f"{item.error or orjson.dumps(item.result).decode()}]",
            "handoff": lambda: f"[handoff → {item.to}{': ' + item.summary if item.summary else ''}]",
            "transfer": lambda: f"[transfer → {item.to}]",
            "silence": lambda: f"[{item.seconds} s of silence]",
            "end": lambda: f"[the agent ended the call: {item.reason}{' (' + item.error + ')' if item.error else ''}]",
        }.get(item.kind)
        if shown is not None:
            held = (sum(len(said.text or "") for said in self._said), "  " + shown())
            self._held.append(held)
            self._release()
            if self._held:
                asyncio.get_running_loop().call_later(1.0, self._give_up, held)

    def _release(self) -> None:
        while self._held and self._held[0][0] <= self._arrived:
            self._print_held()

    def _give_up(self, held: tuple[int, str]) -> None:
        """Words that never arrived (a reply cut mid-send) must not hold a line back for ever."""
        while any(h is held for h in self._held):
            self._print_held()

    def flush(self) -> None:
        """Print what is held back, whether or not the words before it arrived."""
        while self._held:
            self._print_held()

    def _print_held(self) -> None:
        self._end_utterance()
        self.show(self._held.pop(0)[1])

    def _end_utterance(self) -> None:
        if self._mid_utterance:
            self.show("")
            self._mid_utterance = False

    async def converse(self, line: Line) -> None:
        """Relay typed lines to the call until the agent ends it or the callee hangs up."""
        lines = _stdin_lines()
        heard = asyncio.create_task(self._hear_all(line))
        try:
            while not heard.done():
                typed = asyncio.create_task(anext(lines, None))
                await asyncio.wait({typed, heard}, return_when=asyncio.FIRST_COMPLETED)
                if not typed.done():
                    typed.cancel()
                    break
                text = typed.result()
                if text is None or text.strip() == "/hangup":
                    self._end_utterance()
                    self.show("[you hung up]")
                    await line.hang_up()
                    break
                if text.startswith("/press "):
                    await line.press(text.split(maxsplit=1)[1].strip()[:1])
                elif text.strip():
                    await line.say(text.strip())
        finally:
            heard.cancel()
            await asyncio.gather(heard, return_exceptions=True)
            await lines.aclose()

    async def _hear_all(self, line: Line) -> None:
        while await line.hear(timeout=None) is not None:
            self._end_utterance()


async def _stdin_lines() -> Any:
    """Lines typed on stdin, without blocking the event loop (a pipe, a tty, or a file)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    try:
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    except ValueError:  # a regular file: read it whole
        for text in sys.stdin.read().splitlines():
            yield text
        return
    try:
        while raw := await reader.readline():
            yield raw.decode(errors="replace").rstrip("\n")
    finally:
        transport.close()


def body_for(request: ChatRequest, slug_kind: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        slug_kind: request.slug,
        "phone_number": request.phone_number,
        "user_context": request.user_context,
        "metadata": request.metadata,
    }
    if request.user_id is not None:
        body["user_id"] = request.user_id
    return body


async def place(
    base_url: str, key_name: str, key: str, tenant: str, body: dict[str, Any], terminal: Terminal
) -> str | None:
    """POST the call to ingest like a campaign; the call id is known before the POST (it comes from
    the Idempotency-Key), so the dialer can never take the call before the terminal is ready for it."""
    idempotency_key = f"dev-chat-{uuid.uuid4().hex}"
    terminal.call_id = calls.new_call_id(tenant, key_name, idempotency_key)
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
        answer = await client.post("/api/v1/webhooks/ingest", json=body, headers={
            "Authorization": f"Bearer {key}", "Idempotency-Key": idempotency_key})
    if answer.status_code != 201:
        terminal.show(f"ingest refused the call: {answer.status_code} {answer.text}")
        return None
    return terminal.call_id


async def outcome(store: CallStore, tenant: str, call_id: str, terminal: Terminal, timeout: float = 30.0) -> None:
    """Wait for the call record to be final and print it."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            while True:
                state = await store.get(tenant, call_id)
                if state is not None and state.terminal and state.conversation != "open":
                    break
                await asyncio.sleep(0.1)
    state = await store.get(tenant, call_id)
    terminal.flush()
    if state is None:
        return
    terminal.show(f"call {call_id}: {state.status}, {state.duration_seconds or 0} s, "
                    f"ended by {state.end_reason or 'the provider'}")
    if state.captured:
        terminal.show("captured: " + orjson.dumps(state.captured, option=orjson.OPT_INDENT_2).decode())
