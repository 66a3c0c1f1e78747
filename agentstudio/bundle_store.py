"""Bundles in NATS: publishing (operator, dev) and watching (ingest, dialers).

A bundle can be far larger than the 1 MiB a NATS message may carry, so its body is an object in
JetStream's object store (which chunks it) and the tenant's key in the KV bucket holds only a small
head naming that body. Bodies are zlib-compressed JSON: a bundle of thousands of resources repeats
itself, and the object store's reader pauses for flow control every few MiB. Publishing writes a body under a name of its own, then moves the head with
compare-and-set: versions (head revisions) only grow, two publishers never overwrite each other
blindly, and a head never names a body that is not completely written. Watchers follow the heads and
parse each new body before swapping it in: a head or body that does not parse is logged and ignored,
so the last good bundle stays in force.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import ctypes.util
import hashlib
import logging
import time
import uuid
import zlib
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Mapping

import nats.errors
from nats.js import JetStreamContext
from nats.js.errors import DigestMismatchError, KeyNotFoundError, KeyWrongLastSequenceError, ObjectNotFoundError
from nats.js.kv import KeyValue
from nats.js.object_store import (
    OBJ_ALL_META_PRE_TEMPLATE,
    OBJ_CHUNKS_PRE_TEMPLATE,
    OBJ_DIGEST_TYPE,
    OBJ_STREAM_TEMPLATE,
    ObjectStore,
)
from pydantic import BaseModel, ConfigDict, ValidationError

from agentstudio import bus
from agentstudio.bundle import SCHEMA_VERSION, Bundle, KeyEntry

log = logging.getLogger("agentstudio.bundles")

KEY_INDEX_PREFIX = 16  # hex characters of a key digest used to find candidates
# A body no head names may be a concurrent publisher's that is about to be named; younger ones are
# left for a later sweep.
STRAY_AGE_SECONDS = 60.0
FETCH_ATTEMPTS = 5
COMPRESSION = 1  # zlib's fastest level: 7 MiB of JSON → 0.4 MiB in 16 ms, nearly level 6's size


@dataclass(frozen=True)
class Buckets:
    """Where bundles live: heads in a KV bucket, bodies in an object store."""

    js: JetStreamContext
    heads: KeyValue
    bodies: ObjectStore


async def buckets(js: JetStreamContext) -> Buckets:
    return Buckets(js, await bus.bundles_bucket(js), await bus.bundle_bodies_bucket(js))


class Head(BaseModel):
    """A tenant's KV value: which body is its bundle, and that bundle's content digest (so an
    unchanged bundle is recognised without fetching its body)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    body: str
    digest: str


async def publish(store: Buckets, bundle: Bundle, replace: bool = True) -> Bundle:
    """Store `bundle` as its tenant's newest version; unchanged content is not republished. With
    `replace` false a tenant that has a bundle keeps it (the version returned is the kept one's).

    A bundle's version is the KV revision of the head that names it: it grows with every change and
    needs no counter of its own (a garbled head in between cannot reset it).
    """
    body: str | None = None
    named = False
    try:
        while True:
            current, revision = await _head(store.heads, bundle.tenant)
            if current is not None and current.digest == bundle.digest and revision is not None:
                return bundle.model_copy(update={"version": revision})
            if not replace and revision is not None:
                return bundle.model_copy(update={"version": revision})
            if body is None:
                body = _body_name(bundle.tenant)
                data = zlib.compress(bundle.model_copy(update={"version": 0}).to_bytes(), COMPRESSION)
                await store.bodies.put(body, data)
            value = Head(body=body, digest=bundle.digest).model_dump_json().encode()
            try:
                if revision is None:
                    stored = await store.heads.create(bundle.tenant, value)
                else:
                    stored = await store.heads.update(bundle.tenant, value, last=revision)
            except KeyWrongLastSequenceError:
                continue  # someone published in between: re-read and try again
            named = True
            try:
                await _sweep(store, bundle.tenant, keep={body, current.body if current else ""})
            except (nats.errors.Error, asyncio.TimeoutError) as exc:  # published all the same
                log.warning("old bundle bodies not deleted; the next publish tries again",
                            extra={"tenant": bundle.tenant, "error": type(exc).__name__})
            return bundle.model_copy(update={"version": stored})
    finally:
        if body is not None and not named:
            # Lost to an equal bundle, or failed: the body is nobody's (if this fails too, a later
            # sweep takes it).
            with contextlib.suppress(nats.errors.Error, asyncio.TimeoutError):
                await _drop(store, body)


