"""Conversation behaviour over the relay: workflow handoffs, capture validation, silence, the time
limit, transfer, and the end event waiting for the final transcript."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import yaml
from nats.js import JetStreamContext
from twilio.request_validator import RequestValidator

from agentstudio import bus, transcripts
from agentstudio.conversation.conversation import Limits
from agentstudio.natsserver import NatsServer
from conftest import ingest_client
from scripted_model import Reply
from voice_stack import TwilioRelay, voice_stack

SUPPORT = yaml.safe_load_all("""
apiVersion: agentstudio.io/v1alpha1
kind: Agent
metadata: {name: triage}
spec:
  prompt: "You are the front desk of {{context.company}}. Caller: {{user.name}}."
  firstMessage: "Hello {{user.name}}, how can I help?"
  llm: {baseUrl: MODEL_URL, apiKeySecretRef: {name: llm-credentials, key: api-key}}
  silenceTimeoutSeconds: 3
  tools:
    - name: record_reason
      description: Record why they called.
      parameters:
        type: object
        properties: {reason: {type: string, enum: [billing, technical, other]}}
        required: [reason]
      action: {type: capture}
    - name: human
      description: Connect a person.
      action: {type: transfer, phoneNumber: "+14155550123"}
---
apiVersion: agentstudio.io/v1alpha1
kind: Agent
metadata: {name: billing}
spec:
  prompt: "You handle billing for {{context.company}}; the call id is {{context.call_id}}."
  firstMessage: "Namaste {{user.name}}, I look after billing."
  language: hi-IN
  llm: {baseUrl: MODEL_URL, apiKeySecretRef: {name: llm-credentials, key: api-key}}
  tools:
    - name: end_call
      action: {type: end_call}
---
apiVersion: agentstudio.io/v1alpha1
kind: Workflow
metadata: {name: support}
spec:
  entryAgent: triage
  agents: [billing]
  sharedContext: {company: Tap Health}
  handoffs:
    - {from: triage, to: billing, when: the caller asks about a bill or a payment}
