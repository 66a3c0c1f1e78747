"""When a call may be dialed under its CallPolicy: the rules for the callee's number, its calling
window's next opening, and how far one deferral reaches. Ingest asks when it accepts a call, and
dialers again just before dialing (a window can close while a call waits for a slot)."""

from __future__ import annotations

from datetime import datetime

from agentstudio.calling_hours import HORIZON, Resolved, next_opening, resolve
from agentstudio.calls import MAX_SCHEDULE_AHEAD
from agentstudio.resources import CallPolicySpec


class NeverOpen(ValueError):
    """The window never opens for the number within calling_hours.HORIZON (e.g. every weekday empty)."""


def rules_for(policy: CallPolicySpec | None, number: str) -> Resolved | None:
    """The hours and cap that apply to calling `number`; None without a policy (any hour, no cap)."""
    return resolve(policy, number) if policy is not None else None


def opening(rules: Resolved | None, number: str, at: datetime) -> datetime:
    """`at` when the number may be called then (or no hours apply), else its window's next opening."""
    if rules is None or rules.hours is None:
        return at
    found = next_opening(rules.hours, number, at)
    if found is None:
        whose = f"preset {rules.preset}'s" if rules.hours_from == "preset" else "the policy's own"
        raise NeverOpen(f"{whose} calling window does not open for this number within {HORIZON.days} days")
    return found


def reachable(until: datetime, now: datetime) -> datetime:
    """Where a deferral to `until` is queued: at most MAX_SCHEDULE_AHEAD away, inside the queue's
    retention. A call due later arrives early and is deferred again (its window is checked on every
    dispatch), so it is never aged out of the stream."""
    return min(until, now + MAX_SCHEDULE_AHEAD)
