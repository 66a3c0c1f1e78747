"""SIGKILL a dialer process in the middle of a batch of live calls: after another dialer takes over,
every call was placed with Twilio exactly once (counted at the validating mock)."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections import Counter
from pathlib import Path

from agentstudio import bus
from agentstudio.callstate import CallStore
from agentstudio.natsserver import free_port
from conftest import Tenant, docs, ingest_client, wait_for_bundle
from test_dialer import MANIFESTS, queue_call
from processes import Process
from test_dialer_twilio import FROM, PUBLIC

CALLS = 40


def start_dialer(nats_url: str, mock, log: Path, **extra: str) -> Process:  # type: ignore[no-untyped-def]
    # Its relay on a port of its own: never the default 8080, which `scripts/dev` may be serving.
    env = {**os.environ, "AGENTSTUDIO_HOST": "127.0.0.1", "AGENTSTUDIO_PORT": str(free_port()),
           "AGENTSTUDIO_NATS_URL": nats_url, "AGENTSTUDIO_TELEPHONY_PROVIDER": "twilio",
           "AGENTSTUDIO_TWILIO_ACCOUNT_SID": mock.account_sid, "AGENTSTUDIO_TWILIO_AUTH_TOKEN": mock.auth_token,
           "AGENTSTUDIO_TWILIO_FROM_NUMBER": FROM, "AGENTSTUDIO_TWILIO_API_BASE_URL": mock.base_url,
           "AGENTSTUDIO_PUBLIC_BASE_URL": PUBLIC, "AGENTSTUDIO_WEBHOOK_SECRETS": "none",
           "AGENTSTUDIO_DISPATCH_ACK_WAIT_SECONDS": "2", "AGENTSTUDIO_MAX_CONCURRENT_CALLS_PER_TENANT": "100", **extra}
    return Process.agent_studio("dialer", log=log, env=env)


def creates(mock, ids: set[str]) -> Counter[str]:  # type: ignore[no-untyped-def]
    """calls.create requests the mock accepted, per call id (our StatusCallback URL carries it)."""
    found: Counter[str] = Counter()
    for r in mock.requests:
        if r.method == "POST" and r.status == 201:
            callback = r.param("StatusCallback") or ""
            found.update(c for c in ids if f"call_id={c}&" in callback)
    return found


async def test_sigkill_mid_batch_places_every_call_exactly_once(nats_server, js, twilio_mock, tmp_path) -> None:  # type: ignore[no-untyped-def]
    twilio_mock.clear()
    t = Tenant(f"t-{uuid.uuid4().hex[:10]}", js, docs(MANIFESTS))
    bundle = await t.publish()
    store = CallStore(await bus.calls_bucket(js))
    async with ingest_client(nats_server.url) as (client, svc):
        await wait_for_bundle(svc, t.name, bundle.version)
        first = start_dialer(nats_server.url, twilio_mock, tmp_path / "dialer-1.log")
        # A campaign calls each of its users once: one number per call.
        ids = {await queue_call(client, t, key="live", phone_number=f"+4479111{i:05d}") for i in range(CALLS)}
        for _ in range(600):  # kill it while it is working through the batch
            if len(creates(twilio_mock, ids)) >= 5:
                break
            first.alive()
            await asyncio.sleep(0.01)
        first.kill()
        killed_at = len(creates(twilio_mock, ids))
        assert killed_at < CALLS, "the first dialer finished before it was killed; nothing was tested"

        second = start_dialer(nats_server.url, twilio_mock, tmp_path / "dialer-2.log")
        try:
            for _ in range(600):
                states = [await store.get(t.name, c) for c in ids]
                if all(s is not None and s.provider_call_id for s in states):
                    break
                second.alive()
                await asyncio.sleep(0.1)
        finally:
            second.stop(timeout=30)
    placed = creates(twilio_mock, ids)
    assert set(placed) == ids, f"{len(ids - set(placed))} calls never placed"
    assert set(placed.values()) == {1}, {c: n for c, n in placed.items() if n != 1}
    assert all(s is not None and s.status == "dialing" and s.provider == "twilio" for s in states)
