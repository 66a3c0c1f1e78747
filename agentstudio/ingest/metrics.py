"""Prometheus metrics of ingest, kept in one registry per app so tests can run several apps."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

INGEST_PATH = "/api/v1/webhooks/ingest"


class IngestMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.accepted = Counter("agentstudio_ingest_accepted", "Calls accepted and queued.", registry=self.registry)
        self.rejected = Counter(
            "agentstudio_ingest_rejected", "Ingest requests rejected, by status code.", ["code"], registry=self.registry
        )
        self.latency = Histogram(
            "agentstudio_ingest_latency_seconds",
            "Ingest request latency.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI middleware (cheaper than BaseHTTPMiddleware) that times the ingest route."""

    def __init__(self, app: Any, metrics: IngestMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != INGEST_PATH:
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.latency.observe(time.perf_counter() - start)
            if status == 201:
                self.metrics.accepted.inc()
            else:
                self.metrics.rejected.labels(str(status)).inc()
