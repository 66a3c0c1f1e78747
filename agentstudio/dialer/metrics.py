"""Prometheus metrics of a dialer beside its voice agent's: calls ended, webhook deliveries by outcome,
the tenants' concurrency slots and the bundles it serves. One registry per dialer (tests run several)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator

from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from agentstudio.bundle_store import BundleWatcher
from agentstudio.concurrency import Concurrency
from agentstudio.metrics import CallMetrics

log = logging.getLogger("agentstudio.dialer")


class DialerMetrics(CallMetrics):
    def __init__(self) -> None:
        super().__init__()
        # Each attempt's outcome: delivered, retry (failed, tried again later), dead_lettered (the
        # schedule used up) or gone (the receiver answered 410 and the subscription is disabled).
        self.webhook_deliveries = Counter("agentstudio_webhook_deliveries", "Webhook delivery attempts, by outcome.",
                                          ["tenant", "outcome"], registry=self.registry)
        self._slots: dict[str, tuple[int, int]] = {}  # tenant → (in use, cap), as last read
        self.registry.register(_Slots(lambda: self._slots))

    async def refresh_slots(self, concurrency: Concurrency, tenants: list[str], cap: Callable[[str], int]) -> None:
        """One read of each tenant's slots record; tenants gone from the bundles are dropped."""
        self._slots = {tenant: (len(await concurrency.holders(tenant)), cap(tenant)) for tenant in tenants}

    async def keep_slots(self, concurrency: Concurrency, bundles: BundleWatcher, cap: Callable[[str], int],
                         every: float, stop: asyncio.Event) -> None:
        """Refresh the slot gauges every `every` seconds until `stop`: on a timer, never per call."""
        while not stop.is_set():
            try:
                await self.refresh_slots(concurrency, sorted(bundles.snapshot.bundles), cap)
            except Exception as exc:  # noqa: BLE001 - NATS away: the next refresh tries again
                log.warning("concurrency slots not read for metrics; retrying", extra={"error": type(exc).__name__})
            try:
                await asyncio.wait_for(stop.wait(), every)
            except TimeoutError:
                pass


class _Slots(Collector):
    """The slots as last read. Every dialer reads the same shared record, so each reports the same
    value: aggregate with max, not sum."""

    def __init__(self, read: Callable[[], dict[str, tuple[int, int]]]) -> None:
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        in_use = GaugeMetricFamily("agentstudio_concurrency_slots_in_use",
                                   "Calls holding one of the tenant's concurrent-call slots.", labels=["tenant"])
        cap = GaugeMetricFamily("agentstudio_concurrency_slots_cap", "The tenant's concurrent-call cap.",
                                labels=["tenant"])
        for tenant, (used, limit) in sorted(self._read().items()):
            in_use.add_metric([tenant], used)
            cap.add_metric([tenant], limit)
        yield in_use
        yield cap
