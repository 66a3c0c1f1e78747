"""A live call end to end through the official Twilio SDK, validated against Twilio's own OpenAPI
spec (Prism), then driven by signed status callbacks posted as Twilio would."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import httpx
import pytest
from nats.js import JetStreamContext
from twilio.request_validator import RequestValidator

from agentstudio import bus
from agentstudio.callstate import CallStore
from agentstudio.natsserver import NatsServer
from conftest import Tenant, docs, ingest_client, wait_for_bundle
from test_dialer import MANIFESTS, dialers, events_of, queue_call, until_status
from twilio_mock import TwilioMock

PUBLIC = "https://voice.example.com"
FROM = "+14155550100"


@pytest.fixture
async def live(js: JetStreamContext, nats_server: NatsServer, twilio_mock: TwilioMock) -> AsyncIterator[tuple[httpx.AsyncClient, Tenant]]:
    twilio_mock.clear()
    t = Tenant(f"t-{uuid.uuid4().hex[:10]}", js, docs(MANIFESTS))
    bundle = await t.publish()
    async with ingest_client(nats_server.url, twilio_auth_token=twilio_mock.auth_token, public_base_url=PUBLIC) as (client, svc):
        await wait_for_bundle(svc, t.name, bundle.version)
        yield client, t


def twilio_settings(mock: TwilioMock, **extra: Any) -> dict[str, Any]:
    return {"telephony_provider": "twilio", "twilio_account_sid": mock.account_sid,
            "twilio_auth_token": mock.auth_token, "twilio_from_number": FROM,
            "twilio_api_base_url": mock.base_url, "public_base_url": PUBLIC, **extra}


async def placed_requests(mock: TwilioMock, call_id: str, timeout: float = 10) -> list[Any]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        found = [r for r in mock.requests if r.method == "POST" and call_id in (r.param("StatusCallback") or "")]
        if found:
            return found
        assert asyncio.get_running_loop().time() < deadline, "no calls.create reached the mock"
        await asyncio.sleep(0.05)


async def test_a_live_call_through_twilio(live, nats_server, twilio_mock, js) -> None:  # type: ignore[no-untyped-def]
    client, t = live
    async with dialers(nats_server.url, **twilio_settings(twilio_mock)):
        call_id = await queue_call(client, t, key="live", campaign_id="trial_recovery_v2")
        [request] = await placed_requests(twilio_mock, call_id)
        await until_status(client, t, call_id, "dialing")
    assert request.status == 201  # the spec accepted every parameter
    assert request.param("To") == "+14155552671" and request.param("From") == FROM
    assert request.form["StatusCallbackEvent"] == ["initiated", "ringing", "answered", "completed"]
    assert request.param("StatusCallbackMethod") == "POST" and request.param("Timeout") == "30"
    callback = request.param("StatusCallback") or ""
    assert callback.startswith(f"{PUBLIC}/api/v1/providers/twilio/status?call_id={call_id}&tenant={t.name}")
    twiml = request.param("Twiml") or ""
    assert "<Connect" in twiml and "<ConversationRelay" in twiml and f'value="{call_id}"' in twiml
    # The agent's speech settings, and Twilio's hard stop a minute after the agent's own limit.
    assert 'language="en-US"' in twiml and 'ttsProvider="ElevenLabs"' in twiml
    assert request.param("TimeLimit") == "660"

    sid = await provider_sid(js, t, call_id)
    assert sid.startswith("CA")

    # Twilio reports progress; ingest checks each signature against the public URL Twilio called.
    path = callback.removeprefix(PUBLIC)
    for seq, (status, extra) in enumerate([("initiated", {}), ("ringing", {}), ("in-progress", {}),
                                           ("completed", {"CallDuration": "17"})]):
        params = {"CallSid": sid, "AccountSid": twilio_mock.account_sid, "CallStatus": status, "From": FROM,
                  "To": "+14155552671", "Direction": "outbound-api", "SequenceNumber": str(seq), **extra}
        signature = RequestValidator(twilio_mock.auth_token).compute_signature(callback, params)
        resp = await client.post(path, data=params, headers={"X-Twilio-Signature": signature})
        assert resp.status_code == 204, resp.text
    record = await until_status(client, t, call_id, "completed")
    assert record["duration_seconds"] == 17 and record["provider"] == "twilio"
    assert [e["status"] for e in record["events"]] == ["pending", "dialing", "ringing", "in_progress", "completed"]
    done = [e for e in await events_of(js, t, call_id) if e["type"] == "call.completed"]
    assert done and done[0]["data"]["duration_seconds"] == 17
    assert done[0]["data"]["metadata"] == {"campaign_id": "trial_recovery_v2"} and done[0]["data"]["test"] is False


async def test_time_limit_stays_inside_a_default_accounts_maximum(live, nats_server, twilio_mock, js) -> None:  # type: ignore[no-untyped-def]
    # A default account ends every call at 4 h (Twilio error 32015, "exceeding maximum call duration");
    # TimeLimit ("the maximum duration of the call in seconds", Calls resource) is our backstop a minute
    # after the agent's polite end, so the polite end must come a minute before the account's maximum.
    client, t = live
    longest = MANIFESTS.replace('spec: {prompt: "Hello {{user.name}}"}',
                                'spec: {prompt: "Hello {{user.name}}", maxDurationSeconds: 14400}')
    await t.publish(docs(longest))
    async with dialers(nats_server.url, **twilio_settings(twilio_mock)):
        call_id = await queue_call(client, t, key="live")
        [request] = await placed_requests(twilio_mock, call_id)
    assert request.status == 201
    assert request.param("TimeLimit") == str(4 * 3600)


async def provider_sid(js: JetStreamContext, t: Tenant, call_id: str) -> str:
    store = CallStore(await bus.calls_bucket(js))
    for _ in range(200):
        state = await store.get(t.name, call_id)
        if state and state.provider_call_id:
            return state.provider_call_id
        await asyncio.sleep(0.05)
    raise AssertionError("the provider's call id was never recorded")


VOICES = MANIFESTS + """
---
apiVersion: agentstudio.io/v1alpha1
kind: Agent
metadata: {name: front}
spec: {prompt: Hi., voice: {ttsProvider: ElevenLabs, voice: UgBBYS2sOqTuMpoF3BR0}}
---
apiVersion: agentstudio.io/v1alpha1
kind: Agent
metadata: {name: billing}
spec:
  prompt: Billing.
  language: hi-IN
  voice: {ttsProvider: Google, voice: hi-IN-Wavenet-A, transcriptionProvider: Google}
