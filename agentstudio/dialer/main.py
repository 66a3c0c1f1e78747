"""`agent-studio dialer`: the dialer role with its providers, wired to NATS."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from collections.abc import Callable

from nats.aio.client import Client as NATS

from agentstudio import bus
from agentstudio.callstate import CallStore
from agentstudio.concurrency import Concurrency
from agentstudio.dialer.providers import Provider, SimulatedProvider, TwilioProvider, twilio_client
from agentstudio.dialer.webhooks import WebhookDispatcher
from agentstudio.secrets import KubeSecrets, SecretReader, StaticSecrets
from agentstudio.dialer import sweeper
from agentstudio.dialer.worker import Dialer
from agentstudio.bundle_store import BundleWatcher
from agentstudio.settings import Settings
from agentstudio.tracking import CallTracker


async def tracker_for(nc: NATS) -> CallTracker:
    js = nc.jetstream()
    await bus.ensure_events_stream(js)
    return CallTracker(js, CallStore(await bus.calls_bucket(js)), Concurrency(await bus.concurrency_bucket(js)))


async def build(
    nc: NATS,
    settings: Settings,
    announce: Callable[[str], None] | None = None,
    simulated_factory: Callable[[CallTracker], Provider] = SimulatedProvider,
) -> Dialer:
    tracker = await tracker_for(nc)
    simulated = simulated_factory(tracker)
    live: Provider = simulated
    if settings.telephony_provider == "twilio":
        client = twilio_client(settings.twilio_account_sid, settings.twilio_auth_token, settings.twilio_api_base_url)
        live = TwilioProvider(client, settings.twilio_from_number, settings.public_base_url,
                              settings.ring_timeout_seconds)
    return Dialer(nc.jetstream(), settings, tracker, live, simulated, announce=announce)


async def webhooks(nc: NATS, settings: Settings, secrets: SecretReader) -> tuple[WebhookDispatcher, BundleWatcher]:
    js = nc.jetstream()
    watcher = BundleWatcher(await bus.bundles_bucket(js))
    await watcher.start()
    return WebhookDispatcher(js, watcher, secrets, settings.retry_schedule(), settings.webhook_timeout_seconds), watcher


async def run(settings: Settings, stop: asyncio.Event) -> None:
    nc = await bus.connect_retrying(settings.nats_url, "agentstudio-dialer")
    try:
        secrets: SecretReader = KubeSecrets() if settings.webhook_secrets == "kubernetes" else StaticSecrets()
        dispatcher, watcher = await webhooks(nc, settings, secrets)
        dialer = await build(nc, settings)
        stale = timedelta(seconds=settings.stale_call_seconds)
        try:
            await asyncio.gather(
                dialer.run(stop),
                dispatcher.run(stop),
                sweeper.run(await bus.calls_bucket(nc.jetstream()), dialer.tracker, stale,
                            settings.sweep_interval_seconds, stop),
            )
        finally:
            await watcher.stop()
    finally:
        await nc.close()  # everything taken is finished or handed back by now
