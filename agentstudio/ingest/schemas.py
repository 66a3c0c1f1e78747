"""Request and response bodies of the ingest API; their JSON Schemas are the OpenAPI contract."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StrictBool, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from agentstudio import phone, platforms

_OPTIONAL = ("workflow_slug", "agent_slug", "user_id", "user_context", "metadata", "scheduled_at")


class IngestRequest(BaseModel):
    """What a marketing platform's webhook sends. Empty strings count as absent, and so does any
    value, at any depth of user_context and metadata, in the sending key's platform form for an
    attribute the profile lacks (`$Name` from CleverTap, `""` from Braze)."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        json_schema_extra={
            "examples": [
                {
                    "workflow_slug": "free-trial-followup",
                    "phone_number": "+919876543210",
                    "user_id": "user-123",
                    "user_context": {"name": "John", "trial_started_at": "2026-02-01", "plan_type": "premium"},
                    "metadata": {"campaign_id": "trial_recovery_jan", "source": "clevertap"},
                }
            ]
        },
    )

    phone_number: str = Field(
        description="E.164, e.g. +919876543210; spaces, dashes, dots and brackets are removed. The form is checked"
                    " here; whether the number exists in its country's plan is checked on arrival (400).",
        # Documents phone.normalize's form: + first, then 2 to 17 digits, separators anywhere.
        json_schema_extra={"pattern": r"^[\s().-]*\+[\s().-]*([0-9][\s().-]*){2,17}$"},
    )
    workflow_slug: str | None = Field(None, max_length=253, description="Workflow to run (one of the two slugs).")
    agent_slug: str | None = Field(None, max_length=253, description="Single agent to run (one of the two slugs).")
    user_id: str | None = Field(None, max_length=256, description="External user id; numbers are accepted as text.")
    user_context: dict[str, Any] = Field(default_factory=dict, description="Data for the agent: {{user.*}}.")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Tracking data: {{metadata.*}}, webhooks, exports.")
    scheduled_at: AwareDatetime | None = Field(
        None, description="Dial no earlier than this instant (RFC 3339 with an offset, e.g. 2026-12-01T09:30:00+05:30),"
                          " at most 6 days ahead; past or absent: as soon as a slot is free. The call is `scheduled`"
                          " until then and holds no queue capacity.")

    @field_validator(*_OPTIONAL, mode="before")
    @classmethod
    def _empty_is_absent(cls, value: Any, info: ValidationInfo) -> Any:
        unfilled = _unfilled(info)
        if value == "" or value is None or (unfilled is not None and platforms.is_unfilled(unfilled, value)):
            return {} if info.field_name in ("user_context", "metadata") else None
        if info.field_name == "user_id" and isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if unfilled is not None and info.field_name in ("user_context", "metadata"):
            return platforms.without_unfilled(unfilled, value)
        return value

    @field_validator("phone_number", mode="before")
    @classmethod
    def _phone(cls, value: Any, info: ValidationInfo) -> Any:
        unfilled = _unfilled(info)
        if value is None or value == "" or (unfilled is not None and platforms.is_unfilled(unfilled, value)):
            raise PydanticCustomError("missing", "Field required")
        if not isinstance(value, str):
            raise PydanticCustomError("string_type", "Input should be a string")
        try:
            return phone.normalize(value.strip())
        except phone.InvalidPhoneNumber as exc:
            raise PydanticCustomError("phone_number", "{reason}", {"reason": f"invalid phone number: {exc}"}) from None

    @model_validator(mode="after")
    def _one_slug(self) -> IngestRequest:
        if self.workflow_slug and self.agent_slug:
            raise PydanticCustomError("both_slugs", "provide either workflow_slug or agent_slug, not both")
        if not self.workflow_slug and not self.agent_slug:
            raise PydanticCustomError("missing_slug", "one of workflow_slug or agent_slug is required")
        return self


def _unfilled(info: ValidationInfo) -> re.Pattern[str] | None:
    """The sending key's platform form for an unfilled attribute (`context={"unfilled": ...}`)."""
    return info.context.get("unfilled") if info.context else None


class CallAccepted(BaseModel):
    call_id: str = Field(description="UUID of the queued call.")
    status: str = Field("pending", description="pending (durably queued), or scheduled when scheduled_at is ahead"
                                                " or the callee's calling window is closed.")
    scheduled_for: datetime | None = Field(None, description="When a scheduled call may be dialed (UTC); absent"
                                                             " for a pending call.")


class TimelineEntry(BaseModel):
    status: str
    at: datetime
    detail: str | None = None


