"""The call state machine and its store: one record per call in the `as-calls` KV bucket, changed
only by compare-and-set, so concurrent writers (dialers, provider callbacks) never lose an update
and a call moves only forward.

pending → dialing → ringing → in_progress → completed | failed | no_answer | busy | canceled

The one way back is `retried`: an attempt that ended with an outcome its CallPolicy retries, with
attempts left, goes into the call's history and the call waits (pending) for its next attempt.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, Literal

import orjson
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from pydantic import Field

from agentstudio import bus
from agentstudio.calls import CallRequest
from agentstudio.resources import Retries, Voicemail
from agentstudio.stored import Stored

CallStatus = Literal[
    "pending", "dialing", "ringing", "in_progress", "completed", "failed", "no_answer", "busy", "canceled"
]
TERMINAL: frozenset[str] = frozenset({"completed", "failed", "no_answer", "busy", "canceled"})
# Twilio's AnsweredBy values that mean a machine (or a fax) took the call, not a person.
MACHINE_ANSWERS: frozenset[str] = frozenset(
    {"machine_start", "machine_end_beep", "machine_end_silence", "machine_end_other", "fax"})
_RANK = {"pending": 0, "dialing": 1, "ringing": 2, "in_progress": 3}


def rank(status: str) -> int:
    return _RANK.get(status, 4)


class CallError(Stored):
    code: str
    message: str


class CallEvent(Stored):
    """One step of the timeline."""

    status: CallStatus
    at: datetime
    detail: str | None = None
    attempt: int = 1


class Attempt(Stored):
    """One ended attempt of a call: what a receiver reads in `attempts` of every status event."""

    attempt: int
    outcome: str  # the attempt's status, or voicemail when a machine answered
    started_at: datetime | None = None  # when a dialer claimed it
    answered_at: datetime | None = None
    ended_at: datetime
    duration_seconds: int = 0
    error: CallError | None = None
    provider_call_id: str | None = None
    answered_by: str | None = None
    next_attempt_at: datetime | None = None  # set when the call was retried after it


class Deferral(Stored):
    """A dialer put the call back to wait instead of dialing it: when, why, until when."""

    at: datetime
    reason: Literal["calling_hours", "frequency_cap", "paused"]
    until: datetime  # for paused: when it is looked at again, unless a resume re-queues it sooner


class CallState(Stored):
    call_id: str
    tenant: str
    status: CallStatus = "pending"
    test: bool = False
    provider: str | None = None
    provider_call_id: str | None = None
    dialer: str | None = None  # which dialer claimed it
    claimed_at: datetime | None = None
    attempts: int = 0
    answered_at: datetime | None = None
    ended_at: datetime | None = None
    duration_seconds: int | None = None
    error: CallError | None = None
    events: list[CallEvent] = Field(default_factory=list)
    # The transcript is in its own stream (agentstudio.transcripts); the record counts its turns, and
    # `transcript` is filled in only when read for a reader (or held by a record written before).
    transcript: list[dict[str, Any]] = Field(default_factory=list)
    transcript_turns: int = 0
    captured: dict[str, Any] = Field(default_factory=dict)
    # "open" while an agent talks on the call: its end event waits until the transcript is final.
    conversation: Literal["open", "closed"] | None = None
    end_reason: str | None = None  # why the conversation ended: end_call, callee_hangup, silence, ...
    # Attempts, numbered from 1 (`attempts` above counts tries to place the current one). The
    # policy's retries and voicemail are copied here when a dialer claims the call (the voicemail
    # message rendered), so whoever hears the provider's outcome decides without the bundle.
    attempt: int = 1
    history: list[Attempt] = Field(default_factory=list)  # the attempts before this one
    next_attempt_at: datetime | None = None
    answered_by: str | None = None  # Twilio's AnsweredBy (answering-machine detection)
    retries: Retries | None = None
    voicemail: Voicemail | None = None
    deferrals: list[Deferral] = Field(default_factory=list)  # of any attempt, oldest first
    # The W3C traceparent of the dispatch that claimed the current attempt, while tracing is on: the
    # conversation's and the status events' spans join that call's trace (agentstudio/tracing.py).
    traceparent: str | None = None

    @classmethod
    def new(cls, call: CallRequest) -> CallState:
        return cls(
            call_id=call.call_id,
            tenant=call.tenant,
            test=call.test,
            events=[CallEvent(status="pending", at=call.created_at)],
        )

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def machine(self) -> bool:
        return self.answered_by in MACHINE_ANSWERS

    def machine_answered(self, answered_by: str) -> CallState | None:
        """Answering-machine detection's verdict on the attempt under way (None once it has ended)."""
        if self.terminal or self.status == "pending":
            return None
        return self.model_copy(update={"answered_by": answered_by})

    @property
    def voicemail_message(self) -> str | None:
        """What was left on the machine, when the policy leaves a message and a machine answered."""
        if self.machine and self.voicemail is not None and self.voicemail.action == "leave_message":
            return self.voicemail.message
        return None

    def outcome(self, status: str) -> str:
        """What an attempt ending in `status` counts as: voicemail when a machine took it."""
        return "voicemail" if status == "completed" and self.machine else status

    def retry_delay(self, outcome: str) -> int | None:
        """Seconds until the next attempt when an attempt ending with `outcome` is retried, else None.
        A failure after an answer is not retried: someone already spoke with the agent."""
        retries = self.retries
        if retries is None or self.attempt >= retries.max_attempts or outcome not in retries.outcomes:
            return None
        if outcome == "failed" and self.answered_at is not None:
            return None
        return retries.delays_seconds[min(self.attempt, len(retries.delays_seconds)) - 1]

    def attempt_of(self, provider_call_id: str) -> Attempt | None:
        """The earlier attempt the provider placed as `provider_call_id`, if it was one."""
        return next((a for a in self.history if a.provider_call_id == provider_call_id), None)

    def ended_attempt(self, outcome: str, at: datetime, *, error: CallError | None = None,
                      duration_seconds: int | None = None, next_attempt_at: datetime | None = None) -> Attempt:
        if duration_seconds is None:
            duration_seconds = max(0, int((at - self.answered_at).total_seconds())) if self.answered_at else 0
        return Attempt(attempt=self.attempt, outcome=outcome, started_at=self.claimed_at, answered_at=self.answered_at,
                       ended_at=at, duration_seconds=duration_seconds, error=error,
                       provider_call_id=self.provider_call_id, answered_by=self.answered_by,
                       next_attempt_at=next_attempt_at)

    @property
    def all_attempts(self) -> list[Attempt]:
        """Every ended attempt, this one included once the call has ended."""
        if not self.terminal or self.ended_at is None:
            return list(self.history)
        last = self.ended_attempt(self.outcome(self.status), self.ended_at, error=self.error,
                                  duration_seconds=self.duration_seconds)
        return [*self.history, last]

    def retried(
        self,
        status: CallStatus,
        retry_at: datetime,
        *,
        at: datetime | None = None,
        detail: str | None = None,
        error: CallError | None = None,
        duration_seconds: int | None = None,
    ) -> CallState | None:
        """This attempt ended with `status` and the call waits for its next one at `retry_at`: the
        attempt goes into the history, the call is pending again with attempt + 1 and nothing of the
        ended attempt's progress (provider id, claim, answer). None when no attempt is under way."""
        if self.terminal or self.status == "pending":
            return None
        at = at or now()
        ended = self.ended_attempt(self.outcome(status), at, error=error, duration_seconds=duration_seconds,
                                   next_attempt_at=retry_at)
        return self.model_copy(update={
            "status": "pending",
            "events": [*self.events,
                       CallEvent(status=status, at=at, detail=detail, attempt=self.attempt),
                       CallEvent(status="pending", at=at, attempt=self.attempt + 1,
                                 detail=f"attempt {self.attempt + 1} at {retry_at.isoformat()}")],
            "attempt": self.attempt + 1,
            "history": [*self.history, ended],
            "next_attempt_at": retry_at,
            "attempts": 0,  # tries to place the new attempt start again
            "provider": None, "provider_call_id": None, "dialer": None, "claimed_at": None,
            "answered_at": None, "answered_by": None, "error": None, "end_reason": None, "conversation": None,
            # A machine's, if anything: the next attempt's own come after.
            "transcript": [], "transcript_turns": 0, "captured": {},
        })

    def advanced(
        self,
        status: CallStatus,
        *,
        at: datetime | None = None,
        detail: str | None = None,
        error: CallError | None = None,
        duration_seconds: int | None = None,
        end_reason: str | None = None,
    ) -> CallState | None:
        """This call moved to `status`, or None when that would not move it forward (a duplicate
        or out-of-order report, or anything after the end)."""
        if self.terminal or rank(status) <= rank(self.status):
            return None
        at = at or now()
        update: dict[str, Any] = {
            "status": status,
            "events": [*self.events, CallEvent(status=status, at=at, detail=detail, attempt=self.attempt)],
        }
        if status == "in_progress":
            update["answered_at"] = at
        if status in TERMINAL:
            update["ended_at"] = at
            update["error"] = error
            if end_reason is not None:
                update["end_reason"] = end_reason
            elif status == "completed" and self.machine:
                update["end_reason"] = "voicemail"
            if duration_seconds is not None:
                update["duration_seconds"] = duration_seconds
            elif self.answered_at is not None:
                update["duration_seconds"] = max(0, int((at - self.answered_at).total_seconds()))
            else:
                update["duration_seconds"] = 0
        return self.model_copy(update=update)


