"""Cancel and pause on a real nats-server: canceling one call or every match of a filter while
dialers take calls from the same queue, and a paused workflow's calls waiting until it resumes."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest
from nats.js import JetStreamContext

from agentstudio import signing
from agentstudio.callstate import TERMINAL
from conftest import Tenant, docs
from test_dialer import MANIFESTS, api, dialers, queue_call, tenant_for_calls, until_status  # noqa: F401 - fixtures
from test_webhooks import Receiver, serving, stack, until

WORKFLOWS = """
---
apiVersion: agentstudio.io/v1alpha1
kind: Workflow
metadata: {name: winback}
spec: {entryAgent: a, paused: %s}
---
apiVersion: agentstudio.io/v1alpha1
kind: Workflow
metadata: {name: onboarding}
spec: {entryAgent: a}
"""


async def cancel(api: httpx.AsyncClient, t: Tenant, call_id: str) -> httpx.Response:
    return await api.post(f"/api/v1/calls/{call_id}/cancel", headers=t.auth("test"))


async def queue_for(api: httpx.AsyncClient, t: Tenant, workflow: str, **metadata: Any) -> str:
    resp = await api.post("/api/v1/webhooks/ingest", headers=t.auth("test"), json={
        "workflow_slug": workflow, "phone_number": "+14155552671", "user_id": "u-1", "metadata": metadata})
    assert resp.status_code == 201, resp.text
    return str(resp.json()["call_id"])


async def waiting_as(api: httpx.AsyncClient, t: Tenant, call_id: str) -> tuple[str, str | None]:
    record = (await api.get(f"/api/v1/calls/{call_id}", headers=t.auth("test"))).json()
    return record["status"], record.get("scheduled_reason")


async def test_a_canceled_call_is_reported_with_its_reason_and_canceling_again_answers_the_same(nats_server, js) -> None:  # type: ignore[no-untyped-def]
    receiver = Receiver(signing.new_secret())
    async with serving(receiver), stack(nats_server, js, {"results": receiver}, dialing=False) as (client, t):
        call_id = await queue_call(client, t, campaign_id="spring")
        first = await cancel(client, t, call_id)
        again = await cancel(client, t, call_id)
        await until(lambda: len(receiver.received) == 1)
        await asyncio.sleep(0.5)  # a second delivery would show here
    assert first.status_code == 200, first.text
    assert again.status_code == 200 and again.json() == first.json()
    record = first.json()
    assert record["status"] == "canceled" and record["end_reason"] == "canceled_by_api"
    assert [e["status"] for e in record["events"]] == ["pending", "canceled"]
    [sent] = receiver.received
    assert sent["type"] == "call.canceled"
    data = sent["event"]["data"]
    assert data["call_id"] == call_id and data["status"] == "canceled" and data["end_reason"] == "canceled_by_api"
    assert data["metadata"] == {"campaign_id": "spring"}


async def test_a_dialed_call_cannot_be_canceled(nats_server, js) -> None:  # type: ignore[no-untyped-def]
    receiver = Receiver(signing.new_secret())
    async with serving(receiver), stack(nats_server, js, {"results": receiver}) as (client, t):
        call_id = await queue_call(client, t, simulate_duration_seconds=1)
        await until_status(client, t, call_id, "in_progress")
        resp = await cancel(client, t, call_id)
        assert resp.status_code == 409, resp.text
        assert resp.json()["error"] == {"code": "not_cancelable", "field": "call_id",
                                        "message": f"call {call_id} is in_progress: only a call not yet dialed"
                                                   " can be canceled"}
        record = await until_status(client, t, call_id, "completed")
        unknown = await cancel(client, t, str(uuid.uuid4()))
    assert "canceled" not in [e["status"] for e in record["events"]]
    assert unknown.status_code == 404


async def test_cancel_by_filter_races_a_running_dialer_and_each_call_is_placed_or_canceled_never_both(
    nats_server, js, api, tenant_for_calls  # type: ignore[no-untyped-def]
) -> None:
    t = tenant_for_calls
    # Two dialers and a cap of 2: most calls wait parked under the cap when the cancel arrives.
    async with dialers(nats_server.url, count=2, max_concurrent_calls_per_tenant=2) as running:
        # Calls of 0.5 s at a cap of 2 take ~10 s to drain: however slow the machine is at queueing
        # them, the cancel arrives with some placed and most still waiting.
        campaign = [await queue_call(api, t, campaign_id="mistake", simulate_duration_seconds=0.5) for _ in range(40)]
        other = [await queue_call(api, t, campaign_id="keep", simulate_duration_seconds=0.1) for _ in range(3)]
        async with asyncio.timeout(10):  # dialers at work on the campaign
            while not any(c in d.simulated.placed for d in running for c in campaign):  # type: ignore[attr-defined]
                await asyncio.sleep(0.02)
        resp = await api.post("/api/v1/calls/cancel", headers=t.auth("test"),
                              json={"metadata": {"campaign_id": "mistake"}})
        assert resp.status_code == 200, resp.text
        store = running[0].store
        deadline = asyncio.get_running_loop().time() + 60
        while True:
            states = {c: await store.get(t.name, c) for c in campaign + other}
            if all(s is not None and s.status in TERMINAL for s in states.values()) \
                    and all(s.conversation != "open" for s in states.values() if s):
                break
            assert asyncio.get_running_loop().time() < deadline, {c: s and s.status for c, s in states.items()}
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # a late placement of a canceled call would show here
        placed = [c for d in running for c in d.simulated.placed]  # type: ignore[attr-defined]
    canceled = {c for c, s in states.items() if s and s.status == "canceled"}
    assert resp.json() == {"canceled": len(canceled)}
    assert 0 < len(canceled) < len(campaign)  # the race happened: some went out before the cancel
    assert not canceled & set(placed)  # none of the canceled was dialed
    assert all(states[c].status == "completed" for c in set(placed) & set(campaign + other))
    assert sorted(c for c in placed if c in states) == sorted(set(campaign + other) - canceled)  # each once
    assert not canceled & set(other)


@pytest.mark.parametrize("body", [{}, {"workflow_slug": None}, {"metadata": {}}])
async def test_cancel_by_filter_wants_a_filter(api, tenant_for_calls, body: dict[str, Any]) -> None:  # type: ignore[no-untyped-def]
    resp = await api.post("/api/v1/calls/cancel", headers=tenant_for_calls.auth("test"), json=body)
    assert resp.status_code == 400, resp.text


async def test_a_paused_workflow_waits_while_others_dial_and_is_dialed_after_resume(
    nats_server, js: JetStreamContext, api, tenant_for_calls  # type: ignore[no-untyped-def]
) -> None:
    t = tenant_for_calls
    await t.publish(docs(MANIFESTS + WORKFLOWS % "true"))
    async with dialers(nats_server.url, pause_recheck_seconds=5) as (dialer,):
        waiting = [await queue_for(api, t, "winback", simulate_duration_seconds=0) for _ in range(3)]
        flowing = [await queue_for(api, t, "onboarding", simulate_duration_seconds=0) for _ in range(3)]
        for call_id in flowing:
            await until_status(api, t, call_id, "completed")
        await asyncio.sleep(1.5)  # a placement of a paused call would show here
        held = await dialer.concurrency.holders(t.name)
        statuses = [await waiting_as(api, t, c) for c in waiting]
        assert statuses == [("scheduled", "paused")] * 3  # parked on the schedule subject, not dialed
        assert not set(waiting) & set(dialer.simulated.placed)  # type: ignore[attr-defined]
        assert not set(waiting) & held  # waiting holds none of the tenant's concurrent-call slots

        await t.publish(docs(MANIFESTS + WORKFLOWS % "false"))
        for call_id in waiting:
            await until_status(api, t, call_id, "completed", timeout=10)
    assert sorted(c for c in dialer.simulated.placed if c in waiting) == sorted(waiting)  # type: ignore[attr-defined]


async def test_a_tenant_paused_by_its_dialers_setting_waits_and_is_dialed_once_it_is_lifted(
    nats_server, api, tenant_for_calls  # type: ignore[no-untyped-def]
) -> None:
    t = tenant_for_calls
    async with dialers(nats_server.url, dialing_paused=True, pause_recheck_seconds=5) as (paused,):
        waiting = [await queue_call(api, t, simulate_duration_seconds=0) for _ in range(3)]
        await asyncio.sleep(1.5)  # a placement of a paused call would show here
        statuses = [await waiting_as(api, t, c) for c in waiting]
        assert statuses == [("scheduled", "paused")] * 3
        assert not set(waiting) & await paused.concurrency.holders(t.name)
    assert not set(waiting) & set(paused.simulated.placed)  # type: ignore[attr-defined]
    async with dialers(nats_server.url) as (resumed,):  # the rollout with the setting lifted
        for call_id in waiting:
            await until_status(api, t, call_id, "completed", timeout=10)
    assert sorted(c for c in resumed.simulated.placed if c in waiting) == sorted(waiting)  # type: ignore[attr-defined]
