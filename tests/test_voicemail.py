"""Voicemail per the call's CallPolicy: Twilio's answering-machine detection through the official SDK
against Twilio's own spec (Prism), its async AMD callback signed like the status callback, a late
report of an earlier attempt ignored; and the simulated provider answering as a machine."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any
from xml.etree import ElementTree

import httpx
import orjson
from twilio.request_validator import RequestValidator

from agentstudio import bus
from agentstudio.callstate import CallStore
from conftest import Tenant, docs, ingest_client, wait_for_bundle
from test_dialer import MANIFESTS, dialers, events_of, queue_call, until_status
from test_dialer_twilio import FROM, PUBLIC, placed_requests, twilio_settings
from test_retries import policy
from twilio_mock import TwilioMock

TO = "+14155552671"
LEAVE = policy("{maxAttempts: 2, outcomes: [voicemail], delaysSeconds: [1]}",
               voicemail='{action: leave_message, message: "Hi {{ user.name }}, Acme here about '
                         '{{ metadata.campaign_id }}. We will call again."}')


async def post_signed(client: httpx.AsyncClient, auth_token: str, url: str, params: dict[str, str],
                      signature: str | None = None) -> httpx.Response:
    """A form POST as Twilio makes it to `url` (our public URL), signed with the account's token."""
    signature = signature or RequestValidator(auth_token).compute_signature(url, params)
    return await client.post(url.removeprefix(PUBLIC), data=params, headers={"X-Twilio-Signature": signature})


async def status(client: httpx.AsyncClient, mock: TwilioMock, placed: Any, sid: str, call_status: str,
                 **extra: str) -> None:
    params = {"CallSid": sid, "AccountSid": mock.account_sid, "CallStatus": call_status, "From": FROM, "To": TO,
              "Direction": "outbound-api", **extra}
    resp = await post_signed(client, mock.auth_token, placed.param("StatusCallback") or "", params)
    assert resp.status_code == 204, resp.text


async def amd(client: httpx.AsyncClient, mock: TwilioMock, placed: Any, sid: str, answered_by: str,
              signature: str | None = None) -> httpx.Response:
    params = {"CallSid": sid, "AccountSid": mock.account_sid, "AnsweredBy": answered_by,
              "MachineDetectionDuration": "2140"}
    return await post_signed(client, mock.auth_token, placed.param("AsyncAmdStatusCallback") or "", params, signature)


async def placements(mock: TwilioMock, call_id: str, count: int) -> list[Any]:
    deadline = asyncio.get_running_loop().time() + 20
    while len(found := await placed_requests(mock, call_id)) < count:
        assert asyncio.get_running_loop().time() < deadline, f"{len(found)} calls.create, not {count}"
        await asyncio.sleep(0.05)
    return found


def redirects(mock: TwilioMock) -> list[Any]:
    """Updates of live calls (`calls(sid).update`) that reached Twilio."""
    return [r for r in mock.requests if r.method == "POST" and "/Calls/CA" in r.path]


async def redirected(mock: TwilioMock, sid: str) -> list[Any]:
    """The updates of Twilio's call `sid`, once a dialer has made one (it acts on ingest's queue)."""
    deadline = asyncio.get_running_loop().time() + 20
    while not (found := [r for r in redirects(mock) if r.path.endswith(f"/Calls/{sid}.json")]):
        assert asyncio.get_running_loop().time() < deadline, "no dialer redirected the call"
        await asyncio.sleep(0.05)
    return found


async def sids(js: Any, t: Tenant, call_id: str, attempt: int) -> str:
    store = CallStore(await bus.calls_bucket(js))
    for _ in range(200):
        state = await store.get(t.name, call_id)
        if state and state.attempt == attempt and state.provider_call_id:
            return state.provider_call_id
        await asyncio.sleep(0.05)
    raise AssertionError(f"attempt {attempt}'s provider call id was never recorded")