def now() -> datetime:
    return datetime.now(timezone.utc)


async def unfinished(js: JetStreamContext) -> list[CallState]:
    """Every record still to be finished with: its call not ended, or ended with its conversation
    open (the end event waits for it). The bucket holds the week's calls, nearly all done with: it is
    read in one pass and only the rest parsed as records, before the caller acts on any."""
    found: dict[str, bytes] = {}  # a record written during the pass comes again: its last value counts
    async with contextlib.aclosing(bus.kv_values(js, bus.CALLS_BUCKET)) as records:
        async for key, value in records:
            record = orjson.loads(value)
            if record.get("status") in TERMINAL and record.get("conversation") != "open":
                found.pop(key, None)
            else:
                found[key] = value
    return [CallState.read(value) for value in found.values()]


class CallStore:
    """CallState records keyed `<tenant>.<call_id>`, written only by compare-and-set.

    With `remember` > 0 the store keeps the revision it last read or wrote of that many records
    (the dialer's, whose calls it moves step after step), and a change starts from it instead of
    a read: one round trip instead of two while nobody else wrote the record. Another writer makes
    the write fail its compare-and-set, and the change reads and decides again, as always. A change
    that the remembered record would leave as it is reads the record first, so what is remembered
    never decides to write nothing."""

    def __init__(self, kv: KeyValue, remember: int = 0) -> None:
        self._kv = kv
        self._remember = remember
        self._known: OrderedDict[str, tuple[int | None, CallState | None]] = OrderedDict()

    @staticmethod
    def key(tenant: str, call_id: str) -> str:
        return f"{tenant}.{call_id}"

    async def get(self, tenant: str, call_id: str) -> CallState | None:
        key = self.key(tenant, call_id)
        try:
            entry = await self._kv.get(key)
        except KeyNotFoundError:
            self._note(key, None, None)
            return None
        state = CallState.read(entry.value) if entry.value else None
        self._note(key, entry.revision, state)
        return state

    def assume_absent(self, tenant: str, call_id: str) -> None:
        """Nobody has written this record yet as far as the caller knows (a call's first delivery):
        the next change creates it without reading first; the create fails if it is there."""
        if self._remember:
            self._note(self.key(tenant, call_id), None, None)

    async def change(
        self, tenant: str, call_id: str, fn: Callable[[CallState | None], CallState | None]
    ) -> tuple[CallState | None, bool]:
        """Apply `fn` to the current record until the write wins: (record now, whether fn changed it)."""
        key = self.key(tenant, call_id)
        known = self._known.pop(key, None)
        while True:
            changed = None
            if known is not None:
                (revision, current), known = known, None
                changed = fn(current)
            if changed is None:
                try:
                    entry = await self._kv.get(key)
                    current = CallState.read(entry.value) if entry.value else None
                    revision = entry.revision
                except KeyNotFoundError:
                    current, revision = None, None
                changed = fn(current)
                if changed is None:
                    self._note(key, revision, current)
                    return current, False
            value = orjson.dumps(changed.model_dump(mode="json"))
            try:
                if revision is None:
                    written = await self._kv.create(key, value)
                else:
                    written = await self._kv.update(key, value, last=revision)
            except KeyWrongLastSequenceError:
                continue  # someone else wrote first: decide again on what is there now
            self._note(key, written, changed)
            return changed, True

    def _note(self, key: str, revision: int | None, state: CallState | None) -> None:
        if not self._remember:
            return
        self._known[key] = (revision, state)
        self._known.move_to_end(key)
        while len(self._known) > self._remember:
            self._known.popitem(last=False)
