"""The seed's example campaign end to end: a CleverTap-style POST to ingest → queued → the dialer
places it (simulated provider) → answered → the relay WebSocket as Twilio opens it → the Tap Health
agent with the scripted model → capture_lead_response and log_call → end_call → a signed
call.completed at the tenant's receiver with the transcript, what was captured and the duration."""

from __future__ import annotations

import asyncio
import csv
import io
import json

from nats.js import JetStreamContext

from agentstudio import signing
from agentstudio.dialer.phone_line import Line
from agentstudio.natsserver import NatsServer
from conftest import SEED_BODY
from scripted_model import Reply
from test_webhooks import Receiver
from voice_stack import voice_stack

CAPTURED = {"faced_issues": True, "issue": "the OTP never arrived", "wants_help": True}


async def callee(line: Line) -> None:
    """John picks up, answers twice, and listens until the agent says goodbye."""
    assert (await line.hear()).startswith("Hi John")  # type: ignore[union-attr]
    await asyncio.sleep(1.1)  # a real pause, so the call has a duration
    await line.say("Yes, sure.")
    await line.hear()
    await line.say("The OTP never arrived. I'd like help.")
    while await line.hear() is not None:
        pass


async def test_the_seed_campaign_runs_end_to_end(nats_server: NatsServer, js: JetStreamContext) -> None:
    receiver = Receiver(signing.new_secret())
    subscription = {"apiVersion": "agentstudio.io/v1alpha1", "kind": "WebhookSubscription",
                    "metadata": {"name": "crm"}, "spec": {"url": receiver.url, "events": ["call.completed"]}}
    async with voice_stack(nats_server.url, js, extra=[subscription]) as stack:
        stack.model.script([
            Reply("You started a free trial but didn't finish activating it. Did anything get in the way?"),
            Reply(tool_calls=[("capture_lead_response", CAPTURED), ("log_call", {"outcome": "needs_help"})]),
            Reply("Thanks John, someone from Tap Health will help you finish. Goodbye!", tool_calls=[("end_call", {})]),
        ])
        t = stack.tenant
        async with stack.campaign(nats_server.url, receiver, "crm-webhook-secret", callee) as client:
            call_id = await stack.seed_call(client, receiver)
            record = (await client.get(f"/api/v1/calls/{call_id}", headers=t.auth("analytics-readonly"))).json()
            export = await client.get("/api/v1/calls/export?format=csv", headers=t.auth("analytics-readonly"))

    [completed] = receiver.received
    data = completed["event"]["data"]
    assert completed["type"] == "call.completed" and data["call_id"] == call_id
    assert data["user_id"] == "user-123" and data["metadata"] == SEED_BODY["metadata"]
    assert data["captured"] == {"capture_lead_response": CAPTURED}
    assert data["end_reason"] == "end_call" and data["duration_seconds"] >= 1
    said = [(turn["kind"], turn.get("speaker") or turn.get("tool") or turn.get("reason")) for turn in data["transcript"]]
    assert said == [
        ("message", "agent"), ("message", "callee"), ("message", "agent"), ("message", "callee"),
        ("tool", "capture_lead_response"), ("tool", "log_call"), ("message", "agent"), ("tool", "end_call"),
        ("end", "end_call"),
    ]
    assert data["transcript"][1]["text"] == "Yes, sure."
    assert stack.target.seen[0]["json"]["campaign"] == "trial_recovery_jan"
    # The record the calls API serves says the same.
    assert record["status"] == "completed" and record["captured"] == data["captured"]
    assert [t["kind"] for t in record["transcript"]] == [t["kind"] for t in data["transcript"]]
    [row] = csv.DictReader(io.StringIO(export.text))
    assert row["end_reason"] == "end_call" and json.loads(row["captured"]) == data["captured"]
