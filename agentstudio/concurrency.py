"""The tenant's concurrent-call cap, shared by every dialer: a KV record per tenant listing the calls
that hold a slot, changed by compare-and-set. A call over the cap is not rejected; it waits in the
queue and is tried again."""

from __future__ import annotations

import time

from collections.abc import Callable

import orjson
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from agentstudio import bus

# A slot whose call never reported an end (a lost provider callback) is reclaimed after this long.
STALE_AFTER_SECONDS = 6 * 3600


class Concurrency:
    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    async def acquire(self, tenant: str, call_id: str, cap: int) -> bool:
        def take(slots: dict[str, float]) -> dict[str, float] | None:
            if call_id in slots:
                return None  # already holds one (a redelivery)
            fresh = {c: t for c, t in slots.items() if time.time() - t < STALE_AFTER_SECONDS}
            if len(fresh) >= cap:
                raise _Full
            return {**fresh, call_id: time.time()}

        try:
            await self._change(tenant, take)
        except _Full:
            return False
        return True

    async def release(self, tenant: str, call_id: str) -> None:
        await self._change(tenant, lambda slots: {c: t for c, t in slots.items() if c != call_id}
                           if call_id in slots else None)

    async def holders(self, tenant: str) -> set[str]:
        try:
            return set(orjson.loads((await self._kv.get(tenant)).value or b"{}"))
        except KeyNotFoundError:
            return set()

    async def _change(self, tenant: str, fn: Callable[[dict[str, float]], dict[str, float] | None]) -> None:
        await bus.update_json(self._kv, tenant, fn)


class _Full(Exception):
    pass
