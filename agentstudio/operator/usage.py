"""Shows API key usage on ApiKey status: watches the `as-usage` totals that ingest keeps and writes
requestCount, acceptedCount and lastUsedAt, at most once per interval per key."""

from __future__ import annotations

import asyncio
import logging

from nats.js.kv import KeyValue
from pydantic import ValidationError

from agentstudio.operator.kube import Kube
from agentstudio.usage import Usage

log = logging.getLogger("agentstudio.operator")


async def report_usage(kv: KeyValue, kube: Kube, namespaces: list[str], interval: float = 5.0) -> None:
    """Run until cancelled. `namespaces` empty: every namespace."""
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