async def test_a_machine_gets_the_message_through_twilio_and_the_call_is_retried(nats_server, js, twilio_mock) -> None:  # type: ignore[no-untyped-def]
    twilio_mock.clear()
    t = Tenant(f"t-{uuid.uuid4().hex[:10]}", js, docs(MANIFESTS + LEAVE))
    bundle = await t.publish()
    # Ingest holds the auth token its signature check needs, nothing else: a dialer redirects the call.
    async with ingest_client(nats_server.url, twilio_auth_token=twilio_mock.auth_token,
                             public_base_url=PUBLIC) as (client, svc), \
            dialers(nats_server.url, **twilio_settings(twilio_mock)):
        await wait_for_bundle(svc, t.name, bundle.version)
        resp = await client.post("/api/v1/webhooks/ingest", headers=t.auth("live"), json={
            "agent_slug": "a", "phone_number": TO, "user_id": "u-1", "user_context": {"name": "Ada"},
            "metadata": {"campaign_id": "renewals"}})
        assert resp.status_code == 201, resp.text
        call_id = resp.json()["call_id"]
        [first] = await placements(twilio_mock, call_id, 1)
        sid = await sids(js, t, call_id, 1)

        # Answered; Twilio's detection listens in the background and posts its verdict, signed.
        await status(client, twilio_mock, first, sid, "in-progress")
        forged = await amd(client, twilio_mock, first, sid, "machine_end_beep", signature="bm90IFR3aWxpbw==")
        assert forged.status_code == 403
        assert (await until_status(client, t, call_id, "in_progress"))["answered_by"] is None
        assert (await amd(client, twilio_mock, first, sid, "machine_end_beep")).status_code == 204
        [redirect] = await redirected(twilio_mock, sid)
        await status(client, twilio_mock, first, sid, "completed", CallDuration="31")

        # A machine answered: the call is tried again; Twilio's late reports on the first call change nothing.
        [_, second] = await placements(twilio_mock, call_id, 2)
        sid2 = await sids(js, t, call_id, 2)
        for late in ("in-progress", "completed", "no-answer"):
            await status(client, twilio_mock, first, sid, late, CallDuration="31")
        assert (await amd(client, twilio_mock, first, sid, "machine_start")).status_code == 204
        mid = (await client.get(f"/api/v1/calls/{call_id}", headers=t.auth("live"))).json()

        # This time a person answers: no redirect, the agent goes on; the call ends completed.
        assert (await amd(client, twilio_mock, second, sid2, "human")).status_code == 204
        await status(client, twilio_mock, second, sid2, "in-progress")
        await status(client, twilio_mock, second, sid2, "completed", CallDuration="20")
        record = await until_status(client, t, call_id, "completed")
    # AMD as Twilio's spec names it; DetectMessageEnd waits for the beep before the message.
    for placed in (first, second):
        assert placed.status == 201  # the spec accepted every parameter
        assert placed.param("MachineDetection") == "DetectMessageEnd" and placed.param("AsyncAmd") == "true"
        assert placed.param("AsyncAmdStatusCallbackMethod") == "POST"
        assert placed.param("AsyncAmdStatusCallback") == \
            f"{PUBLIC}/api/v1/providers/twilio/amd?call_id={call_id}&tenant={t.name}"
    # The live call was updated with TwiML that says the rendered message, then hangs up.
    assert redirect.status == 200 and redirect.auth == (twilio_mock.account_sid, twilio_mock.auth_token)
    said = ElementTree.fromstring(redirect.param("Twiml") or "")
    assert [e.tag for e in said] == ["Say", "Hangup"]
    assert said[0].text == "Hi Ada, Acme here about renewals. We will call again."
    assert len(redirects(twilio_mock)) == 1
    assert len(await placed_requests(twilio_mock, call_id)) == 2  # one Twilio call per attempt, no more
    # The late reports left the second attempt alone.
    assert mid["status"] == "dialing" and mid["attempt"] == 2 and mid["answered_by"] is None
    assert [a["outcome"] for a in mid["attempts"]] == ["voicemail"]

    events = await events_of(js, t, call_id)
    done = [e["data"] for e in events if e["type"] == "call.completed"]
    assert [(d["attempt"], d["will_retry"], d["end_reason"]) for d in done] == [(1, True, "voicemail"), (2, False, None)]
    assert done[0]["answered_by"] == "machine_end_beep" and done[0]["duration_seconds"] == 31
    assert done[0]["voicemail_message"] == "Hi Ada, Acme here about renewals. We will call again."
    assert [(a["outcome"], a["provider_call_id"]) for a in done[1]["attempts"]] == [("voicemail", sid), ("completed", sid2)]
    assert done[1]["answered_by"] == "human" and "voicemail_message" not in done[1]
    assert len({e["id"] for e in events}) == len(events)
    assert [e["type"] for e in events].count("call.no_answer") == 0  # the late no-answer was no one's
    assert record["attempt"] == 2 and record["duration_seconds"] == 20 and record["end_reason"] is None


