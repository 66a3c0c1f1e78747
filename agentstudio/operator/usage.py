"""What dialers and ingest observe, shown on status: API key usage (the `as-usage` totals ingest keeps:
requestCount, acceptedCount, lastUsedAt, written at most once per interval per key), and webhook
receivers that answered 410 Gone (the `as-webhook-disabled` marks dialers write)."""

from __future__ import annotations

import asyncio
import logging

from nats.js.kv import KeyValue
from pydantic import ValidationError

import orjson

from agentstudio.operator.kube import Kube
from agentstudio.operator.reconciler import Reconciler
from agentstudio.usage import Usage

log = logging.getLogger("agentstudio.operator")


async def report_usage(
    kv: KeyValue, kube: Kube, namespaces: list[str], interval: float = 5.0, started: asyncio.Event | None = None
) -> None:
    """Run until cancelled. `namespaces` empty: every namespace. `started` is set once it watches."""
    pending: dict[tuple[str, str], Usage] = {}
    watcher = await kv.watchall()

    async def collect() -> None:
        async for entry in watcher:
            if entry is None or not entry.value:
                continue
            tenant, _, apikey = entry.key.partition(".")
            if namespaces and tenant not in namespaces:
                continue
            try:
                pending[(tenant, apikey)] = Usage.model_validate_json(entry.value)
            except ValidationError:
                log.warning("ignoring a malformed usage record", extra={"tenant": tenant})

    collector = asyncio.create_task(collect(), name="usage-collect")
    if started is not None:
        started.set()
    try:
        while True:
            await asyncio.sleep(interval)
            batch = list(pending.items())
            pending.clear()
            for (tenant, apikey), usage in batch:
                status = {
                    "requestCount": usage.requests,
                    "acceptedCount": usage.accepted,
                    "lastUsedAt": usage.last_used_at.strftime("%Y-%m-%dT%H:%M:%SZ") if usage.last_used_at else None,
                }
                try:
                    await kube.patch_status("apikeys", tenant, apikey, status)
                except Exception:  # noqa: BLE001 - the next total comes with the next flush
                    log.warning("could not write usage", extra={"tenant": tenant, "api_key": apikey})
    finally:
        collector.cancel()
        await watcher.stop()


async def watch_gone(
    kv: KeyValue, reconciler: Reconciler, namespaces: list[str], started: asyncio.Event | None = None
) -> None:
    """Mirror 410 Gone marks into the reconciler, which reports them as Ready=False ReceiverGone."""
    watcher = await kv.watchall()
    if started is not None:
        started.set()
    try:
        async for entry in watcher:
            if entry is None:
                continue
            tenant, _, name = entry.key.partition(".")
            if namespaces and tenant not in namespaces:
                continue
            if entry.value and entry.operation not in ("DEL", "PURGE"):
                reconciler.gone[(tenant, name)] = str(orjson.loads(entry.value).get("url"))
            else:
                reconciler.gone.pop((tenant, name), None)
            reconciler.schedule(tenant)
    finally:
        await watcher.stop()