class CallErrorBody(BaseModel):
    code: str
    message: str


class AttemptBody(BaseModel):
    attempt: int
    outcome: str = Field(description="completed, failed, no_answer, busy, canceled or voicemail.")
    started_at: datetime | None = None
    answered_at: datetime | None = None
    ended_at: datetime
    duration_seconds: int = 0
    error: CallErrorBody | None = None
    provider_call_id: str | None = None
    answered_by: str | None = None
    next_attempt_at: datetime | None = Field(None, description="When the call was tried again after it.")


class Deferral(BaseModel):
    at: datetime
    reason: str
    until: datetime


class CallRecord(BaseModel):
    call_id: str
    status: str = Field(description="scheduled, pending, dialing, ringing, in_progress, completed, failed, no_answer,"
                                    " busy, canceled; a call waiting for its time (scheduled_at, its calling window, its frequency cap, a retry) is scheduled")
    scheduled_for: datetime | None = Field(None, description="When a scheduled call may be dialed (UTC).")
    scheduled_reason: str | None = Field(
        None, description="Why it waits: scheduled_at (the request asked), calling_hours (the callee's window is"
                          " closed), frequency_cap (the number had its placements for the window), retry or paused (its workflow or tenant).")
    workflow_slug: str | None
    agent_slug: str | None
    phone_number: str
    user_id: str | None
    user_context: dict[str, Any]
    metadata: dict[str, Any]
    created_at: datetime
    test: bool
    provider: str | None = None
    answered_at: datetime | None = None
    ended_at: datetime | None = None
    duration_seconds: int | None = None
    error: CallErrorBody | None = Field(None, description="Why the call failed.")
    events: list[TimelineEntry] = Field(default_factory=list, description="Every status with its time.")
    transcript: list[dict[str, Any]] = Field(default_factory=list)
    captured: dict[str, Any] = Field(default_factory=dict, description="What capture tools recorded, by tool.")
    end_reason: str | None = Field(
        None, description="Why the agent's conversation ended: end_call, callee_hangup, silence, max_duration, "
                          "voicemail, ..."
    )
    attempt: int = Field(1, description="The attempt under way or last made (CallPolicy retries), from 1.")
    attempts: list[AttemptBody] = Field(default_factory=list, description="Every ended attempt, oldest first.")
    next_attempt_at: datetime | None = Field(None, description="When the next attempt is due, while it waits.")
    answered_by: str | None = Field(
        None, description="Answering-machine detection's verdict (Twilio's AnsweredBy): human, machine_start, ...")
    voicemail_message: str | None = Field(None, description="The message left on the machine, if one was.")
    deferrals: list[Deferral] = Field(
        default_factory=list, description="Each time a dialer put the call back to wait (its calling window had"
                                          " closed, or its number was at its frequency cap): when, why, until.")


class CallPage(BaseModel):
    """One page of a call listing, newest first."""

    data: list[CallRecord]
    next_cursor: str | None = Field(
        description="Pass as `cursor` to get the next (older) page; null on the last page. Opaque."
    )


class CancelFilter(BaseModel):
    """Which not-yet-dialed calls to cancel: the listing's filters, every one given must hold."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"metadata": {"campaign_id": "trial_recovery_jan"}}]},
    )

    workflow_slug: str | None = Field(None, min_length=1, description="Only calls of this workflow.")
    agent_slug: str | None = Field(None, min_length=1, description="Only single-agent calls of this agent.")
    metadata: dict[str, str | int | float | bool | list[str | int | float | bool]] = Field(
        default_factory=dict,
        description="Metadata equality, as the listing's metadata.<key>=<value> (a list: any of its values).",
    )
    created_after: datetime | None = Field(None, description="Calls created at or after it.")
    created_before: datetime | None = Field(None, description="Calls created before it.")
    test: StrictBool | None = Field(None, description="true: only test-key calls; false: only live ones.")

    @field_validator("created_after", "created_before", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        # pydantic would read a number as Unix time: {"created_after": -670} matched every call.
        if value is not None and not isinstance(value, str):
            raise PydanticCustomError("datetime_type", "must be an ISO 8601 date-time string")
        return value

    @model_validator(mode="after")
    def _says_which(self) -> CancelFilter:
        # An empty filter would cancel the whole queue: a mistake far more often than the intent.
        if all(getattr(self, name) in (None, {}) for name in type(self).model_fields):
            raise PydanticCustomError("empty_filter", "give at least one filter; {} would cancel every call")
        return self


class CancelResult(BaseModel):
    canceled: int = Field(description="Calls this request canceled (already canceled ones are not counted).")
