"""The one clock calling windows, frequency caps and scheduled calls read: real UTC time, or, for
`agent-studio dev --now TIME`, real time shifted so that it read TIME when the run started.

Only what decides *when a call may be dialed* reads it; timestamps of what happened (created_at,
the timeline) stay real. nats-server fires message schedules on its own real clock, so an instant
on this clock is scheduled at `real(instant)`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

_offset = timedelta(0)


def now() -> datetime:
    return datetime.now(UTC) + _offset


def real(at: datetime) -> datetime:
    """The real instant at which this clock reads `at`."""
    return at - _offset


def reading_at(instant: datetime) -> datetime:
    """What this clock read at the real instant `instant`."""
    return instant + _offset


def start_at(reading: datetime) -> None:
    """From now on the clock reads `reading` and advances in real time (one clock per process)."""
    global _offset
    if reading.tzinfo is None:
        raise ValueError("the clock's reading needs an offset, e.g. 2026-12-01T08:59:50-05:00")
    _offset = reading - datetime.now(UTC)


@contextmanager
def reading(at: datetime) -> Iterator[None]:
    """The clock reads `at` inside the block, and real time again after it."""
    global _offset
    before = _offset
    start_at(at)
    try:
        yield
    finally:
        _offset = before
