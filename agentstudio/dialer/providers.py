"""Telephony providers behind one small interface: `twilio` (the official SDK) and `simulated`
(scripted outcomes, no network; the local run and every call made with a test key)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import datetime, timedelta
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlencode

import nats.errors
from twilio.base.exceptions import TwilioException, TwilioRestException
from twilio.rest import Client
from twilio.twiml.voice_response import VoiceResponse

from agentstudio.calls import CallRequest
from agentstudio.resources import AgentSpec, Voicemail
from agentstudio.conversation.relay import relay_url
from agentstudio.dialer import phone_line
from agentstudio.dialer.phone_line import Callee
from agentstudio.callstate import CallError, CallState, CallStatus
from agentstudio.tracking import CallTracker
from agentstudio.twilio_callbacks import AMD_CALLBACK_PATH, RELAY_ENDED_PATH, STATUS_CALLBACK_PATH, TWILIO_STATUS
from agentstudio.settings import TIME_LIMIT_BACKSTOP_SECONDS

log = logging.getLogger("agentstudio.dialer")

STATUS_EVENTS = ["initiated", "ringing", "answered", "completed"]
# How long a simulated call's transition waits for NATS to come back before it is given up.
RECORD_RETRY_SECONDS = 300.0


class ProviderError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.error = CallError(code=code, message=message)


@dataclass(frozen=True)
class Report:
    """Where the provider says a call is now (asked when its own report is overdue)."""

    status: CallStatus
    duration_seconds: int | None = None
    error: CallError | None = None


class Provider(Protocol):
    name: str
    # Whether `find` knows calls another dialer placed (Twilio: one account for all of them); the
    # simulated provider knows only its own process's.
    finds_every_dialers_calls: bool
    # The provider's first report of a call records its call id (the dialer writes none after
    # placing): the simulated provider, whose calls ring the moment they are placed and live in the
    # dialer's process, so a separate write of the id would protect nothing.
    records_call_id: bool

    async def place(self, call: CallRequest, voicemail: Voicemail | None = None) -> str:
        """Start the call; return the provider's call id. Raises ProviderError when refused.
        `voicemail`: the call's policy for a machine answering (its message rendered); None: no
        answering-machine detection, whoever answers hears the agent."""

    async def find(self, call: CallRequest, since: datetime) -> str | None:
        """The provider's id of this call if it was placed at or after `since` (a dialer died
        between placing it and recording the answer), else None."""

    async def report(self, provider_call_id: str) -> Report | None:
        """The call's status as the provider has it now; None when the provider cannot say."""

    async def drain(self) -> None:
        """Finish what is in progress (a dialer stopping)."""