async def test_the_simulated_provider_answers_as_a_machine(nats_server, js) -> None:  # type: ignore[no-untyped-def]
    hang_up = policy("{maxAttempts: 1}", voicemail="{action: hang_up}")
    t = Tenant(f"t-{uuid.uuid4().hex[:10]}", js, docs(MANIFESTS + hang_up))
    bare = Tenant(f"t-{uuid.uuid4().hex[:10]}", js, docs(MANIFESTS))  # no policy
    bundles = [await t.publish(), await bare.publish()]
    async with ingest_client(nats_server.url) as (client, svc), dialers(nats_server.url):
        for tenant, bundle in zip((t, bare), bundles):
            await wait_for_bundle(svc, tenant.name, bundle.version)
        call_id = await queue_call(client, t, simulate_outcome="voicemail")
        # Without a voicemail policy a machine is just someone who hears the agent.
        plain_id = await queue_call(client, bare, simulate_outcome="voicemail", simulate_duration_seconds=0.1)
        record = await until_status(client, t, call_id, "completed")
        plain = await until_status(client, bare, plain_id, "completed")
    assert record["end_reason"] == "voicemail" and record["answered_by"] == "machine_start"
    assert [a["outcome"] for a in record["attempts"]] == ["voicemail"] and record["voicemail_message"] is None
    [done] = [e["data"] for e in await events_of(js, t, call_id) if e["type"] == "call.completed"]
    assert done["end_reason"] == "voicemail" and done["will_retry"] is False and done["answered_by"] == "machine_start"
    assert plain["end_reason"] is None and plain["answered_by"] is None
    assert [a["outcome"] for a in plain["attempts"]] == ["completed"]


async def test_the_agents_conversation_with_a_machine_stays_with_its_attempt(js, nc) -> None:  # type: ignore[no-untyped-def]
    """With async AMD the agent talks to the machine until the verdict redirects the call; its session
    closes after the attempt ended. It must not close the next attempt's conversation before it opens
    (that one would then be refused), nor call a voicemail the callee hanging up."""
    from datetime import datetime, timezone

    from agentstudio import calls, transcripts
    from agentstudio.callstate import CallState
    from agentstudio.conversation.record import CallRecorder
    from agentstudio.conversation.transcript import turn
    from agentstudio.dialer.main import tracker_for
    from agentstudio.resources import Retries

    tracker = await tracker_for(nc)
    for max_attempts in (2, 1):
        call = calls.CallRequest(call_id=str(uuid.uuid4()), tenant=f"t-{uuid.uuid4().hex[:10]}", api_key="live",
                                 phone_number=TO, user_context={}, metadata={}, test=False,
                                 created_at=datetime.now(timezone.utc), bundle_version=1)
        assert await calls.enqueue(js, call, timeout=5)
        answered = CallState.new(call).model_copy(update={
            "status": "in_progress", "provider_call_id": "SIM1", "answered_at": datetime.now(timezone.utc),
            "retries": Retries(max_attempts=max_attempts, outcomes=["voicemail"], delays_seconds=[60])})
        await tracker.store.change(call.tenant, call.call_id, lambda s: answered)
        recorder = CallRecorder(tracker, call.tenant, call.call_id)
        assert await recorder.open() is not None
        recorder.update([turn("message", "a", speaker="agent", text="Hello?")], {}, "callee_hangup")
        await tracker.store.change(call.tenant, call.call_id, lambda s: s.machine_answered("machine_start") if s else None)
        await tracker.advance(call.tenant, call.call_id, "completed", provider_call_id="SIM1")
        await recorder.close()
        state = await transcripts.filled(js, await tracker.store.get(call.tenant, call.call_id))
        assert state is not None
        if max_attempts == 2:  # retried: the next attempt is untouched, free for its own conversation
            assert (state.status, state.attempt, state.conversation, state.transcript_turns) == ("pending", 2, None, 0)
        else:  # the end: a voicemail, whatever the agent's session saw
            assert (state.status, state.end_reason, state.conversation) == ("completed", "voicemail", "closed")
            assert [t["text"] for t in state.transcript] == ["Hello?"]


