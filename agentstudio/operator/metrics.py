"""Prometheus metrics the operator serves: its reconcile errors, and what it reads from NATS for every
tenant it serves on a timer: the dispatch queue (agentstudio.queue_depth) and the bundle versions it
published. The operator exports the queue because it runs once (standby replicas peer): every dialer
replica exporting it would cost a read per replica for the same numbers."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from nats.js.errors import KeyNotFoundError
from prometheus_client import CollectorRegistry, Counter, generate_latest, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from agentstudio import bus, queue_depth
from agentstudio.bundle_store import Buckets

log = logging.getLogger("agentstudio.operator")


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.reconciles = Counter("agentstudio_operator_reconciles", "Reconciles of a tenant's resources, by tenant.",
                                  ["tenant"], registry=self.registry)
        self.reconcile_errors = Counter("agentstudio_operator_reconcile_errors",
                                        "Reconciles that failed with an error and are retried, by tenant.",
                                        ["tenant"], registry=self.registry)
        self._read: _Read | None = None
        self.registry.register(_State(lambda: self._read))

    async def refresh(self, store: Buckets, namespaces: list[str]) -> None:
        """Read the queue and the published bundle versions of the tenants served (every tenant with
        a bundle when `namespaces` is empty)."""
        tenants = [t for t in await bus.kv_keys(store.js, bus.BUNDLES_BUCKET, "") if not namespaces or t in namespaces]
        versions = {}
        for tenant in tenants:
            try:
                versions[tenant] = (await store.heads.get(tenant)).revision
            except KeyNotFoundError:  # removed since the keys were listed
                continue
        queue = await queue_depth.read(store.js, sorted(versions))
        self._read = _Read(queue, versions, time.time())

    async def keep(self, store: Buckets, namespaces: list[str], every: float, stop: asyncio.Event) -> None:
        """Refresh every `every` seconds until `stop`: on a timer, never per call."""
        while not stop.is_set():
            try:
                await self.refresh(store, namespaces)
            except Exception as exc:  # noqa: BLE001 - NATS away: the gauges keep their last read, and say when
                log.warning("queue not read for metrics; retrying", extra={"error": type(exc).__name__})
            try:
                await asyncio.wait_for(stop.wait(), every)
            except TimeoutError:
                pass

    def serve(self, host: str, port: int) -> WSGIServer:
        """/metrics on `port`, in a thread of its own (kopf owns the loop's tasks)."""
        server, _ = start_http_server(port, host, self.registry)
        return server

    def render(self) -> bytes:
        return generate_latest(self.registry)


@dataclass(frozen=True)
class _Read:
    queue: queue_depth.Queue
    versions: dict[str, int]  # tenant → published bundle version
    at: float


class _State(Collector):
    """The last read of NATS; nothing before the first."""

    def __init__(self, last: Callable[[], _Read | None]) -> None:
        self._last = last

    def collect(self) -> Iterator[GaugeMetricFamily]:
        read = self._last()
        pending = GaugeMetricFamily("agentstudio_queue_pending_calls",
                                    "Calls queued for dialing and not yet taken by a dialer, by tenant.",
                                    labels=["tenant"])
        age = GaugeMetricFamily("agentstudio_queue_oldest_pending_age_seconds",
                                "Age of the oldest call queued and not yet taken by a dialer (0: none), by tenant.",
                                labels=["tenant"])
        version = GaugeMetricFamily("agentstudio_bundle_published_version",
                                    "Version of the newest bundle published, by tenant.", labels=["tenant"])
        ack_pending = GaugeMetricFamily("agentstudio_queue_ack_pending_calls",
                                        "Calls taken by dialers and not placed yet: waiting for a slot under a cap, "
                                        "paced, or being placed.")
        unacked = GaugeMetricFamily("agentstudio_queue_oldest_unacked_age_seconds",
                                    "Age of the oldest queued call not yet placed, taken by a dialer or not (0: none).")
        read_at = GaugeMetricFamily("agentstudio_queue_read_timestamp_seconds",
                                    "When the queue and bundle versions were last read from NATS.")
        if read is not None:
            for tenant, backlog in sorted(read.queue.tenants.items()):
                pending.add_metric([tenant], backlog.pending)
                age.add_metric([tenant], backlog.oldest_age_seconds)
            for tenant, published in sorted(read.versions.items()):
                version.add_metric([tenant], published)
            ack_pending.add_metric([], read.queue.ack_pending)
            unacked.add_metric([], read.queue.oldest_unacked_age_seconds)
            read_at.add_metric([], read.at)
        yield from (pending, age, version, ack_pending, unacked, read_at)
