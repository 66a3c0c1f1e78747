"""Prometheus metrics more than one role exports: calls reaching their end (ingest's provider
callbacks and cancels, the dialers' own ends) and the bundles a process serves (ingest and dialers).
Labels are bounded: tenants, statuses and end reasons, never a call id or a phone number."""

from __future__ import annotations

import re
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from agentstudio.bundle_store import BundleWatcher

# End reasons are our own constants, but a label must stay bounded whatever reaches it.
_REASON = re.compile(r"[a-z][a-z0-9_]{0,39}")


class CallMetrics:
    """What a role that moves calls and serves bundles exports, in a registry of its own (tests run
    several processes' worth in one)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # Counted by the one process whose write ended the call (the compare-and-set decides).
        self.calls_ended = Counter("agentstudio_calls_ended",
                                   "Calls that reached a final status, by tenant, status and end reason.",
                                   ["tenant", "status", "end_reason"], registry=self.registry)

    def watch_bundles(self, watcher: BundleWatcher) -> None:
        self.registry.register(LoadedBundles(watcher))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def end_reason_label(end_reason: str | None) -> str:
    if end_reason is None:
        return "none"
    return end_reason if _REASON.fullmatch(end_reason) else "other"


class LoadedBundles(Collector):
    """The version and compile time of the bundle this process serves for each tenant, read from the
    watcher's snapshot at each scrape (no I/O)."""

    def __init__(self, watcher: BundleWatcher) -> None:
        self._watcher = watcher

    def collect(self) -> Iterator[GaugeMetricFamily]:
        version = GaugeMetricFamily("agentstudio_bundle_loaded_version",
                                    "Version of the bundle this process serves, by tenant.", labels=["tenant"])
        compiled = GaugeMetricFamily("agentstudio_bundle_loaded_compiled_timestamp_seconds",
                                     "When the bundle this process serves was compiled, by tenant.", labels=["tenant"])
        for tenant, bundle in sorted(self._watcher.snapshot.bundles.items()):
            version.add_metric([tenant], bundle.version)
            compiled.add_metric([tenant], bundle.compiled_at.timestamp())
        yield version
        yield compiled
