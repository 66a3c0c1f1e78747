"""Per-key rate limit shared by every ingest process, without a NATS round trip per request.

Each minute has one counter per ApiKey in the `as-ratelimit` KV bucket. An ingest process leases a
slice of the minute's budget from that counter with compare-and-set (limit/50 requests, at least 1)
and spends it locally; only when its slice is used up does it go back to NATS. So the sum over all
processes never exceeds the limit, and a busy key costs one KV round trip per slice, not per request.
A slice not spent by the end of the minute is lost, so with N processes up to N slices of a minute's
budget can go unused; small limits lease one request at a time and are exact.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

WINDOW_SECONDS = 60


@dataclass
class _Lease:
    window: int
    tokens: int  # left to spend locally
    exhausted: bool = False  # the shared counter is at the limit for this window


class RateLimiter:
    def __init__(self, kv: KeyValue, lease_divisor: int = 50, clock: Callable[[], float] = time.time) -> None:
        self._kv = kv
        self._divisor = lease_divisor
        self._clock = clock
        self._leases: dict[str, _Lease] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def take(self, key_id: str, limit: int) -> float | None:
        """Spend one request of `key_id`'s budget: None when allowed, else seconds until it resets."""
        now = self._clock()
        window = int(now // WINDOW_SECONDS)
        lease = self._leases.get(key_id)
        if lease is not None and lease.window == window:
            if lease.tokens > 0:
                lease.tokens -= 1
                return None
            if lease.exhausted:
                return _retry_after(now)
        lock = self._locks.setdefault(key_id, asyncio.Lock())
        async with lock:
            lease = self._leases.get(key_id)
            if lease is None or lease.window != window or (lease.tokens == 0 and not lease.exhausted):
                granted = await self._claim(f"{key_id}.{window}", limit)
                lease = _Lease(window, granted, exhausted=granted == 0)
                self._leases[key_id] = lease
                if len(self._leases) > 10_000:
                    self._prune(window)
            if lease.tokens > 0:
                lease.tokens -= 1
                return None
            return _retry_after(now)

    async def _claim(self, counter: str, limit: int) -> int:
        want = max(1, limit // self._divisor)
        while True:
            try:
                entry = await self._kv.get(counter)
                used = int(entry.value or b"0")
                revision: int | None = entry.revision
            except KeyNotFoundError:
                used, revision = 0, None
            grant = min(want, limit - used)
            if grant <= 0:
                return 0
            value = str(used + grant).encode()
            try:
                if revision is None:
                    await self._kv.create(counter, value)
                else:
                    await self._kv.update(counter, value, last=revision)
                return grant
            except KeyWrongLastSequenceError:
                continue  # another process claimed in between

    def _prune(self, window: int) -> None:
        for key in [k for k, lease in self._leases.items() if lease.window != window]:
            del self._leases[key]
            self._locks.pop(key, None)


def _retry_after(now: float) -> float:
    return WINDOW_SECONDS - (now % WINDOW_SECONDS)
