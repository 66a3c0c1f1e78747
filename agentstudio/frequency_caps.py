"""Frequency caps, exact across dialers: a tenant's placements to one number in one KV record
(bucket as-frequency), changed only by compare-and-set, so two dialers racing for the last
placement of a window cannot both take it.

A placement is reserved just before a call is claimed, in the name of the dispatch it is for (the
stream sequence of its dispatch message): a dialer that dies after reserving and the one that takes
the call over hold one reservation, not two, and each later attempt (a retry, a deferral's new
dispatch) is a new one.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from nats.js.kv import KeyValue

from agentstudio import bus
from agentstudio.calling_hours import FrequencyCap
from agentstudio.do_not_call import DoNotCall


class _Capped(Exception):
    def __init__(self, until: datetime) -> None:
        self.until = until


class FrequencyCaps:
    """Per `<tenant>.<digits>`: {"keep": seconds, "placed": {attempt: epoch seconds}}. `keep` is the
    longest window any cap has counted this number over, so a short cap never prunes placements a
    longer one (another policy's) still counts."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    async def reserve(self, tenant: str, number: str, attempt: str, cap: FrequencyCap, at: datetime) -> datetime | None:
        """Reserve a placement at `at` for `attempt`: None when reserved (or it already was), else
        the instant the oldest placement of the window leaves it, when one may be free again."""
        window = cap.window_seconds
        now = at.timestamp()

        def take(record: dict[str, Any]) -> dict[str, Any] | None:
            keep = max(window, int(record.get("keep", 0)))
            placed = {a: t for a, t in record.get("placed", {}).items() if t > now - keep}
            if attempt in placed:
                return None
            recent = sorted(t for t in placed.values() if t > now - window)
            if len(recent) >= cap.count:
                raise _Capped(datetime.fromtimestamp(recent[-cap.count] + window, timezone.utc))
            return {"keep": keep, "placed": {**placed, attempt: now}}

        try:
            await bus.update_json(self._kv, DoNotCall.key(tenant, number), take)
        except _Capped as capped:
            return capped.until
        return None

    async def release(self, tenant: str, number: str, attempt: str) -> None:
        """Give back a reservation whose call was not placed (canceled or deferred before its claim)."""

        def drop(record: dict[str, Any]) -> dict[str, Any] | None:
            placed = record.get("placed", {})
            if attempt not in placed:
                return None
            return {**record, "placed": {a: t for a, t in placed.items() if a != attempt}}

        await bus.update_json(self._kv, DoNotCall.key(tenant, number), drop)