class SimulatedProvider:
    """Rings, then plays out `metadata.simulate_outcome` (completed, no_answer, busy, failed, voicemail;
    default completed) after `metadata.simulate_duration_seconds` (default 2) of conversation — or, when
    `callees` puts someone on the line, connects the answered call to the agent over the relay
    WebSocket exactly as Twilio would, and hangs up when the conversation is over. A comma list plays
    one outcome per attempt (`no_answer,busy,completed`; the last repeats). `voicemail` is a machine
    answering: with a voicemail policy it is detected as Twilio's async AMD would report it, and the
    message left or the call hung up; without one, the machine just hears the agent, as a person would."""

    name = "simulated"
    finds_every_dialers_calls = False
    records_call_id = True

    def __init__(
        self,
        tracker: CallTracker,
        ring_seconds: float = 0.2,
        relay_url: str = "",
        callees: Callable[[CallRequest], Callee | None] | None = None,
        on_token: Callable[[CallRequest], Callable[[str], None] | None] | None = None,
        auth_token: str = "",
    ) -> None:
        self._tracker = tracker
        self._auth_token = auth_token  # signs the relay upgrade as Twilio would, where one is required
        self._ring_seconds = ring_seconds
        self._relay_url = relay_url
        self._callees = callees
        self._on_token = on_token
        self._placed: dict[str, str] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def place(self, call: CallRequest, voicemail: Voicemail | None = None) -> str:
        sid = "SIM" + uuid.uuid4().hex
        self._placed[call.call_id] = sid
        task = asyncio.create_task(self._play(call, sid, voicemail), name=f"simulated-{call.call_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return sid

    async def find(self, call: CallRequest, since: datetime) -> str | None:
        return self._placed.get(call.call_id)

    async def report(self, provider_call_id: str) -> Report | None:
        return None  # nothing outside this process knows; a dialer taking over fails what it left (takeover.py)

    async def drain(self) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _play(self, call: CallRequest, sid: str, voicemail: Voicemail | None) -> None:
        given = call.metadata.get("simulate_duration_seconds")
        duration = 2.0 if given in (None, "") else float(given)
        t, tenant, cid = _Persistent(self._tracker, sid), call.tenant, call.call_id
        callee = self._callees(call) if self._callees is not None else None
        try:
            ringing = await t.advance(tenant, cid, "ringing", detail=f"simulated {sid}", provider=self.name)
            outcome = _scripted(call, ringing.attempt if ringing is not None else 1)
            await asyncio.sleep(self._ring_seconds)
            if outcome == "voicemail" and voicemail is not None:
                await t.advance(tenant, cid, "in_progress")
                await self._machine(tenant, cid, voicemail)
                await t.advance(tenant, cid, "completed")
            elif callee is not None:
                await t.advance(tenant, cid, "in_progress")
                on_token = self._on_token(call) if self._on_token is not None else None
                async with phone_line.connect(self._relay_url, call, sid, on_token, self._auth_token) as line:
                    await callee(line)
                await t.advance(tenant, cid, "completed")  # duration: from answer to hang-up
            elif outcome in ("no_answer", "busy"):
                await t.advance(tenant, cid, outcome)  # type: ignore[arg-type]
            elif outcome == "failed":
                await t.advance(tenant, cid, "failed",
                                error=CallError(code="simulated_failure", message="scripted failure"))
            else:
                await t.advance(tenant, cid, "in_progress")
                await asyncio.sleep(duration)
                await t.advance(tenant, cid, "completed", duration_seconds=int(round(duration)))
        except Exception:  # noqa: BLE001 - a simulated call must not take the dialer down
            log.exception("simulated call failed", extra={"call_id": cid, "tenant": tenant})

    async def _machine(self, tenant: str, call_id: str, voicemail: Voicemail) -> None:
        """What Twilio's async AMD verdict brings about (ingest's route for it): the machine is
        recorded, so the call's end counts as voicemail (and says the message the policy left)."""
        answered_by = "machine_end_beep" if voicemail.action == "leave_message" else "machine_start"
        await self._tracker.store.change(tenant, call_id, lambda s: s.machine_answered(answered_by) if s else None)


def _scripted(call: CallRequest, attempt: int) -> str:
    """The outcome `metadata.simulate_outcome` scripts for this attempt: one per attempt in a comma
    list, the last repeating."""
    given = str(call.metadata.get("simulate_outcome") or "completed")
    outcomes = [o.strip() for o in given.split(",") if o.strip()] or ["completed"]
    return outcomes[min(attempt, len(outcomes)) - 1]


class _Persistent:
    """A tracker whose transitions wait out a NATS restart (a NATS pod rescheduled, a leader moved):
    the simulated provider is the only one that knows its calls' progress, and a transition lost
    would leave the call unfinished for hours. Retried for RECORD_RETRY_SECONDS, then given up."""

    def __init__(self, tracker: CallTracker, sid: str) -> None:
        self._tracker = tracker
        self._sid = sid  # every report names the attempt it is about, as Twilio's CallSid does

    async def advance(self, tenant: str, call_id: str, status: CallStatus, **kw: Any) -> CallState | None:
        loop = asyncio.get_running_loop()
        deadline, delay = loop.time() + RECORD_RETRY_SECONDS, 0.2
        while True:
            try:
                return await self._tracker.advance(tenant, call_id, status, provider_call_id=self._sid, **kw)
            except (nats.errors.Error, asyncio.TimeoutError):
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)


