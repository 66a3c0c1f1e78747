"""The call state machine and its store: one record per call in the `as-calls` KV bucket, changed
only by compare-and-set, so concurrent writers (dialers, provider callbacks) never lose an update
and a call moves only forward.

pending → dialing → ringing → in_progress → completed | failed | no_answer | busy | canceled
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, Literal

import orjson
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from pydantic import BaseModel, ConfigDict, Field

from agentstudio.calls import CallRequest

CallStatus = Literal[
    "pending", "dialing", "ringing", "in_progress", "completed", "failed", "no_answer", "busy", "canceled"
]
TERMINAL: frozenset[str] = frozenset({"completed", "failed", "no_answer", "busy", "canceled"})
_RANK = {"pending": 0, "dialing": 1, "ringing": 2, "in_progress": 3}


def rank(status: str) -> int:
    return _RANK.get(status, 4)


class CallError(BaseModel):
    code: str
    message: str


class CallEvent(BaseModel):
    """One step of the timeline."""

    status: CallStatus
    at: datetime
    detail: str | None = None


class Deferral(BaseModel):
    """A dialer put the call back to wait instead of dialing it: when, why, until when."""

    at: datetime
    reason: Literal["calling_hours", "frequency_cap"]
    until: datetime


class CallState(BaseModel):
    model_config = ConfigDict(extra="forbid")

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
    transcript: list[dict[str, Any]] = Field(default_factory=list)
    captured: dict[str, Any] = Field(default_factory=dict)
    # "open" while an agent talks on the call: its end event waits until the transcript is final.
    conversation: Literal["open", "closed"] | None = None
    end_reason: str | None = None  # why the conversation ended: end_call, callee_hangup, silence, ...
    deferrals: list[Deferral] = Field(default_factory=list)

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
            "events": [*self.events, CallEvent(status=status, at=at, detail=detail)],
        }
        if status == "in_progress":
            update["answered_at"] = at
        if status in TERMINAL:
            update["ended_at"] = at
            update["error"] = error
            if end_reason is not None:
                update["end_reason"] = end_reason
            if duration_seconds is not None:
                update["duration_seconds"] = duration_seconds
            elif self.answered_at is not None:
                update["duration_seconds"] = max(0, int((at - self.answered_at).total_seconds()))
            else:
                update["duration_seconds"] = 0
        return self.model_copy(update=update)


def now() -> datetime:
    return datetime.now(timezone.utc)


class CallStore:
    """CallState records keyed `<tenant>.<call_id>`, written only by compare-and-set."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    @staticmethod
    def key(tenant: str, call_id: str) -> str:
        return f"{tenant}.{call_id}"

    async def get(self, tenant: str, call_id: str) -> CallState | None:
        try:
            entry = await self._kv.get(self.key(tenant, call_id))
        except KeyNotFoundError:
            return None
        return CallState.model_validate_json(entry.value) if entry.value else None

    async def change(
        self, tenant: str, call_id: str, fn: Callable[[CallState | None], CallState | None]
    ) -> tuple[CallState | None, bool]:
        """Apply `fn` to the current record until the write wins: (record now, whether fn changed it)."""
        key = self.key(tenant, call_id)
        while True:
            try:
                entry = await self._kv.get(key)
                current: CallState | None = CallState.model_validate_json(entry.value) if entry.value else None
                revision: int | None = entry.revision
            except KeyNotFoundError:
                current, revision = None, None
            changed = fn(current)
            if changed is None:
                return current, False
            value = orjson.dumps(changed.model_dump(mode="json"))
            try:
                if revision is None:
                    await self._kv.create(key, value)
                else:
                    await self._kv.update(key, value, last=revision)
                return changed, True
            except KeyWrongLastSequenceError:
                continue  # someone else wrote first: decide again on what is there now
