"""The voice agent over ConversationRelay, driven the way Twilio drives it: setup, prompts, an
interrupt, a DTMF digit — against the scripted model and a local HTTP target for api_call."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import uvicorn
import websockets
from twilio.request_validator import RequestValidator
from nats.js import JetStreamContext

from agentstudio.conversation.relay import relay_url
from agentstudio.dialer import main as dialer_main
from agentstudio.natsserver import NatsServer, free_port
from scripted_model import Reply
from voice_stack import LLM_KEY, TwilioRelay, voice_stack

FIRST = "Hi John, this is the Tap Health assistant. Do you have a minute?"
CAPTURED = {"faced_issues": True, "issue": "the OTP never arrived", "wants_help": True}


async def test_the_seed_agent_greets_captures_logs_and_ends(nats_server: NatsServer, js: JetStreamContext) -> None:
    async with voice_stack(nats_server.url, js) as stack:
        stack.model.script([
            Reply("You started a free trial but didn't finish activating it. Did anything get in the way?"),
            Reply(tool_calls=[("capture_lead_response", CAPTURED), ("log_call", {"outcome": "needs_help"})]),
            Reply("Thanks John, I've noted that and someone will help you finish. Goodbye!",
                  tool_calls=[("end_call", {})]),
        ])
        call, sid = await stack.answered_call()
        async with TwilioRelay.connect(stack.relay, call, sid) as twilio:
            assert await twilio.utterance() == FIRST  # spoken on answer, before the model is asked
            await twilio.prompt("Yes, sure.")
            assert "free trial" in await twilio.utterance()
            await twilio.prompt("The OTP never arrived. I'd like help with it.")
            assert (await twilio.utterance()).endswith("Goodbye!")
            assert await twilio.end() == {"reason": "end_call"}
        record = await stack.closed_record(call.call_id)
        async with httpx.AsyncClient() as http:
            metrics = (await http.get(f"http://127.0.0.1:{stack.port}/metrics")).text

    # What the dialer's /metrics says of it.
    assert 'agentstudio_conversations_ended_total{end_reason="end_call"} 1.0' in metrics
    assert 'agentstudio_tool_calls_total{outcome="ok",type="capture"} 1.0' in metrics
    assert 'agentstudio_tool_calls_total{outcome="ok",type="api_call"} 1.0' in metrics
    assert "agentstudio_model_first_token_seconds_count 2.0" in metrics  # two replies began with words
    assert "agentstudio_conversations_active 0.0" in metrics
    # The prompt rendered with the campaign's data; the key from the Secret; every tool offered.
    first = stack.model.requests[0]
    system = first["messages"][0]
    assert system["role"] == "system"
    assert "The user John started their free trial on 2026-02-01" in system["content"]
    assert [m["role"] for m in first["messages"]] == ["system", "assistant", "user"]
    assert first["messages"][1]["content"] == FIRST
    assert {t["function"]["name"] for t in first["tools"]} == {"capture_lead_response", "log_call", "end_call"}
    assert all(h.get("authorization") == f"Bearer {LLM_KEY}" for h in stack.model.headers)
    # The api_call tool's body rendered value by value from context, user, metadata and params.
    [logged] = stack.target.seen
    assert logged["method"] == "POST" and logged["path"] == "/calls/log"
    assert logged["json"] == {"phone": "+919876543210", "user_id": "user-123", "campaign": "trial_recovery_jan",
                              "outcome": "needs_help"}
    # The model read both tool results before it said goodbye.
    third = stack.model.requests[2]["messages"]
    assert [m["role"] for m in third[-3:]] == ["assistant", "tool", "tool"]
    assert '"logged":true' in third[-1]["content"].replace(" ", "")
    # The record: what was captured, why it ended, and every turn in order.
    assert record.captured == {"capture_lead_response": CAPTURED}
    assert record.end_reason == "end_call"
    kinds = [(t["kind"], t.get("speaker") or t.get("tool") or t.get("reason")) for t in record.transcript]
    assert kinds == [
        ("message", "agent"), ("message", "callee"), ("message", "agent"), ("message", "callee"),
        ("tool", "capture_lead_response"), ("tool", "log_call"), ("message", "agent"), ("tool", "end_call"),
        ("end", "end_call"),
    ]
    assert all(t["agent"] == "trial-followup-agent" for t in record.transcript)
    assert record.transcript[5]["result"]["status"] == 200
    stamps = [t["at"] for t in record.transcript]
    assert stamps == sorted(stamps)


async def test_barge_in_keeps_what_was_heard_and_dtmf_reaches_the_model(
    nats_server: NatsServer, js: JetStreamContext
) -> None:
    long_reply = "Our plans include coaching, meal tracking, glucose insights, weekly reviews and more besides."
    async with voice_stack(nats_server.url, js) as stack:
        stack.model.script([
            Reply(long_reply, token_delay_seconds=0.05),
            Reply("Sorry, go ahead."),
            Reply("You pressed five: I'll connect you to activation help."),
        ])
        call, sid = await stack.answered_call()
        async with TwilioRelay.connect(stack.relay, call, sid) as twilio:
            await twilio.utterance()
            await twilio.prompt("What do I get?")
            tokens = [await twilio.next() for _ in range(3)]  # the reply is still streaming
            heard = "".join(t["token"] for t in tokens)
            await twilio.send(type="interrupt", utteranceUntilInterrupt=heard, durationUntilInterruptMs="900")
            # Generation stops: the next frame closes the cut reply (Twilio's own sample does the same).
            while (frame := await twilio.next())["token"] != "" or not frame["last"]:
                pass
            await twilio.prompt("Wait, how much is it?")
            assert await twilio.utterance() == "Sorry, go ahead."
            await twilio.send(type="dtmf", digit="5")
            assert (await twilio.utterance()).startswith("You pressed five")
        record = await stack.closed_record(call.call_id)

    assert len(stack.model.requests) == 3
    after_barge_in = stack.model.requests[1]["messages"]
    assert after_barge_in[-2] == {"role": "assistant", "content": heard}  # only what the callee heard
    assert after_barge_in[-1] == {"role": "user", "content": "Wait, how much is it?"}
    assert stack.model.requests[2]["messages"][-1]["content"] == "(The callee pressed 5 on the keypad.)"
    cut = [t for t in record.transcript if t.get("interrupted")]
    assert [t["text"] for t in cut] == [heard] and heard != long_reply
    assert {"kind": "dtmf", "digit": "5"}.items() <= next(t for t in record.transcript if t["kind"] == "dtmf").items()
    assert record.end_reason == "callee_hangup"


async def test_a_setup_whose_call_sid_does_not_match_is_closed(nats_server: NatsServer, js: JetStreamContext) -> None:
    async with voice_stack(nats_server.url, js) as stack:
        call, sid = await stack.answered_call()
        async with TwilioRelay.connect(stack.relay, call, "CA" + "f" * 32) as twilio:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await twilio.next()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
        assert (await stack.record(call.call_id)).conversation is None  # the real call can still connect
        async with TwilioRelay.connect(stack.relay, call, sid) as twilio:
            assert (await twilio.utterance()).startswith("Hi John")
        assert stack.model.requests == []


async def test_the_relay_does_not_compress_its_frames(nats_server: NatsServer, js: JetStreamContext) -> None:
    # A client offering permessage-deflate (websockets does by default) gets plain frames: a frame is
    # one token or one prompt, and each socket's zlib streams cost CPU a frame and memory a call.
    async with voice_stack(nats_server.url, js) as stack:
        call, sid = await stack.answered_call()
        async with TwilioRelay.connect(stack.relay, call, sid) as twilio:
            assert twilio.ws.request is not None and "permessage-deflate" in \
                twilio.ws.request.headers["Sec-WebSocket-Extensions"]
            assert twilio.ws.response is not None and "Sec-WebSocket-Extensions" not in twilio.ws.response.headers
            assert (await twilio.utterance()).startswith("Hi John")


async def test_caller_data_is_data_never_template_source(nats_server: NatsServer, js: JetStreamContext) -> None:
    sneaky = {"name": "{{ 7*7 }}", "trial_started_at": "{{ ''.__class__.__mro__ }}", "plan_type": 'a "quoted"\nplan'}
    async with voice_stack(nats_server.url, js) as stack:
        stack.model.script([Reply(tool_calls=[("log_call", {"outcome": "{{ 6*7 }}"})]), Reply("Done.")])
        call, sid = await stack.answered_call(user_context=sneaky, user_id='u"1\n{{x}}')
        async with TwilioRelay.connect(stack.relay, call, sid) as twilio:
            assert await twilio.utterance() == "Hi {{ 7*7 }}, this is the Tap Health assistant. Do you have a minute?"
            await twilio.prompt("ok")
            assert await twilio.utterance() == "Done."
    system = stack.model.requests[0]["messages"][0]["content"]
    assert "The user {{ 7*7 }} started their free trial on {{ ''.__class__.__mro__ }}" in system
    [logged] = stack.target.seen
    assert logged["json"]["user_id"] == 'u"1\n{{x}}' and logged["json"]["outcome"] == "{{ 6*7 }}"


async def test_api_call_to_a_private_address_is_refused_unless_allow_listed(
    nats_server: NatsServer, js: JetStreamContext
) -> None:
    async with voice_stack(nats_server.url, js, allow_loopback=False) as stack:
        stack.model.script([Reply(tool_calls=[("log_call", {"outcome": "activated"})]), Reply("All set.")])
        call, sid = await stack.answered_call()
        async with TwilioRelay.connect(stack.relay, call, sid) as twilio:
            await twilio.utterance()
            await twilio.prompt("I activated it already.")
            assert await twilio.utterance() == "All set."
        record = await stack.closed_record(call.call_id)
    assert stack.target.seen == []  # nothing reached the loopback target
    [tool] = [t for t in record.transcript if t["kind"] == "tool"]
    assert "loopback" in tool["error"]
    assert "loopback" in stack.model.requests[1]["messages"][-1]["content"]  # the model learns why


async def test_with_an_auth_token_the_upgrade_must_carry_twilios_signature(
    nats_server: NatsServer, js: JetStreamContext
) -> None:
    token = "twilio-auth-token"
    async with voice_stack(nats_server.url, js, twilio_auth_token=token) as stack:
        call, sid = await stack.answered_call()
        for signature in (None, "bm90IGl0", RequestValidator("another token").compute_signature(stack.relay, {})):
            with pytest.raises(websockets.ConnectionClosed) as closed:  # before or after the setup went
                async with TwilioRelay.connect(stack.relay, call, sid, signature) as twilio:
                    await twilio.next()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
        assert (await stack.record(call.call_id)).conversation is None
        # Signed over the wss:// URL Twilio was given (here ws://, the stack has no TLS).
        signed = RequestValidator(token).compute_signature(stack.relay, {})
        async with TwilioRelay.connect(stack.relay, call, sid, signed) as twilio:
            assert (await twilio.utterance()).startswith("Hi John")


async def test_malformed_frames_are_dropped_and_a_bad_setup_is_refused(
    nats_server: NatsServer, js: JetStreamContext
) -> None:
    async with voice_stack(nats_server.url, js) as stack:
        stack.model.script([Reply("Still here.")])
        call, sid = await stack.answered_call()
        for first in ("[1, 2]", "not json", '{"type": "prompt", "voicePrompt": "hi"}'):
            async with websockets.connect(stack.relay) as ws:
                await ws.send(first)
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await ws.recv()
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
        async with TwilioRelay.connect(stack.relay, call, sid) as twilio:
            await twilio.utterance()
            await twilio.ws.send("{oops")
            await twilio.ws.send(b"\x00binary")
            await twilio.send(type="error", description="Invalid message received")
            await twilio.prompt("Hello?")
            assert await twilio.utterance() == "Still here."  # the session carried on


async def test_a_stopping_dialer_says_not_ready_and_lets_live_conversations_finish(
    nats_server: NatsServer, js: JetStreamContext
) -> None:
    async with voice_stack(nats_server.url, js) as stack:
        stack.model.script([Reply("Still here, go on."), Reply("Goodbye!", tool_calls=[("end_call", {})])])
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(dialer_main.relay_app(stack.runtime), host="127.0.0.1", port=port,
                                               log_config=None, access_log=False))
        stop = asyncio.Event()
        serving = asyncio.create_task(dialer_main.serve_relay(server, stack.runtime, stop))
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base) as http:
            async with asyncio.timeout(10):
                while not server.started:
                    await asyncio.sleep(0.01)
            assert (await http.get("/readyz")).status_code == 200
            call, sid = await stack.answered_call()
            async with TwilioRelay.connect(relay_url(base), call, sid) as twilio:
                assert await twilio.utterance() == FIRST
                stop.set()  # SIGTERM: a rollout replaces this dialer mid-call
                async with asyncio.timeout(5):
                    while (await http.get("/readyz")).status_code != 503:
                        await asyncio.sleep(0.01)
                # uvicorn looks at should_exit every 0.1 s: a server that would cut the call has by now.
                await asyncio.sleep(0.5)
                await twilio.prompt("Yes, sure.")
                assert await twilio.utterance() == "Still here, go on."
                assert not serving.done()
                await twilio.prompt("That's all.")
                assert await twilio.utterance() == "Goodbye!"
                assert await twilio.end() == {"reason": "end_call"}
        async with asyncio.timeout(10):
            await serving  # the last conversation ended: the server stops
        assert (await stack.closed_record(call.call_id)).end_reason == "end_call"