class TwilioProvider:
    """Places calls with `calls.create`; progress arrives as signed status callbacks to ingest."""

    name = "twilio"
    finds_every_dialers_calls = True
    records_call_id = False

    def __init__(
        self,
        client: Client,
        from_number: str,
        public_base_url: str,
        ring_timeout_seconds: int,
        agents_of: Callable[[CallRequest], list[AgentSpec]] | None = None,
        max_call_seconds: float | None = None,
    ) -> None:
        self._client = client
        self._from = from_number
        self._base = public_base_url.rstrip("/")
        self._timeout = ring_timeout_seconds
        self._agents_of = agents_of
        self._max_call_seconds = max_call_seconds

    def twiml(self, call: CallRequest, agents: list[AgentSpec]) -> str:
        """Connect the answered call to our ConversationRelay WebSocket (the voice agent), speaking
        with the voice and language of the agent the call starts with (`agents[0]`). Every language
        of the call's agents is declared as a <Language> with that agent's speech settings: a
        handoff sends only a `language` message, and Twilio then speaks with what the matching
        <Language> declares. One voice per language: the first agent with it wins."""
        agent = agents[0] if agents else None
        response = VoiceResponse()
        connect = response.connect(action=f"{self._base}{RELAY_ENDED_PATH}?"
                                   + urlencode({"call_id": call.call_id, "tenant": call.tenant}))
        speech: dict[str, str] = {}
        if agent is not None:
            speech = {"language": agent.language, "tts_provider": agent.voice.tts_provider,
                      "transcription_provider": agent.voice.transcription_provider}
            if agent.voice.voice:
                speech["voice"] = agent.voice.voice
        relay = connect.conversation_relay(url=relay_url(self._base), interruptible="any", dtmf_detection=True,
                                           **speech)
        declared: set[str] = set()
        for other in agents:
            if other.language not in declared:
                declared.add(other.language)
                relay.language(code=other.language, tts_provider=other.voice.tts_provider,
                               voice=other.voice.voice, transcription_provider=other.voice.transcription_provider)
        relay.parameter(name="call_id", value=call.call_id)
        relay.parameter(name="tenant", value=call.tenant)
        return str(response)

    def status_callback(self, call: CallRequest) -> str:
        return f"{self._base}{STATUS_CALLBACK_PATH}?" + urlencode({"call_id": call.call_id, "tenant": call.tenant})

    def amd_callback(self, call: CallRequest) -> str:
        return f"{self._base}{AMD_CALLBACK_PATH}?" + urlencode({"call_id": call.call_id, "tenant": call.tenant})

    async def place(self, call: CallRequest, voicemail: Voicemail | None = None) -> str:
        agents = self._agents_of(call) if self._agents_of is not None else []
        agent = agents[0] if agents else None
        kwargs: dict[str, object] = {
            "to": call.phone_number,
            "from_": self._from,
            "twiml": self.twiml(call, agents),
            "status_callback": self.status_callback(call),
            "status_callback_event": STATUS_EVENTS,
            "status_callback_method": "POST",
            "timeout": self._timeout,
        }
        if agent is not None:
            # Twilio's own hard stop, a minute after the agent's polite one, in case nothing else ends it.
            limit = min(agent.max_duration_seconds, self._max_call_seconds or agent.max_duration_seconds)
            kwargs["time_limit"] = int(limit) + TIME_LIMIT_BACKSTOP_SECONDS
        if voicemail is not None:
            # Async AMD: the agent answers at once while Twilio listens; its verdict arrives at
            # AsyncAmdStatusCallback (with inline Twiml the only way to learn AnsweredBy). To leave a
            # message, DetectMessageEnd waits for the greeting's end (the beep) before it reports.
            kwargs |= {
                "machine_detection": "DetectMessageEnd" if voicemail.action == "leave_message" else "Enable",
                "async_amd": "true",
                "async_amd_status_callback": self.amd_callback(call),
                "async_amd_status_callback_method": "POST",
            }
        try:
            created = await asyncio.to_thread(self._client.calls.create, **kwargs)
        except TwilioRestException as exc:
            raise ProviderError(f"twilio_{exc.code or exc.status}", str(exc.msg)[:500]) from None
        return str(created.sid)

    async def find(self, call: CallRequest, since: datetime) -> str | None:
        # Twilio lists calls by To, From, Status and start/end dates, not by creation: a call still
        # `queued` (held by the account's calls-per-second limit) has an empty start_time until it is
        # dialed (https://www.twilio.com/docs/voice/api/call-resource, `start_time`; so says Twilio's
        # OpenAPI spec), so a StartTime filter alone misses it. Two exact lists cover both: the queued
        # calls from us to this number, and those started since the claim's day; a match must have
        # been created since the claim (5 s allowance for clock skew).
        found = []
        for filters in ({"status": "queued"}, {"start_time_after": since - timedelta(minutes=1)}):
            try:
                found += await asyncio.to_thread(
                    self._client.calls.list, to=call.phone_number, from_=self._from, limit=20, **filters)
            except TwilioRestException as exc:
                raise ProviderError(f"twilio_{exc.code or exc.status}", str(exc.msg)[:500]) from None
            except TwilioException as exc:  # e.g. a page that could not be read
                raise ProviderError("twilio_lookup", str(exc)[:500]) from None
        for placed in sorted(found, key=lambda c: c.date_created or since):
            created = placed.date_created
            if placed.to == call.phone_number and created is not None and created >= since - timedelta(seconds=5):
                return str(placed.sid)
        return None

    async def report(self, provider_call_id: str) -> Report | None:
        try:
            fetched = await asyncio.to_thread(self._client.calls(provider_call_id).fetch)
        except TwilioRestException as exc:
            raise ProviderError(f"twilio_{exc.code or exc.status}", str(exc.msg)[:500]) from None
        status = TWILIO_STATUS.get(fetched.status or "")
        if status is None:
            return None
        # The Call resource has no error code (only its status callback and the call's Notifications do).
        error = CallError(code="twilio_unknown", message="Twilio reports the call failed") if status == "failed" else None
        duration = int(fetched.duration) if (fetched.duration or "").isdigit() else None
        return Report(status, duration, error)

    async def answer_machine(self, provider_call_id: str, message: str | None) -> None:
        """Redirect a live call a machine answered: say `message` (DetectMessageEnd reported after the
        beep), then hang up; without a message, hang up at once. Raises ProviderError when refused."""
        response = VoiceResponse()
        if message:
            response.say(message)
        response.hangup()
        try:
            await asyncio.to_thread(self._client.calls(provider_call_id).update, twiml=str(response))
        except TwilioRestException as exc:
            raise ProviderError(f"twilio_{exc.code or exc.status}", str(exc.msg)[:500]) from None

    async def drain(self) -> None:
        return None