---
apiVersion: agentstudio.io/v1alpha1
kind: Agent
metadata: {name: sales}
spec: {prompt: Sales., voice: {ttsProvider: Amazon, voice: Joanna-Neural}}
---
apiVersion: agentstudio.io/v1alpha1
kind: Agent
metadata: {name: concierge}
spec: {prompt: Hello., tools: [{name: billing, action: {type: handoff, agent: billing}}]}
---
apiVersion: agentstudio.io/v1alpha1
kind: Workflow
metadata: {name: desk}
spec:
  entryAgent: front
  agents: [billing, sales]
  handoffs: [{from: front, to: billing, when: Billing.}, {from: front, to: sales, when: Buying.}]
"""


async def test_every_language_of_the_workflow_is_declared_with_its_agents_voice(nats_server, twilio_mock, js) -> None:  # type: ignore[no-untyped-def]
    # A handoff sends only a `language` message; Twilio then speaks with the settings of that
    # language's <Language> element (../shared/twilio/conversation-relay.md; built with twilio-python's
    # ConversationRelay.language), so each agent's voice must be declared up front.
    t = Tenant(f"t-{uuid.uuid4().hex[:10]}", js, docs(VOICES))
    bundle = await t.publish()
    async with ingest_client(nats_server.url, twilio_auth_token=twilio_mock.auth_token, public_base_url=PUBLIC) as (client, svc):
        await wait_for_bundle(svc, t.name, bundle.version)
        async with dialers(nats_server.url, **twilio_settings(twilio_mock)):
            placed = []
            for start in ({"workflow_slug": "desk"}, {"agent_slug": "concierge"}):
                resp = await client.post("/api/v1/webhooks/ingest", headers=t.auth("live"), json={
                    **start, "phone_number": "+14155552671", "user_id": "u-1"})
                assert resp.status_code == 201, resp.text
                placed += await placed_requests(twilio_mock, resp.json()["call_id"])
    assert [r.status for r in placed] == [201, 201]
    relay, lone = (ElementTree.fromstring(r.param("Twiml") or "").find("Connect/ConversationRelay") for r in placed)
    assert relay is not None and lone is not None
    # Without a workflow, the agents its handoff tools reach are declared too.
    assert [e.get("code") for e in lone.findall("Language")] == ["en-US", "hi-IN"]
    # The entry agent's settings stay on <ConversationRelay> itself: they apply from the start.
    assert relay.get("language") == "en-US" and relay.get("voice") == "UgBBYS2sOqTuMpoF3BR0"
    languages = {e.get("code"): e.attrib for e in relay.findall("Language")}
    assert languages == {
        # sales shares en-US with the entry agent: one voice per language, the first agent's wins.
        "en-US": {"code": "en-US", "ttsProvider": "ElevenLabs", "voice": "UgBBYS2sOqTuMpoF3BR0",
                  "transcriptionProvider": "Deepgram"},
        "hi-IN": {"code": "hi-IN", "ttsProvider": "Google", "voice": "hi-IN-Wavenet-A",
                  "transcriptionProvider": "Google"},
    }


async def test_a_request_twilio_would_refuse_fails_the_call_with_the_reason(live, nats_server, twilio_mock, js) -> None:  # type: ignore[no-untyped-def]
    client, t = live
    # A status callback that is not a URI: the real API (and the spec) refuse the request.
    async with dialers(nats_server.url, **twilio_settings(twilio_mock, public_base_url="https://not a url")):
        call_id = await queue_call(client, t, key="live")
        record = await until_status(client, t, call_id, "failed")
    [request] = await placed_requests(twilio_mock, call_id)
    assert request.status == 422
    assert record["error"]["code"].startswith("twilio_")
    [event] = [e for e in await events_of(js, t, call_id) if e["type"] == "call.failed"]
    assert event["data"]["error"]["code"] == record["error"]["code"]


async def test_test_keys_never_reach_twilio(live, nats_server, twilio_mock) -> None:  # type: ignore[no-untyped-def]
    client, t = live
    async with dialers(nats_server.url, **twilio_settings(twilio_mock)):
        call_id = await queue_call(client, t, key="test", simulate_duration_seconds=0.1)
        record = await until_status(client, t, call_id, "completed")
    assert record["provider"] == "simulated" and record["test"] is True
    assert not [r for r in twilio_mock.requests if call_id in (r.param("StatusCallback") or "")]


def test_spec_is_beside_the_repo() -> None:
    from twilio_mock import SPEC

    assert Path(SPEC).exists(), "../shared/twilio/twilio_api_v2010.json is missing"


async def test_end_to_end_campaign_call_to_signed_webhook_and_export(nats_server, js, twilio_mock) -> None:  # type: ignore[no-untyped-def]
    """ingest → dialer → calls.create validated by the mock → signed status callbacks → a signed
    call.completed at the tenant's receiver → the call record and its export row."""
    import csv
    import io

    from agentstudio import signing
    from agentstudio.dialer import main as dialer_main
    from agentstudio.secrets import StaticSecrets
    from agentstudio.settings import Settings
    from test_webhooks import Receiver, serving, subscription

    twilio_mock.clear()
    receiver = Receiver(signing.new_secret())
    t = Tenant(f"t-{uuid.uuid4().hex[:10]}", js, docs(MANIFESTS + subscription("results", receiver.url)))
    bundle = await t.publish()
    nc = await bus.connect(nats_server.url, "test-webhooks")
    dispatcher, watcher = await dialer_main.webhooks(
        nc, Settings(nats_url=nats_server.url), StaticSecrets({(t.name, "results-webhook-secret", "secret"): receiver.secret}))
    stop = asyncio.Event()
    delivering = asyncio.create_task(dispatcher.run(stop))
    try:
        async with serving(receiver), ingest_client(nats_server.url, twilio_auth_token=twilio_mock.auth_token,
                                                    public_base_url=PUBLIC) as (client, svc), \
                dialers(nats_server.url, **twilio_settings(twilio_mock)):
            await wait_for_bundle(svc, t.name, bundle.version)
            call_id = await queue_call(client, t, key="live", campaign_id="trial_recovery_v2", segment="high_value")
            [request] = await placed_requests(twilio_mock, call_id)
            sid = await provider_sid(js, t, call_id)
            callback = request.param("StatusCallback") or ""
            for seq, (status, extra) in enumerate([("ringing", {}), ("in-progress", {}),
                                                   ("completed", {"CallDuration": "95"})]):
                params = {"CallSid": sid, "AccountSid": twilio_mock.account_sid, "CallStatus": status,
                          "SequenceNumber": str(seq), "To": "+14155552671", "From": FROM, **extra}
                signature = RequestValidator(twilio_mock.auth_token).compute_signature(callback, params)
                resp = await client.post(callback.removeprefix(PUBLIC), data=params,
                                         headers={"X-Twilio-Signature": signature})
                assert resp.status_code == 204
            deadline = asyncio.get_running_loop().time() + 15
            while not any(r["type"] == "call.completed" for r in receiver.received):
                assert asyncio.get_running_loop().time() < deadline, receiver.received
                await asyncio.sleep(0.05)
            record = (await client.get(f"/api/v1/calls/{call_id}", headers=t.auth("live"))).json()
            export = await client.get("/api/v1/calls/export?format=csv", headers=t.auth("live"))
    finally:
        stop.set()
        await delivering
        await watcher.stop()
        await nc.close()
    [completed] = [r for r in receiver.received if r["type"] == "call.completed"]
    assert completed["user_id"] == "u-1" and completed["duration_seconds"] == 95  # what the seed's receiver reads
    assert completed["event"]["data"]["metadata"] == {"campaign_id": "trial_recovery_v2", "segment": "high_value"}
    assert record["status"] == "completed" and record["duration_seconds"] == 95 and record["provider"] == "twilio"
    rows = list(csv.DictReader(io.StringIO(export.text)))
    [row] = [r for r in rows if r["call_id"] == call_id]
    assert row["status"] == "completed" and row["duration_seconds"] == "95"
    assert row["metadata.campaign_id"] == "trial_recovery_v2" and row["metadata.segment"] == "high_value"


