"""The tenant's concurrent-call cap, shared by every dialer: a KV record per tenant listing the calls
that hold a slot, changed by compare-and-set. A call over the cap is not rejected; it waits in the
queue and is tried again. The takes and frees of one process go together (bus.BatchedChanges): a
backlog drained at a cap of 50 had cost ~355 slot reads and writes per call, the writes of one
dialer failing each other's compare-and-set."""

from __future__ import annotations

import time

import orjson
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from agentstudio import bus

# A slot whose call never reported an end (a lost provider callback) is reclaimed after this long.
STALE_AFTER_SECONDS = 6 * 3600

Slots = dict[str, float]


class Concurrency:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv  # the tenants' pace records live here too (pacing.py)
        self._changes = bus.BatchedChanges(kv)

    async def acquire(self, tenant: str, call_id: str, cap: int) -> bool:
        def take(slots: Slots) -> tuple[Slots | None, bool]:
            if call_id in slots:
                return None, True  # already holds one (a redelivery)
            fresh = {c: t for c, t in slots.items() if time.time() - t < STALE_AFTER_SECONDS}
            if len(fresh) >= cap:
                return None, False
            return {**fresh, call_id: time.time()}, True

        return bool(await self._changes.change(tenant, take))

    async def release(self, tenant: str, call_id: str) -> None:
        await self._changes.change(tenant, lambda slots: (
            {c: t for c, t in slots.items() if c != call_id} if call_id in slots else None, None))

    async def holders(self, tenant: str) -> set[str]:
        try:
            return set(orjson.loads((await self.kv.get(tenant)).value or b"{}"))
        except KeyNotFoundError:
            return set()
