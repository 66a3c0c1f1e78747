"""The per-tenant do-not-call list: one key per number in the `as-dnc` KV bucket, so a list of
millions is millions of small keys (read by direct get, never loaded whole) rather than one object."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from datetime import datetime
from typing import Literal

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from pydantic import BaseModel, Field

from agentstudio.callstate import now

Source = Literal["api", "import", "opt_out"]
# Writes of one import in flight at once: enough to hide the round trip, few enough for the server.
_BATCH = 256


class Listing(BaseModel):
    """Why a number is on the list."""

    phone_number: str = Field(description="E.164.")
    added_at: datetime
    source: Source = Field(description="api: added one by one; import: a CSV import; opt_out: the callee "
                                       "asked during a call (the agent's opt_out tool).")
    reason: str | None = Field(None, max_length=500)


class DoNotCall:
    """A tenant's numbers never to call, keyed `<tenant>.<digits of the E.164 number>`."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    @staticmethod
    def key(tenant: str, number: str) -> str:
        return f"{tenant}.{number.removeprefix('+')}"  # a KV key may not hold "+"

    async def get(self, tenant: str, number: str) -> Listing | None:
        try:
            entry = await self._kv.get(self.key(tenant, number))
        except KeyNotFoundError:  # also a removed number (KeyDeletedError is a subclass)
            return None
        return Listing.model_validate_json(entry.value) if entry.value else None

    async def listed(self, tenant: str, number: str) -> bool:
        return await self.get(tenant, number) is not None

    async def add(self, tenant: str, number: str, source: Source, reason: str | None = None) -> tuple[Listing, bool]:
        """List `number` (E.164): (its listing, whether it is new). A number already listed keeps
        its first listing, so when and why it was first added is never overwritten."""
        listing = Listing(phone_number=number, added_at=now(), source=source, reason=reason)
        if await self._create(tenant, listing):
            return listing, True
        return await self.get(tenant, number) or listing, False

    async def add_many(self, tenant: str, numbers: Iterable[str], source: Source) -> int:
        """List every number; how many were not listed before."""
        added = 0
        pending = list(numbers)
        for start in range(0, len(pending), _BATCH):
            created = await asyncio.gather(*(self._create(tenant, Listing(phone_number=n, added_at=now(), source=source))
                                             for n in pending[start:start + _BATCH]))
            added += sum(created)
        return added

    async def _create(self, tenant: str, listing: Listing) -> bool:
        """Write the listing unless the number is listed; whether it was written."""
        try:
            await self._kv.create(self.key(tenant, listing.phone_number), listing.model_dump_json().encode())
        except KeyWrongLastSequenceError:
            return False
        return True

    async def remove(self, tenant: str, number: str) -> bool:
        """Take `number` off the list; False when it was not on it."""
        if await self.get(tenant, number) is None:
            return False
        await self._kv.delete(self.key(tenant, number))
        return True