def _request(call_id: str, phone_number: str = "+14155552671") -> Any:
    from datetime import datetime, timezone

    from agentstudio.calls import CallRequest

    return CallRequest(call_id=call_id, tenant="t-find", api_key="live", phone_number=phone_number, user_context={},
                       metadata={}, test=False, created_at=datetime.now(timezone.utc), bundle_version=1)


async def test_a_call_still_queued_at_twilio_is_found_after_a_dialer_died(twilio_mock) -> None:  # type: ignore[no-untyped-def]
    """A dialer that dies between calls.create and recording the sid must find the call, even while
    Twilio still holds it `queued` (calls-per-second limit): its start_time is empty until dialed
    (Call resource, `start_time`), so only when it was created can find it."""
    from datetime import datetime, timedelta, timezone

    from agentstudio.dialer.providers import TwilioProvider
    from agentstudio.twilio_api import twilio_client

    provider = TwilioProvider(twilio_client(twilio_mock.account_sid, twilio_mock.auth_token, twilio_mock.base_url),
                              FROM, PUBLIC, ring_timeout_seconds=30)
    number = "+1415555" + str(uuid.uuid4().int)[:4]
    since = datetime.now(timezone.utc) - timedelta(seconds=1)  # the claim, just before calls.create
    sid = await provider.place(_request("c-1", number))
    assert await provider.find(_request("c-1", number), since) == sid
    # Nothing created after a later claim (beyond the 5 s clock allowance): a new call must be placed.
    assert await provider.find(_request("c-1", number), since + timedelta(seconds=30)) is None
    lists = [r for r in twilio_mock.requests if r.method == "GET" and r.path == twilio_mock.calls_path]
    assert lists and all(r.status == 200 for r in lists)  # every lookup is one the spec accepts