async def _head(heads: KeyValue, tenant: str) -> tuple[Head | None, int | None]:
    try:
        entry = await heads.get(tenant)
    except KeyNotFoundError:
        return None, None
    return _parse_head(entry.value), entry.revision


def _parse_head(value: bytes | None) -> Head | None:
    try:
        return Head.model_validate_json(value) if value else None
    except ValidationError:
        return None


async def remove(store: Buckets, tenant: str) -> None:
    await store.heads.delete(tenant)
    await _sweep(store, tenant, keep=set(), min_age=0.0)


def _body_name(tenant: str) -> str:
    """A name no other publish uses, which says when it was written (so a sweep needs no request
    to know a body's age)."""
    return f"{tenant}/{time.time_ns() // 1_000_000}-{uuid.uuid4().hex[:12]}"


def _age_seconds(name: str) -> float:
    try:
        written_ms = int(name.rsplit("/", 1)[1].split("-", 1)[0])
    except (IndexError, ValueError):
        return float("inf")  # not one of ours
    return time.time() - written_ms / 1000


async def _sweep(store: Buckets, tenant: str, keep: set[str], min_age: float | None = None) -> None:
    """Delete the tenant's bodies but `keep` (the new head's and the replaced one's, which a watcher
    may still be fetching) and any younger than `min_age` (STRAY_AGE_SECONDS by default)."""
    min_age = STRAY_AGE_SECONDS if min_age is None else min_age
    for name in await _bodies_of(store, tenant):
        if name not in keep and _age_seconds(name) >= min_age:
            await _drop(store, name)


# The object store's own layout (NATS ADR-20): one meta subject per object, named in base64.
BODIES_STREAM = OBJ_STREAM_TEMPLATE.format(bucket=bus.BUNDLE_BODIES_BUCKET)
META_PREFIX = OBJ_ALL_META_PRE_TEMPLATE.format(bucket=bus.BUNDLE_BODIES_BUCKET)[:-1]


async def _bodies_of(store: Buckets, tenant: str) -> list[str]:
    """The tenant's body names, read from the stream's subject index (one request, however many)."""
    info = await store.js.stream_info(BODIES_STREAM, subjects_filter=f"{META_PREFIX}>")
    names = (base64.urlsafe_b64decode(s[len(META_PREFIX):]).decode() for s in info.state.subjects or {})
    return sorted(name for name in names if name.startswith(f"{tenant}/"))


async def _read(store: Buckets, name: str) -> bytes:
    """A body's bytes, chunk by chunk with direct gets. The object store's own get makes a consumer
    for every read, which the server keeps for seconds after it, and a server allows 1,000 a stream:
    an ingest or dialer starting beside many tenants ran out ("maximum consumers limit reached")."""
    info = await store.bodies.get_info(name)
    subject = OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=bus.BUNDLE_BODIES_BUCKET, obj=info.nuid)
    data, digest, seq = bytearray(), hashlib.sha256(), 1
    for _ in range(info.chunks or 0):
        chunk = await store.js.get_msg(BODIES_STREAM, seq=seq, subject=subject, next=True, direct=True)
        data += chunk.data or b""
        digest.update(chunk.data or b"")
        seq = chunk.seq + 1
    if len(data) != (info.size or 0) or digest.digest() != base64.urlsafe_b64decode(
        (info.digest or "").removeprefix(OBJ_DIGEST_TYPE)
    ):
        raise DigestMismatchError
    return bytes(data)


async def _drop(store: Buckets, name: str) -> None:
    """Delete a body completely: the object store's delete leaves a marker behind, which would
    pile up one per published version."""
    try:
        await store.bodies.delete(name)
    except ObjectNotFoundError:
        pass
    subject = f"{META_PREFIX}{base64.urlsafe_b64encode(name.encode()).decode()}"
    await store.js.purge_stream(BODIES_STREAM, subject=subject)


def _load_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # not glibc
        return None


_malloc_trim = _load_trim()