async def test_hang_up_on_a_machine_through_twilio(nats_server, js, twilio_mock) -> None:  # type: ignore[no-untyped-def]
    twilio_mock.clear()
    hang_up = policy("{maxAttempts: 1}", voicemail="{action: hang_up}")
    t = Tenant(f"t-{uuid.uuid4().hex[:10]}", js, docs(MANIFESTS + hang_up))
    bundle = await t.publish()
    # Ingest holds the auth token its signature check needs, nothing else: a dialer redirects the call.
    async with ingest_client(nats_server.url, twilio_auth_token=twilio_mock.auth_token,
                             public_base_url=PUBLIC) as (client, svc), \
            dialers(nats_server.url, **twilio_settings(twilio_mock)):
        await wait_for_bundle(svc, t.name, bundle.version)
        call_id = await queue_call(client, t, key="live")
        [placed] = await placements(twilio_mock, call_id, 1)
        sid = await sids(js, t, call_id, 1)
        await status(client, twilio_mock, placed, sid, "in-progress")
        assert (await amd(client, twilio_mock, placed, sid, "machine_start")).status_code == 204
        [redirect] = await redirected(twilio_mock, sid)
        await status(client, twilio_mock, placed, sid, "completed", CallDuration="4")
        record = await until_status(client, t, call_id, "completed")
    # Enable: Twilio says machine_start as soon as it knows; nothing is waited for.
    assert placed.status == 201 and placed.param("MachineDetection") == "Enable" and placed.param("AsyncAmd") == "true"
    assert redirect.status == 200
    assert [e.tag for e in ElementTree.fromstring(redirect.param("Twiml") or "")] == ["Hangup"]
    assert (record["end_reason"], record["answered_by"], record["voicemail_message"]) == ("voicemail", "machine_start", None)
    [done] = [e["data"] for e in await events_of(js, t, call_id) if e["type"] == "call.completed"]
    assert done["will_retry"] is False and [a["outcome"] for a in done["attempts"]] == ["voicemail"]


async def queued_verdicts(js: Any, t: Tenant) -> dict[str, int]:
    """The machine verdicts waiting for a dialer, per call: messages of this tenant's subjects."""
    info = await js.stream_info(bus.VOICEMAIL_STREAM, subjects_filter=bus.voicemail_subject(t.name, "*"))
    return {subject.rsplit(".", 1)[1]: count for subject, count in (info.state.subjects or {}).items()}


async def test_a_verdict_ingest_acknowledged_is_acted_on_by_a_dialer_started_after_it(nats_server, js, twilio_mock) -> None:  # type: ignore[no-untyped-def]
    """Ingest, facing the internet, holds no Twilio credential but the auth token its signature check
    needs: it queues a machine's verdict durably and answers Twilio; a dialer redirects the call, though
    none ran when Twilio called back. A verdict whose attempt ended meanwhile is dropped, not acted on."""
    twilio_mock.clear()
    leave = policy("{maxAttempts: 1}", voicemail='{action: leave_message, message: "Hi {{ user.name }}, Acme here."}')
    t = Tenant(f"t-{uuid.uuid4().hex[:10]}", js, docs(MANIFESTS + leave))
    bundle = await t.publish()
    async with ingest_client(nats_server.url, twilio_auth_token=twilio_mock.auth_token,
                             public_base_url=PUBLIC) as (client, svc):
        await wait_for_bundle(svc, t.name, bundle.version)
        async with dialers(nats_server.url, **twilio_settings(twilio_mock)):
            call_ids = []
            for name in ("Ada", "Bob"):
                resp = await client.post("/api/v1/webhooks/ingest", headers=t.auth("live"), json={
                    "agent_slug": "a", "phone_number": TO, "user_id": name, "user_context": {"name": name}})
                assert resp.status_code == 201, resp.text
                call_ids.append(resp.json()["call_id"])
            placed = [(await placements(twilio_mock, call_id, 1))[0] for call_id in call_ids]
            sid = [await sids(js, t, call_id, 1) for call_id in call_ids]

        # No dialer runs now. Machines answer both calls; Twilio's verdicts are acknowledged, one of
        # them sent twice (Twilio retries a callback it saw fail).
        for call, call_sid in zip(placed, sid):
            await status(client, twilio_mock, call, call_sid, "in-progress")
            assert (await amd(client, twilio_mock, call, call_sid, "machine_end_beep")).status_code == 204
        assert (await amd(client, twilio_mock, placed[0], sid[0], "machine_end_beep")).status_code == 204
        # Bob's machine hangs up before any dialer is back: his verdict's attempt is over.
        await status(client, twilio_mock, placed[1], sid[1], "completed", CallDuration="12")
        bob = await until_status(client, t, call_ids[1], "completed")
        assert not redirects(twilio_mock)  # ingest itself never calls Twilio
        assert await queued_verdicts(js, t) == {call_ids[0]: 1, call_ids[1]: 1}  # kept, each once

        async with dialers(nats_server.url, **twilio_settings(twilio_mock)):
            deadline = asyncio.get_running_loop().time() + 20
            while await queued_verdicts(js, t):  # a verdict leaves the queue when a dialer acks it
                assert asyncio.get_running_loop().time() < deadline, await queued_verdicts(js, t)
                await asyncio.sleep(0.05)
        await status(client, twilio_mock, placed[0], sid[0], "completed", CallDuration="25")
        ada = await until_status(client, t, call_ids[0], "completed")
    [redirect] = redirects(twilio_mock)  # Ada's, once; Bob's ended attempt was left alone
    assert redirect.path.endswith(f"/Calls/{sid[0]}.json") and redirect.status == 200
    assert redirect.auth == (twilio_mock.account_sid, twilio_mock.auth_token)  # the dialers' credentials
    said = ElementTree.fromstring(redirect.param("Twiml") or "")
    assert [e.tag for e in said] == ["Say", "Hangup"] and said[0].text == "Hi Ada, Acme here."
    assert (ada["end_reason"], ada["voicemail_message"]) == ("voicemail", "Hi Ada, Acme here.")
    assert (bob["end_reason"], bob["answered_by"]) == ("voicemail", "machine_end_beep")


