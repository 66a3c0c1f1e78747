"""API key usage (request counts, last use): counted in memory by each ingest process, added to the
shared totals in the `as-usage` KV bucket every few seconds, shown on the ApiKey's status by the
operator. Nothing of it is on the request path but a dict update."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime, timezone

import orjson
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from pydantic import BaseModel

log = logging.getLogger("agentstudio.usage")

FLUSH_SECONDS = 5.0


class Usage(BaseModel):
    requests: int = 0  # authenticated requests made with the key
    accepted: int = 0  # calls it queued
    last_used_at: datetime | None = None


def usage_key(tenant: str, apikey: str) -> str:
    return f"{tenant}.{apikey}"


@dataclass
class _Delta:
    requests: int = 0
    accepted: int = 0
    last_used_at: float = 0.0


class UsageCounter:
    def __init__(self, kv: KeyValue, flush_seconds: float = FLUSH_SECONDS) -> None:
        self._kv = kv
        self._flush_seconds = flush_seconds
        self._deltas: dict[str, _Delta] = {}
        self._task: asyncio.Task[None] | None = None

    def request(self, tenant: str, apikey: str, now: float) -> None:
        delta = self._deltas.setdefault(usage_key(tenant, apikey), _Delta())
        delta.requests += 1
        delta.last_used_at = now

    def accepted(self, tenant: str, apikey: str) -> None:
        self._deltas.setdefault(usage_key(tenant, apikey), _Delta()).accepted += 1

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="usage-flush")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            await self.flush()
        except Exception:  # noqa: BLE001 - best effort at shutdown
            log.warning("usage not flushed at shutdown")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._flush_seconds)
            try:
                await self.flush()
            except Exception:  # noqa: BLE001 - kept and retried at the next flush
                log.warning("usage flush failed; will retry", exc_info=True)

    async def flush(self) -> None:
        deltas, self._deltas = self._deltas, {}
        for key, delta in deltas.items():
            try:
                await self._add(key, delta)
            except Exception:
                # Put it back so the counts are not lost.
                kept = self._deltas.setdefault(key, _Delta())
                kept.requests += delta.requests
                kept.accepted += delta.accepted
                kept.last_used_at = max(kept.last_used_at, delta.last_used_at)
                raise

    async def _add(self, key: str, delta: _Delta) -> None:
        while True:
            try:
                entry = await self._kv.get(key)
                current, revision = Usage.model_validate_json(entry.value or b"{}"), entry.revision
            except KeyNotFoundError:
                current, revision = Usage(), None
            last = datetime.fromtimestamp(delta.last_used_at, timezone.utc) if delta.last_used_at else None
            total = Usage(
                requests=current.requests + delta.requests,
                accepted=current.accepted + delta.accepted,
                last_used_at=max((t for t in (current.last_used_at, last) if t), default=None),
            )
            value = orjson.dumps(total.model_dump(mode="json"))
            try:
                if revision is None:
                    await self._kv.create(key, value)
                else:
                    await self._kv.update(key, value, last=revision)
                return
            except KeyWrongLastSequenceError:
                continue