---
apiVersion: agentstudio.io/v1alpha1
kind: ApiKey
metadata: {name: clevertap}
spec: {scopes: ["calls:create", "calls:read"]}
""")
MANIFESTS = [doc for doc in SUPPORT if doc]
BODY = {"workflow_slug": "support", "user_context": {"name": "Asha"}}


async def test_a_workflow_hands_the_call_over_with_its_summary(nats_server: NatsServer, js: JetStreamContext) -> None:
    async with voice_stack(nats_server.url, js, MANIFESTS) as stack:
        stack.model.script([
            Reply("Let me get you to billing.", tool_calls=[("handoff_to_billing", {"summary": "Asha was charged twice"})]),
            Reply("I've refunded the second charge. Bye!", tool_calls=[("end_call", {})]),
        ])
        call, sid = await stack.answered_call(**BODY)
        async with TwilioRelay.connect(stack.relay, call, sid) as twilio:
            assert await twilio.utterance() == "Hello Asha, how can I help?"
            await twilio.prompt("I was charged twice this month.")
            assert await twilio.utterance() == "Let me get you to billing."
            assert await twilio.next() == {"type": "language", "ttsLanguage": "hi-IN", "transcriptionLanguage": "hi-IN"}
            assert await twilio.utterance() == "Namaste Asha, I look after billing."
            await twilio.prompt("Can you fix it?")
            assert await twilio.utterance() == "I've refunded the second charge. Bye!"
            assert (await twilio.end())["reason"] == "end_call"
        record = await stack.closed_record(call.call_id)

    first, second = stack.model.requests
    assert first["messages"][0]["content"] == "You are the front desk of Tap Health. Caller: Asha."
    [offered] = [t["function"] for t in first["tools"] if t["function"]["name"] == "handoff_to_billing"]
    assert "asks about a bill" in offered["description"] and "summary" in offered["parameters"]["properties"]
    system = second["messages"][0]["content"]
    assert system.startswith(f"You handle billing for Tap Health; the call id is {call.call_id}.")
    assert "taking over this call from the triage agent" in system and "Asha was charged twice" in system
    assert [t["function"]["name"] for t in second["tools"]] == ["end_call"]
    # The new agent reads the whole conversation so far, the handoff's tool result included.
    assert [m["role"] for m in second["messages"][1:]] == ["assistant", "user", "assistant", "tool", "assistant", "user"]
    turns = [(t["kind"], t["agent"], t.get("speaker") or t.get("to") or t.get("tool") or t.get("reason"))
             for t in record.transcript]
    assert turns == [
        ("message", "triage", "agent"), ("message", "triage", "callee"), ("message", "triage", "agent"),
        ("tool", "triage", "handoff_to_billing"), ("handoff", "triage", "billing"),
        ("message", "billing", "agent"), ("message", "billing", "callee"), ("message", "billing", "agent"),
        ("tool", "billing", "end_call"), ("end", "billing", "end_call"),
    ]


async def test_capture_arguments_are_validated_against_the_tool_schema(
    nats_server: NatsServer, js: JetStreamContext
) -> None:
    async with voice_stack(nats_server.url, js, MANIFESTS) as stack:
        stack.model.script([
            Reply(tool_calls=[("record_reason", {"reason": "refund"})]),
            Reply(tool_calls=[("record_reason", {"reason": "billing"})]),
            Reply("Noted."),
        ])
        call, sid = await stack.answered_call(**BODY)
        async with TwilioRelay.connect(stack.relay, call, sid) as twilio:
            await twilio.utterance()
            await twilio.prompt("It's about my bill.")
            assert await twilio.utterance() == "Noted."
        record = await stack.closed_record(call.call_id)
    refused = orjson.loads(stack.model.requests[1]["messages"][-1]["content"])
    assert "reason" in refused["error"] and "refund" in refused["error"]  # the model is told what was wrong
    assert record.captured == {"record_reason": {"reason": "billing"}}
    tools = [t for t in record.transcript if t["kind"] == "tool"]
    assert [bool(t.get("error")) for t in tools] == [True, False]


async def test_silence_gets_one_check_in_then_a_polite_end(nats_server: NatsServer, js: JetStreamContext) -> None:
    async with voice_stack(nats_server.url, js, MANIFESTS) as stack:
        stack.model.script([Reply("Are you still there?"), Reply("I'll let you go. Goodbye!")])
        call, sid = await stack.answered_call(**BODY)
        async with TwilioRelay.connect(stack.relay, call, sid) as twilio:
            await twilio.utterance()
            assert await twilio.utterance(timeout=8) == "Are you still there?"
            assert await twilio.utterance(timeout=8) == "I'll let you go. Goodbye!"
            assert (await twilio.end())["reason"] == "silence"
        record = await stack.closed_record(call.call_id)
    notes = [r["messages"][-1] for r in stack.model.requests]
    assert notes[0]["role"] == "system" and "said nothing for 3 seconds" in notes[0]["content"]
    assert "goodbye" in notes[1]["content"] and "tools" not in stack.model.requests[1]
    assert [t["kind"] for t in record.transcript] == ["message", "silence", "message", "silence", "message", "end"]


async def test_the_time_limit_ends_the_call_after_a_goodbye(nats_server: NatsServer, js: JetStreamContext) -> None:
    # The platform's cap (AGENTSTUDIO_MAX_CALL_SECONDS) bounds every agent's maxDurationSeconds.
    limits = Limits(speech_chars_per_second=1e6, max_call_seconds=1)
    async with voice_stack(nats_server.url, js, MANIFESTS, limits=limits) as stack:
        stack.model.script([Reply("We're out of time, thank you, goodbye!")])
        call, sid = await stack.answered_call(**BODY)
        async with TwilioRelay.connect(stack.relay, call, sid) as twilio:
            await twilio.utterance()
            assert await twilio.utterance(timeout=5) == "We're out of time, thank you, goodbye!"
            assert (await twilio.end())["reason"] == "max_duration"
        record = await stack.closed_record(call.call_id)
    assert "time limit" in stack.model.requests[0]["messages"][-1]["content"]
    assert record.end_reason == "max_duration"


async def test_transfer_ends_the_relay_and_dials_the_human(nats_server: NatsServer, js: JetStreamContext) -> None:
    async with voice_stack(nats_server.url, js, MANIFESTS) as stack:
        stack.model.script([Reply("Connecting you now.", tool_calls=[("human", {})])])
        call, sid = await stack.answered_call(**BODY)
        async with TwilioRelay.connect(stack.relay, call, sid) as twilio:
            await twilio.utterance()
            await twilio.prompt("I want a person.")
            await twilio.utterance()
            handoff_data = await twilio.end()
        record = await stack.closed_record(call.call_id)
    assert handoff_data == {"reason": "transfer", "transfer_to": "+14155550123"}
    assert [t["kind"] for t in record.transcript][-3:] == ["tool", "transfer", "end"]
    # Twilio then requests the <Connect action> URL with HandoffData: we answer with a <Dial>.
    token, base = "tok3n", "https://voice.example.net"
    async with ingest_client(nats_server.url, twilio_auth_token=token, public_base_url=base) as (client, _):
        path = f"/api/v1/providers/twilio/relay-ended?call_id={call.call_id}&tenant={call.tenant}"

        async def ended(data: dict[str, Any]) -> Any:
            params = {"CallSid": sid, "CallStatus": "in-progress", "SessionStatus": "ended",
                      "HandoffData": orjson.dumps(data).decode()}
            signature = RequestValidator(token).compute_signature(base + path, params)
            return await client.post(path, data=params, headers={"X-Twilio-Signature": signature})

        dial = await ended(handoff_data)
        hangup = await ended({"reason": "end_call"})
        forged = await client.post(path, data={"HandoffData": orjson.dumps(handoff_data).decode()},
                                   headers={"X-Twilio-Signature": "bm9wZQ=="})
    assert dial.status_code == 200 and "<Dial>+14155550123</Dial>" in dial.text
    assert "<Hangup />" in hangup.text and "Dial" not in hangup.text
    assert forged.status_code == 403


async def test_a_relay_that_never_connected_fails_the_call(nats_server: NatsServer, js: JetStreamContext) -> None:
    # Twilio could not open our WebSocket (error 64102): its <Connect action> request says so with
    # SessionStatus=failed and ErrorCode/ErrorMessage (../shared/twilio/conversation-relay.md, from
    # Twilio's <ConversationRelay> docs and samples).
    async with voice_stack(nats_server.url, js, MANIFESTS) as stack:
        call, sid = await stack.answered_call(**BODY)
        events = await js.subscribe(bus.event_subject(call.tenant, call.call_id), ordered_consumer=True)
        token, base = "tok3n", "https://voice.example.net"
        async with ingest_client(nats_server.url, twilio_auth_token=token, public_base_url=base) as (client, _):
            path = f"/api/v1/providers/twilio/relay-ended?call_id={call.call_id}&tenant={call.tenant}"
            params = {"CallSid": sid, "CallStatus": "in-progress", "SessionId": "VX" + "0" * 32,
                      "SessionStatus": "failed", "SessionDuration": "0", "ErrorCode": "64102",
                      "ErrorMessage": "Unable to connect to the WebSocket"}
            signature = RequestValidator(token).compute_signature(base + path, params)
            answer = await client.post(path, data=params, headers={"X-Twilio-Signature": signature})
        state = await stack.record(call.call_id)
        sent = orjson.loads((await events.next_msg(timeout=5)).data)
    assert answer.status_code == 200 and "<Hangup />" in answer.text
    assert state.status == "failed" and state.end_reason == "relay_failed"
    assert state.error is not None and state.error.code == "twilio_64102"
    assert sent["type"] == "call.failed" and sent["data"]["end_reason"] == "relay_failed"
    assert sent["data"]["error"]["code"] == "twilio_64102"


async def test_the_end_event_waits_for_the_final_transcript(nats_server: NatsServer, js: JetStreamContext) -> None:
    async with voice_stack(nats_server.url, js, MANIFESTS) as stack:
        stack.model.script([Reply("Sure.")])
        call, sid = await stack.answered_call(**BODY)
        events = await js.subscribe(bus.event_subject(call.tenant, call.call_id), ordered_consumer=True)
        async with TwilioRelay.connect(stack.relay, call, sid) as twilio:
            await twilio.utterance()
            # The provider reports the end while the agent is still talking: the event is held.
            await stack.runtime.tracker.advance(call.tenant, call.call_id, "completed", duration_seconds=42)
            await twilio.prompt("Thanks, bye.")
            await twilio.utterance()
            held = await asyncio.gather(events.next_msg(timeout=0.5), return_exceptions=True)
        await stack.closed_record(call.call_id)
        sent = orjson.loads((await events.next_msg(timeout=5)).data)
    assert isinstance(held[0], Exception)  # nothing was published before the conversation closed
    assert sent["type"] == "call.completed" and sent["data"]["duration_seconds"] == 42
    assert [t["kind"] for t in sent["data"]["transcript"]] == ["message", "message", "message", "end"]
    assert sent["data"]["end_reason"] == "callee_hangup"


CRM = [{
    "apiVersion": "agentstudio.io/v1alpha1", "kind": "Agent", "metadata": {"name": "crm-agent"},
    "spec": {
        "prompt": "Log outcomes.", "firstMessage": "Hi.", "allowedHosts": ["127.0.0.1"],
        "llm": {"baseUrl": "MODEL_URL", "apiKeySecretRef": {"name": "llm-credentials", "key": "api-key"}},
        "tools": [{
            "name": "log", "parameters": {"type": "object", "properties": {"note": {"type": "string"}}},
            "action": {"type": "api_call", "method": "PUT", "url": "TARGET_URL/leads/{{user.user_id}}",
                       "headers": {"X-Campaign": "{{metadata.campaign_id}}"},
                       "headersFromSecrets": [{"name": "Authorization",
                                               "secretKeyRef": {"name": "crm-token", "key": "token"}}],
                       "body": {"note": "{{params.note}}", "phone": "{{context.phone_number}}"}},
        }],
    },
}]


async def test_api_call_headers_come_from_secrets_and_stay_out_of_the_record(
    nats_server: NatsServer, js: JetStreamContext
) -> None:
    token = "Bearer crm-" + "s3cr3t" * 4
    async with voice_stack(nats_server.url, js, CRM, secrets={("crm-token", "token"): token}) as stack:
        stack.model.script([Reply(tool_calls=[("log", {"note": "wants a demo"})]), Reply("Logged.")])
        call, sid = await stack.answered_call(workflow_slug=None, agent_slug="crm-agent")
        async with TwilioRelay.connect(stack.relay, call, sid) as twilio:
            await twilio.utterance()
            await twilio.prompt("Book me a demo.")
            assert await twilio.utterance() == "Logged."
        record = await stack.closed_record(call.call_id)
    [seen] = stack.target.seen
    assert seen["method"] == "PUT" and seen["path"] == "/leads/user-123"
    assert seen["headers"]["authorization"] == token and seen["headers"]["x-campaign"] == "trial_recovery_jan"
    assert seen["json"] == {"note": "wants a demo", "phone": "+919876543210"}
    assert token not in record.model_dump_json()
    assert token not in orjson.dumps(stack.model.requests).decode()


async def test_a_failing_model_ends_the_call_with_its_reason(nats_server: NatsServer, js: JetStreamContext) -> None:
    async with voice_stack(nats_server.url, js, MANIFESTS) as stack:
        stack.model.script([])  # every request answers 500
        call, sid = await stack.answered_call(**BODY)
        async with TwilioRelay.connect(stack.relay, call, sid) as twilio:
            await twilio.utterance()
            await twilio.prompt("Hello?")
            assert (await twilio.end())["reason"] == "model_error"
        record = await stack.closed_record(call.call_id)
    [end] = [t for t in record.transcript if t["kind"] == "end"]
    assert end["reason"] == "model_error" and "500" in end["error"]  # why, without the key
    assert record.end_reason == "model_error"


async def test_an_api_call_whose_secret_is_missing_is_not_sent(nats_server: NatsServer, js: JetStreamContext) -> None:
    async with voice_stack(nats_server.url, js, CRM) as stack:  # no crm-token Secret
        stack.model.script([Reply(tool_calls=[("log", {"note": "x"})]), Reply("Sorry, I couldn't log that.")])
        call, sid = await stack.answered_call(workflow_slug=None, agent_slug="crm-agent")
        async with TwilioRelay.connect(stack.relay, call, sid) as twilio:
            await twilio.utterance()
            await twilio.prompt("Log it.")
            await twilio.utterance()
        record = await stack.closed_record(call.call_id)
    assert stack.target.seen == []
    [tool] = [t for t in record.transcript if t["kind"] == "tool"]
    assert tool["error"] == "secret crm-token/token is not readable"
    assert orjson.loads(stack.model.requests[1]["messages"][-1]["content"]) == {"error": tool["error"]}


async def test_a_turn_is_written_to_the_record_once(nats_server: NatsServer, js: JetStreamContext) -> None:
    # A turn changes the transcript three times (the callee's words, the agent's reply starting, its last
    # words). Written apart, each was a transcript chunk and a compare-and-set of the record: a fifth of
    # a dialer's CPU at 500 conversations (bench/conversations.py). Together they are one.
    reply = "Sure, one moment please while I look."
    async with voice_stack(nats_server.url, js) as stack:
        stack.model.script([Reply(reply, delay_seconds=0.3, token_delay_seconds=0.05)])
        call, sid = await stack.answered_call()
        async with TwilioRelay.connect(stack.relay, call, sid) as twilio:
            await twilio.utterance()  # the first message
            await twilio.prompt("Hi, who is this?")
            assert await twilio.utterance() == reply
            async with asyncio.timeout(10):  # until the transcript stream has the turn as said
                while [t.get("text") for t in await transcripts.read(js, call.tenant, call.call_id, 1)][-2:] != \
                        ["Hi, who is this?", reply]:
                    await asyncio.sleep(0.05)
            chunks = await js.stream_info(bus.TRANSCRIPTS_STREAM,
                                          subjects_filter=bus.transcript_subject(call.tenant, call.call_id, 1))
    assert sum(chunks.state.subjects.values()) <= 2, chunks.state.subjects  # before: 3-4
