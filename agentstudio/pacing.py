"""A tenant's pace: calls placed per second toward the provider, across every dialer (a Twilio
account's calls-per-second limit; Twilio queues what comes faster, and those calls wait in Twilio's
queue with the ring timeout running). The KV record `pace.<tenant>` in the concurrency bucket holds
the moment the tenant's next placement may go out. A dialer reserves a moment for each call it is
about to place, by compare-and-set: the later of now and that record, which then moves 1/rate on,
and waits for it. The reservations of one process go together (bus.BatchedChanges): one write per
batch, not per call. Moments are read on each dialer's own wall clock, so clocks apart by δ can
place two calls up to δ closer than 1/rate."""

from __future__ import annotations

import time
from typing import Any

from nats.js.kv import KeyValue

from agentstudio import bus


def key(tenant: str) -> str:
    return f"pace.{tenant}"


class Pacing:
    def __init__(self, kv: KeyValue) -> None:
        self._changes = bus.BatchedChanges(kv)

    async def reserve(self, tenant: str, per_second: float) -> float:
        """The wall-clock moment (time.time()) this call may be placed at, `per_second` after the
        tenant's previous one."""

        def take(pace: dict[str, Any]) -> tuple[dict[str, Any], float]:
            at = max(time.time(), float(pace.get("next", 0.0)))
            return {"next": at + 1.0 / per_second}, at

        return float(await self._changes.change(key(tenant), take))