async def test_ingest_answers_twilio_only_once_the_verdict_is_queued(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A verdict NATS would not queue is answered 503, which Twilio retries; the retry queues it, once
    however often it comes. Its own NATS server: the test removes the queue's stream."""
    from datetime import datetime, timezone

    from agentstudio import calls
    from agentstudio.callstate import CallState
    from agentstudio.natsserver import NatsServer
    from agentstudio.resources import Voicemail

    server = NatsServer(tmp_path / "nats")
    server.start()
    account_sid, auth_token = "AC" + uuid.uuid4().hex, uuid.uuid4().hex  # nothing here reaches Twilio
    try:
        async with ingest_client(server.url, twilio_auth_token=auth_token, public_base_url=PUBLIC) as (client, svc):
            call = calls.CallRequest(call_id=str(uuid.uuid4()), tenant="t-amd", api_key="live", phone_number=TO,
                                     user_context={}, metadata={}, test=False,
                                     created_at=datetime.now(timezone.utc), bundle_version=1)
            sid = "CA" + uuid.uuid4().hex
            answered = CallState.new(call).model_copy(update={
                "status": "in_progress", "provider": "twilio", "provider_call_id": sid,
                "answered_at": datetime.now(timezone.utc), "voicemail": Voicemail(action="hang_up")})
            await svc.tracker.store.change(call.tenant, call.call_id, lambda s: answered)
            url = f"{PUBLIC}/api/v1/providers/twilio/amd?call_id={call.call_id}&tenant={call.tenant}"
            verdict = {"CallSid": sid, "AccountSid": account_sid, "AnsweredBy": "machine_start"}

            await svc.js.delete_stream(bus.VOICEMAIL_STREAM)
            refused = await post_signed(client, auth_token, url, verdict)
            assert refused.status_code == 503 and refused.headers["retry-after"], refused.text
            await bus.ensure_voicemail_stream(svc.js)
            for _ in range(2):
                assert (await post_signed(client, auth_token, url, verdict)).status_code == 204
            info = await svc.js.stream_info(bus.VOICEMAIL_STREAM, subjects_filter="voicemail.>")
            assert info.state.subjects == {bus.voicemail_subject(call.tenant, call.call_id): 1}
            queued = await svc.js.get_last_msg(bus.VOICEMAIL_STREAM, bus.voicemail_subject(call.tenant, call.call_id))
            assert orjson.loads(queued.data) == {"tenant": call.tenant, "call_id": call.call_id,
                                                 "provider_call_id": sid, "answered_by": "machine_start"}
    finally:
        server.stop()