def _give_back_freed_memory() -> None:
    """Return the C heap's free pages to the system. Parsing a body (the JSON's tree, each agent as
    a model on its way to JSON) takes far more than the bundle keeps, and glibc keeps what is freed
    in the middle of its heap: 18 MiB for a bundle of 1,000 agents, workflows and keys, more than
    the 10 MiB the bundle itself holds."""
    if _malloc_trim is not None:
        _malloc_trim(0)


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

    def __init__(self, store: Buckets) -> None:
        self._store = store
        self.snapshot = Snapshot()
        self.loaded = asyncio.Event()  # the initial values have been read
        self._task: asyncio.Task[None] | None = None
        self._watcher: KeyValue.KeyWatcher | None = None
        self._empty_at_start = True
        self._restarting: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # nats-py marks the end of the initial values (None) when the new consumer's info says
        # nothing is pending; under load that can come before any value of a full bucket (all of
        # them already pushed, none yet handed over). Only an empty bucket may be loaded by it.
        status = await self._store.heads.status()
        self._empty_at_start = not status.values
        self._watcher = await self._store.heads.watchall()
        self._task = asyncio.create_task(self._run(self._watcher), name="bundle-watcher")

    async def restart(self) -> None:
        """Watch again from the current values (after a reconnect, the old watch is gone), retrying
        while NATS cannot start one (a cluster still electing leaders): a watch that is not running
        never sees another bundle, and a process has no other reason to try again."""
        await self.stop()
        delay = 0.2
        while True:
            try:
                await self.start()
                break
            except (nats.errors.Error, asyncio.TimeoutError) as exc:
                log.warning("bundle watch not restarted yet; retrying", extra={
                    "error": type(exc).__name__, "retry_in": delay})
                await asyncio.sleep(delay)
                delay = min(2 * delay, 5.0)
        log.info("bundle watch restarted")

    def restart_soon(self) -> None:
        """Restart in the background (a reconnection callback must not block nats-py's reconnect),
        replacing a restart still under way."""
        if self._restarting is not None:
            self._restarting.cancel()
        self._restarting = asyncio.create_task(self.restart(), name="bundle-watch-restart")

    async def stop(self) -> None:
        if self._restarting is not None and self._restarting is not asyncio.current_task():
            self._restarting.cancel()
            await asyncio.gather(self._restarting, return_exceptions=True)
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
            if entry is None:  # end of the initial values, if there were none (see start)
                if self._empty_at_start:
                    self.loaded.set()
                continue
            await self._apply(entry)
            if entry.delta == 0:
                self.loaded.set()

    async def _apply(self, entry: KeyValue.Entry) -> None:
        tenant = entry.key
        if entry.operation in ("DEL", "PURGE") or not entry.value:
            bundles = dict(self.snapshot.bundles)
            if bundles.pop(tenant, None) is not None:
                log.info("bundle removed", extra={"tenant": tenant})
                self.snapshot = Snapshot.of(bundles)
                _give_back_freed_memory()
            return
        current = self.snapshot.bundles.get(tenant)
        if current is not None and current.version >= entry.revision:
            return
        try:
            head = Head.model_validate_json(entry.value)
            data = zlib.decompress(await self._fetch(head.body))
            bundle = Bundle.from_bytes(data).model_copy(update={"version": entry.revision})
        except (ValidationError, zlib.error) as exc:
            log.error("bundle rejected, keeping the last good one", extra={"tenant": tenant, "error": str(exc)[:500]})
            return
        except ObjectNotFoundError:
            # Swept after a newer head replaced this one (the watch brings that one next).
            log.warning("bundle body gone, keeping the last good one", extra={"tenant": tenant, "version": entry.revision})
            return
        except (nats.errors.Error, asyncio.TimeoutError) as exc:  # incl. a digest mismatch of the chunks
            log.error("bundle body unreadable, keeping the last good one",
                      extra={"tenant": tenant, "version": entry.revision, "error": type(exc).__name__})
            return
        if bundle.schema_version != SCHEMA_VERSION or bundle.tenant != tenant:
            log.error("bundle rejected: wrong schema or tenant", extra={"tenant": tenant})
            return
        bundles = dict(self.snapshot.bundles)
        bundles[tenant] = bundle
        self.snapshot = Snapshot.of(bundles)
        log.info("bundle loaded", extra={"tenant": tenant, "version": bundle.version, "bytes": len(data)})
        _give_back_freed_memory()

    async def _fetch(self, body: str) -> bytes:
        """A body's bytes; a timeout or a dropped connection is retried, since the head that named
        the body will not be delivered again."""
        for attempt in range(FETCH_ATTEMPTS):
            try:
                return await _read(self._store, body)
            except (nats.errors.TimeoutError, nats.errors.ConnectionClosedError, asyncio.TimeoutError):
                if attempt == FETCH_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")
