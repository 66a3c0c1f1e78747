"""`agent-studio operator`: kopf with our handlers, a Kubernetes client and the bundle bucket."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading

import kopf

from agentstudio import bundle_store, bus
from agentstudio.bundle import Bundle, compile_bundle
from agentstudio.operator import handlers
from agentstudio.operator.kube import Kube
from agentstudio.operator.metrics import OperatorMetrics
from agentstudio.operator.reconciler import Reconciler
from agentstudio.operator.usage import report_usage, watch_gone
from agentstudio.settings import Settings

log = logging.getLogger("agentstudio.operator")

PEERING_NAME = "agent-studio"

# Exit well inside the kubelet's grace period (30 s by default) even with the API server gone: kopf
# would otherwise spend ~90 s retrying its last peering patch (error backoffs 1, 1, 2, … 21 s).
SHUTDOWN_SECONDS = 8.0


def empty_bundle(namespace: str, max_concurrent_calls: int | None = None,
                 calls_per_second: float | None = None) -> Bundle:
    bundle = compile_bundle(namespace, [], {}, max_concurrent_calls=max_concurrent_calls,
                            calls_per_second=calls_per_second).bundle
    assert bundle is not None  # nothing to refuse in nothing
    return bundle


async def run(settings: Settings, namespaces: list[str], stop: asyncio.Event | None = None) -> None:
    """Serve `namespaces` (all namespaces when empty) until stopped: `stop` set, or SIGTERM/SIGINT."""
    stop = stop or asyncio.Event()
    nc = await bus.connect_retrying(settings.nats_url, "agentstudio-operator", auth=settings.nats_auth(),
                                   replicas=settings.nats_replicas)
    try:
        kv = await bundle_store.buckets(nc.jetstream())
        for namespace in namespaces:
            # An empty tenant is a tenant: ingest is ready before any manifest is applied. Only where
            # no bundle exists, so a standby replica never overwrites what the active one published.
            await bundle_store.publish(kv, empty_bundle(namespace, settings.max_concurrent_calls_per_tenant,
                                                        settings.calls_per_second_per_tenant), replace=False)
        kube = Kube()
        memo = kopf.Memo()
        metrics = OperatorMetrics()
        reconciler = Reconciler(kube, kv, lambda ns: handlers.resources_of(memo.indexes, ns),
                                max_concurrent_calls=settings.max_concurrent_calls_per_tenant,
                                calls_per_second=settings.calls_per_second_per_tenant, metrics=metrics)
        handlers.install(memo, kube, reconciler)
        js = nc.jetstream()
        _, gone_bucket = await bus.ensure_webhooks(js)
        started = asyncio.Event(), asyncio.Event()
        observers = [
            asyncio.create_task(report_usage(await bus.usage_bucket(js), kube, namespaces, started=started[0]),
                                name="usage-report"),
            asyncio.create_task(watch_gone(gone_bucket, reconciler, namespaces, started=started[1]),
                                name="webhooks-gone"),
        ]
        metrics_server = None
        if settings.operator_metrics_port:
            metrics_server = metrics.serve(settings.host, settings.operator_metrics_port)
            observers.append(asyncio.create_task(
                metrics.keep(kv, namespaces, settings.metrics_refresh_seconds, stop), name="metrics-refresh"))
        # kopf takes every task that exists after it starts for its own and, on the way out, waits
        # 5 s for those that have not ended: the observers' watches (tasks of their own) open first.
        watching = asyncio.ensure_future(asyncio.gather(*(e.wait() for e in started)))
        done, _ = await asyncio.wait([watching, *observers], return_when=asyncio.FIRST_COMPLETED)
        if watching not in done:
            watching.cancel()
            for task in done:
                task.result()  # an observer that ended before watching: its error
        log.info("operator starting", extra={"namespaces": namespaces or "all"})
        try:
            # kopf.operator() is spawn_tasks + run_tasks; between the two, our signal handlers
            # replace the ones spawn_tasks installs, to bound the shutdown.
            kopf_settings = kopf.OperatorSettings()
            existing = asyncio.all_tasks()
            tasks = await kopf.spawn_tasks(
                namespaces=namespaces,
                clusterwide=not namespaces,
                settings=kopf_settings,
                memo=memo,
                peering_name=PEERING_NAME,
                stop_flag=stop,
                liveness_endpoint=settings.operator_liveness_endpoint or None,
            )
            if threading.current_thread() is threading.main_thread():
                loop = asyncio.get_running_loop()
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.add_signal_handler(sig, _shut_down, sig, stop, kopf_settings, reconciler)
            await kopf.run_tasks(tasks, ignored=existing)
        finally:
            for task in observers:
                task.cancel()
            await asyncio.gather(*observers, return_exceptions=True)
            if metrics_server is not None:
                metrics_server.shutdown()
                metrics_server.server_close()
    finally:
        await nc.close()


def _shut_down(sig: signal.Signals, stop: asyncio.Event, settings: kopf.OperatorSettings, reconciler: Reconciler) -> None:
    if stop.is_set():
        return
    log.info("stopping", extra={"signal": sig.name})
    reconciler.stop()
    # What kopf still sends (its last peering patch, progress annotations) gets one quick try: an
    # API server that is unreachable now will not be back within the grace period.
    settings.networking.error_backoffs = [0.5]
    settings.networking.connect_timeout = 2.0
    settings.networking.request_timeout = 3.0
    stop.set()
    # Whatever else hangs (a Kubernetes client call in a thread against a silent address), the
    # process still ends before the kubelet's SIGKILL; exit code 1 says the shutdown was cut short.
    watchdog = threading.Timer(SHUTDOWN_SECONDS, _exit_unfinished)
    watchdog.daemon = True
    watchdog.start()


def _exit_unfinished() -> None:
    log.error("shutdown did not finish in time; exiting", extra={"seconds": SHUTDOWN_SECONDS})
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)
