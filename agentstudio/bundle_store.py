"""Bundles in the NATS KV bucket: publishing (operator, dev) and watching (ingest, dialers).

Publishing is compare-and-set on the tenant's key, so versions only grow and two publishers never
overwrite each other blindly. Watchers parse each new value before swapping it in: a value that does
not parse is logged and ignored, so the last good bundle stays in force.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from pydantic import ValidationError

from agentstudio.bundle import SCHEMA_VERSION, Bundle, KeyEntry

log = logging.getLogger("agentstudio.bundles")

KEY_INDEX_PREFIX = 16  # hex characters of a key digest used to find candidates


async def publish(kv: KeyValue, bundle: Bundle) -> Bundle:
    """Store `bundle` as its tenant's newest version; unchanged content is not republished.

    A bundle's version is the KV revision it was stored at: it grows with every change and needs
    no counter of its own (a garbled value in between cannot reset it).
    """
    while True:
        try:
            entry = await kv.get(bundle.tenant)
            revision: int | None = entry.revision
            current = _parse(entry.value)
        except KeyNotFoundError:
            current, revision = None, None
        if current is not None and current.digest == bundle.digest:
            return current.model_copy(update={"version": revision})
        payload = bundle.model_copy(update={"version": 0}).to_bytes()
        try:
            if revision is None:
                stored = await kv.create(bundle.tenant, payload)
            else:
                stored = await kv.update(bundle.tenant, payload, last=revision)
            return bundle.model_copy(update={"version": stored})
        except KeyWrongLastSequenceError:
            continue  # someone published in between: re-read and try again


def _parse(value: bytes | None) -> Bundle | None:
    try:
        return Bundle.from_bytes(value) if value else None
    except ValidationError:
        return None


async def remove(kv: KeyValue, tenant: str) -> None:
    await kv.delete(tenant)


@dataclass(frozen=True)
class Snapshot:
    """Every tenant's bundle at one moment; a request reads one snapshot from start to end."""

    bundles: Mapping[str, Bundle] = field(default_factory=lambda: MappingProxyType({}))
    # digest prefix → [(full digest, tenant, entry)]
    keys: Mapping[str, tuple[tuple[str, str, KeyEntry], ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )

    @classmethod
    def of(cls, bundles: dict[str, Bundle]) -> Snapshot:
        index: dict[str, list[tuple[str, str, KeyEntry]]] = {}
        for tenant, bundle in bundles.items():
            for digest, entry in bundle.keys.items():
                index.setdefault(digest[:KEY_INDEX_PREFIX], []).append((digest, tenant, entry))
        keys = {prefix: tuple(candidates) for prefix, candidates in index.items()}
        return cls(MappingProxyType(dict(bundles)), MappingProxyType(keys))


class BundleWatcher:
    """Keeps the newest good bundle of every tenant; `snapshot` is swapped atomically."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv
        self.snapshot = Snapshot()
        self.loaded = asyncio.Event()  # the initial values have been read
        self._task: asyncio.Task[None] | None = None
        self._watcher: KeyValue.KeyWatcher | None = None

    async def start(self) -> None:
        self._watcher = await self._kv.watchall()
        self._task = asyncio.create_task(self._run(self._watcher), name="bundle-watcher")

    async def restart(self) -> None:
        """Watch again from the current values (after a reconnect, the old watch is gone)."""
        await self.stop()
        await self.start()
        log.info("bundle watch restarted")

    async def stop(self) -> None:
        if self._watcher is not None:
            try:
                await self._watcher.stop()
            except Exception:  # noqa: BLE001 - the connection may already be closed
                pass
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self, watcher: KeyValue.KeyWatcher) -> None:
        async for entry in watcher:
            if entry is None:  # end of the initial values
                self.loaded.set()
                continue
            self._apply(entry)
            if entry.delta == 0:
                self.loaded.set()

    def _apply(self, entry: KeyValue.Entry) -> None:
        tenant = entry.key
        bundles = dict(self.snapshot.bundles)
        if entry.operation in ("DEL", "PURGE") or not entry.value:
            if bundles.pop(tenant, None) is not None:
                log.info("bundle removed", extra={"tenant": tenant})
                self.snapshot = Snapshot.of(bundles)
            return
        try:
            bundle = Bundle.from_bytes(entry.value).model_copy(update={"version": entry.revision})
        except ValidationError as exc:
            log.error("bundle rejected, keeping the last good one", extra={"tenant": tenant, "error": str(exc)[:500]})
            return
        if bundle.schema_version != SCHEMA_VERSION or bundle.tenant != tenant:
            log.error("bundle rejected: wrong schema or tenant", extra={"tenant": tenant})
            return
        current = bundles.get(tenant)
        if current is not None and current.version >= bundle.version:
            return
        bundles[tenant] = bundle
        self.snapshot = Snapshot.of(bundles)
        log.info("bundle loaded", extra={"tenant": tenant, "version": bundle.version})
