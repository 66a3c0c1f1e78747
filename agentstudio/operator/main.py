"""`agent-studio operator`: kopf with our handlers, a Kubernetes client and the bundle bucket."""

from __future__ import annotations

import asyncio
import logging

import kopf

from agentstudio import bus
from agentstudio.operator import handlers
from agentstudio.operator.kube import Kube
from agentstudio.operator.reconciler import Reconciler
from agentstudio.operator.usage import report_usage, watch_gone
from agentstudio.settings import Settings

log = logging.getLogger("agentstudio.operator")

PEERING_NAME = "agent-studio"


async def run(settings: Settings, namespaces: list[str], stop: asyncio.Event | None = None) -> None:
    """Serve `namespaces` (all namespaces when empty) until stopped."""
    nc = await bus.connect_retrying(settings.nats_url, "agentstudio-operator")
    try:
        kv = await bus.bundles_bucket(nc.jetstream())
        kube = Kube()
        memo = kopf.Memo()
        reconciler = Reconciler(kube, kv, lambda ns: handlers.resources_of(memo.indexes, ns))
        handlers.install(memo, kube, reconciler)
        js = nc.jetstream()
        _, gone_bucket = await bus.ensure_webhooks(js)
        observers = [
            asyncio.create_task(report_usage(await bus.usage_bucket(js), kube, namespaces), name="usage-report"),
            asyncio.create_task(watch_gone(gone_bucket, reconciler, namespaces), name="webhooks-gone"),
        ]
        log.info("operator starting", extra={"namespaces": namespaces or "all"})
        try:
            await kopf.operator(
                namespaces=namespaces,
                clusterwide=not namespaces,
                memo=memo,
                peering_name=PEERING_NAME,
                stop_flag=stop,
                liveness_endpoint=settings.operator_liveness_endpoint or None,
            )
        finally:
            for task in observers:
                task.cancel()
            await asyncio.gather(*observers, return_exceptions=True)
    finally:
        await nc.close()