async def test_a_lost_completed_callback_is_settled_by_asking_twilio(live, nats_server, twilio_mock, js) -> None:  # type: ignore[no-untyped-def]
    """Twilio retries a status callback only per its retry policy (by default once, not on every 5xx):
    a call whose `completed` never arrives is fetched from Twilio minutes after it must have ended,
    long before the 6-hour stale sweep."""
    from datetime import timedelta

    from agentstudio.dialer import main as dialer_main, sweeper
    from agentstudio.settings import Settings

    client, t = live
    async with dialers(nats_server.url, **twilio_settings(twilio_mock)) as [dialer]:
        call_id = await queue_call(client, t, key="live")
        [request] = await placed_requests(twilio_mock, call_id)
        sid = await provider_sid(js, t, call_id)
        callback = request.param("StatusCallback") or ""
        for seq, status in enumerate(["initiated", "ringing", "in-progress"]):  # then `completed` is lost
            params = {"CallSid": sid, "AccountSid": twilio_mock.account_sid, "CallStatus": status,
                      "SequenceNumber": str(seq), "To": "+14155552671", "From": FROM}
            signature = RequestValidator(twilio_mock.auth_token).compute_signature(callback, params)
            resp = await client.post(callback.removeprefix(PUBLIC), data=params, headers={"X-Twilio-Signature": signature})
            assert resp.status_code == 204
        await until_status(client, t, call_id, "in_progress")
        twilio_mock.update_call(sid, status="completed", duration="17")

        stale = timedelta(hours=6)
        settled = dialer_main.reconcile(Settings(**twilio_settings(twilio_mock)), dialer.live)
        await sweeper.sweep(dialer.tracker, stale, reconcile=settled)  # answered just now: not yet due
        assert not [r for r in twilio_mock.requests if r.method == "GET" and sid in r.path]
        assert (await until_status(client, t, call_id, "in_progress"))["status"] == "in_progress"

        # Past the longest call Twilio would allow it (and the allowance for a late report): ask Twilio.
        overdue = sweeper.Reconcile(dialer.live, ring=settled.ring, longest=timedelta(0), late=timedelta(0))
        assert call_id not in await sweeper.sweep(dialer.tracker, stale, reconcile=overdue)  # not failed stale
        record = await until_status(client, t, call_id, "completed")
        assert record["duration_seconds"] == 17 and record["error"] is None
        [fetch] = [r for r in twilio_mock.requests if r.method == "GET" and sid in r.path]
        assert fetch.status == 200  # the spec accepts the fetch
    done = [e for e in await events_of(js, t, call_id) if e["type"] == "call.completed"]
    assert done and done[0]["data"]["duration_seconds"] == 17
