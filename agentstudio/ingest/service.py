"""The ingest process's long-lived parts: the NATS connection, the bundle watcher, the rate limiter."""

from __future__ import annotations

import asyncio
import logging
import tempfile
from pathlib import Path

import nats.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from agentstudio import bus
from agentstudio.bundle_store import BundleWatcher, Snapshot, buckets
from agentstudio.ingest.ratelimit import RateLimiter
from agentstudio.settings import Settings
from agentstudio.usage import UsageCounter
from agentstudio.calls_table import CallsTable
from agentstudio.callstate import CallStore
from agentstudio.concurrency import Concurrency
from agentstudio.do_not_call import DoNotCall
from agentstudio.ingest.console.sessions import Sessions
from agentstudio.metrics import CallMetrics
from agentstudio.tracking import CallTracker

log = logging.getLogger("agentstudio.ingest")


class IngestService:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._watcher: BundleWatcher | None = None
        self._limiter: RateLimiter | None = None
        self._usage: UsageCounter | None = None
        self._tracker: CallTracker | None = None
        self._dnc: DoNotCall | None = None
        self._sessions: Sessions | None = None
        self._table: CallsTable | None = None
        # Calls this process ended (provider callbacks, cancels) and the bundles it serves, beside the
        # app's request metrics (IngestMetrics): /metrics renders both.
        self.metrics = CallMetrics()

    async def start(self) -> None:
        self.nc = await bus.connect_retrying(
            self.settings.nats_url, "agentstudio-ingest", on_reconnect=self._resubscribe,
            auth=self.settings.nats_auth(), replicas=self.settings.nats_replicas,
        )
        self._js = self.nc.jetstream(timeout=self.settings.publish_timeout_seconds)
        await bus.ensure_calls_stream(self._js)
        self._watcher = BundleWatcher(await buckets(self._js))
        await self._watcher.start()
        self.metrics.watch_bundles(self._watcher)
        self._limiter = RateLimiter(await bus.ratelimit_bucket(self._js), self.settings.rate_limit_lease_divisor)
        self._usage = UsageCounter(await bus.usage_bucket(self._js), self.settings.usage_flush_seconds)
        self._usage.start()
        await bus.ensure_events_stream(self._js)
        await bus.ensure_voicemail_stream(self._js)  # machines' verdicts, for the dialers
        self._tracker = CallTracker(
            self._js, CallStore(await bus.calls_bucket(self._js)), Concurrency(await bus.concurrency_bucket(self._js)),
            ended=self.metrics.calls_ended,
        )
        self._dnc = DoNotCall(await bus.dnc_bucket(self._js))
        folder = self.settings.calls_index_dir or Path(tempfile.gettempdir()) / "agentstudio-calls"
        self._table = CallsTable(Path(folder))
        await self._table.start(self._js)
        lifetime = self.settings.console_session_seconds
        self._sessions = Sessions(await bus.console_sessions_bucket(self._js, lifetime), lifetime)
        log.info("ingest connected to nats")

    async def _resubscribe(self) -> None:
        if self._watcher is not None:
            self._watcher.restart_soon()  # retried until it runs; the old bundles serve meanwhile
            try:
                await bus.ensure_calls_stream(self.js)  # in case the server came back empty
            except (nats.errors.Error, asyncio.TimeoutError) as exc:  # publishes answer 503 meanwhile
                log.warning("calls stream not checked after the reconnect", extra={"error": type(exc).__name__})

    async def stop(self) -> None:
        if self._table is not None:
            await self._table.stop()
        if self._usage is not None:
            await self._usage.stop()
        if self._watcher is not None:
            await self._watcher.stop()
        if self.nc is not None and not self.nc.is_closed:
            await self.nc.drain()

    @property
    def js(self) -> JetStreamContext:
        assert self._js is not None, "IngestService not started"
        return self._js

    @property
    def limiter(self) -> RateLimiter:
        assert self._limiter is not None, "IngestService not started"
        return self._limiter

    @property
    def tracker(self) -> CallTracker:
        assert self._tracker is not None, "IngestService not started"
        return self._tracker

    @property
    def table(self) -> CallsTable:
        assert self._table is not None, "IngestService not started"
        return self._table

    @property
    def dnc(self) -> DoNotCall:
        assert self._dnc is not None, "IngestService not started"
        return self._dnc

    @property
    def sessions(self) -> Sessions:
        assert self._sessions is not None, "IngestService not started"
        return self._sessions

    @property
    def usage(self) -> UsageCounter:
        assert self._usage is not None, "IngestService not started"
        return self._usage

    @property
    def snapshot(self) -> Snapshot:
        return self._watcher.snapshot if self._watcher is not None else Snapshot()

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    @property
    def ready(self) -> bool:
        return self.connected and self._watcher is not None and self._watcher.loaded.is_set() and bool(
            self.snapshot.bundles
        )
