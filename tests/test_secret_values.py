"""A Secret whose value an HTTP header cannot carry as it is (`kubectl create secret --from-file` keeps
the file's last line break; a NUL or a non-ASCII character cannot be sent at all), used by an
api_call tool on a real call: ingest → dialer → relay → the agent → the tool → the status webhook.
The value reaches nothing but the partner it is meant for: no log line, call record, CALL_EVENTS
message, webhook body, model request, nor a byte of the NATS server's store."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from nats.js import JetStreamContext

from agentstudio import bus, signing
from agentstudio.dialer.phone_line import Line
from agentstudio.natsserver import NatsServer
from conftest import SEED_BODY
from scripted_model import Reply
from test_webhooks import Receiver
from voice_stack import LLM_KEY, TwilioRelay, voice_stack

LLM = {"baseUrl": "MODEL_URL", "apiKeySecretRef": {"name": "llm-credentials", "key": "api-key"}}
MANIFESTS: list[dict[str, Any]] = [
    {"apiVersion": "agentstudio.io/v1alpha1", "kind": "Agent", "metadata": {"name": "crm-agent"},
     "spec": {"prompt": "Log outcomes.", "firstMessage": "Hi.", "allowedHosts": ["127.0.0.1"], "llm": LLM,
              "tools": [
                  {"name": "log", "parameters": {"type": "object", "properties": {"note": {"type": "string"}}},
                   "action": {"type": "api_call", "method": "POST", "url": "TARGET_URL/calls/log",
                              "headersFromSecrets": [{"name": "Authorization",
                                                      "secretKeyRef": {"name": "crm-token", "key": "token"}}],
                              "body": {"note": "{{params.note}}"}}},
                  {"name": "end_call", "action": {"type": "end_call"}},
              ]}},
    {"apiVersion": "agentstudio.io/v1alpha1", "kind": "ApiKey", "metadata": {"name": "clevertap"},
     "spec": {"scopes": ["calls:create", "calls:read"]}},
]


@pytest.fixture(scope="module")
def own_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A server of its own, so its store and its log hold only what these calls wrote."""
    folder = tmp_path_factory.mktemp("nats-secrets")
    with NatsServer(folder / "store", log_file=folder / "nats.log") as server:
        yield server


def logged(record: logging.LogRecord) -> str:
    """A log record with every field a formatter could print (`extra` ones too)."""
    fields = []
    for value in record.__dict__.values():
        try:
            fields.append(str(value))
        except ReferenceError:  # a weak proxy to what is gone says nothing
            pass
    return " ".join(fields)


def found_in_files(folder: Path, needle: bytes) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file() and needle in p.read_bytes()]


async def callee(line: Line) -> None:
    await line.hear()
    await line.say("Log that I want a demo.")
    while await line.hear() is not None:
        pass


# Each value is the whole Secret: "Bearer <token>" with what breaks it as a header.
@pytest.mark.parametrize("where,what", [
    ("end", "\n"), ("end", "\r\n"), ("middle", "\0"), ("middle", "é"),
], ids=["newline", "crlf", "nul", "non-ascii"])
async def test_a_secret_a_header_cannot_carry_leaks_nowhere(
    own_nats: NatsServer, caplog: pytest.LogCaptureFixture, where: str, what: str
) -> None:
    caplog.set_level(logging.DEBUG)
    token = "crm-" + uuid.uuid4().hex + uuid.uuid4().hex
    value = f"Bearer {token}{what}" if where == "end" else f"Bearer {token[:36]}{what}{token[36:]}"
    pieces = [token, token[:36], token[36:]]  # neither half of the token may show either
    receiver = Receiver(signing.new_secret())
    subscription = {"apiVersion": "agentstudio.io/v1alpha1", "kind": "WebhookSubscription",
                    "metadata": {"name": "results"}, "spec": {"url": receiver.url, "events": ["call.*"]}}
    nc = await bus.connect(own_nats.url, "test-secret-values")
    js = nc.jetstream()
    await bus.ensure_calls_stream(js)
    async with voice_stack(own_nats.url, js, MANIFESTS, extra=[subscription],
                           secrets={("crm-token", "token"): value}) as stack:
        stack.model.script([Reply(tool_calls=[("log", {"note": "wants a demo"})]),
                            Reply("Done, goodbye.", tool_calls=[("end_call", {})])])
        t = stack.tenant
        async with stack.campaign(own_nats.url, receiver, "results-webhook-secret", callee) as client:
            body = {**SEED_BODY, "workflow_slug": None, "agent_slug": "crm-agent"}
            answer = await client.post("/api/v1/webhooks/ingest", json=body, headers=t.auth("clevertap"))
            assert answer.status_code == 201, answer.text
            call_id = answer.json()["call_id"]
            events = await js.subscribe(bus.event_subject(t.name, call_id), ordered_consumer=True)
            async with asyncio.timeout(20):
                while "call.completed" not in [r["type"] for r in receiver.received]:
                    await asyncio.sleep(0.05)
            record = (await client.get(f"/api/v1/calls/{call_id}", headers=t.auth("clevertap"))).json()
            published = []
            while True:
                try:
                    published.append((await events.next_msg(timeout=0.5)).data.decode())
                except TimeoutError:
                    break
    await nc.close()

    assert [orjson.loads(p)["type"] for p in published] == ["call.answered", "call.completed"]
    assert own_nats.log_file is not None
    lines = [caplog.text, own_nats.log_file.read_text()] + [logged(r) for r in caplog.records]
    places = {
        "log": "\n".join(lines),
        "call record": orjson.dumps(record).decode(),
        "CALL_EVENTS": "\n".join(published),
        "webhook body": orjson.dumps([r["event"] for r in receiver.received]).decode(),
        "model requests": orjson.dumps(stack.model.requests).decode(),
    }
    assert {place: [p for p in pieces if p in text] for place, text in places.items()} == {p: [] for p in places}
    # The store holds this call (the search can see what was written) and none of the Secret.
    assert found_in_files(own_nats.store_dir, call_id.encode())
    assert {p: found_in_files(own_nats.store_dir, p.encode()) for p in pieces} == {p: [] for p in pieces}

    [tool] = [turn for turn in record["transcript"] if turn["kind"] == "tool" and turn["tool"] == "log"]
    if where == "end":  # one trailing line break is dropped, as kubectl users expect
        [seen] = stack.target.seen
        assert seen["headers"]["authorization"] == f"Bearer {token}" and tool["result"]["status"] == 200
    else:  # refused before anything is sent, naming the Secret and key and why
        assert stack.target.seen == []
        problem = "a NUL character" if what == "\0" else "a character that is not ASCII"
        assert tool["error"] == f"secret crm-token/token cannot be sent as an HTTP header: it contains {problem}"


@pytest.mark.parametrize("ending", ["\n", "\r\n"], ids=["newline", "crlf"])
async def test_a_model_key_kept_with_its_files_line_break_works(
    nats_server: NatsServer, js: JetStreamContext, ending: str
) -> None:
    async with voice_stack(nats_server.url, js, MANIFESTS, secrets={("llm-credentials", "api-key"): LLM_KEY + ending}) \
            as stack:
        stack.model.script([Reply("Hello there.")])
        call, sid = await stack.answered_call(workflow_slug=None, agent_slug="crm-agent")
        async with TwilioRelay.connect(stack.relay, call, sid) as twilio:
            assert await twilio.utterance() == "Hi."
            await twilio.prompt("Hello?")
            assert await twilio.utterance() == "Hello there."


async def test_a_model_key_a_header_cannot_carry_ends_the_call_naming_the_secret(
    nats_server: NatsServer, js: JetStreamContext
) -> None:
    async with voice_stack(nats_server.url, js, MANIFESTS, secrets={("llm-credentials", "api-key"): LLM_KEY + "\0"}) \
            as stack:
        call, sid = await stack.answered_call(workflow_slug=None, agent_slug="crm-agent")
        async with TwilioRelay.connect(stack.relay, call, sid) as twilio:
            assert (await twilio.end())["reason"] == "error"
        record = await stack.closed_record(call.call_id)
    assert record.end_reason == "error" and stack.model.requests == []
    [end] = [turn for turn in record.transcript if turn["kind"] == "end"]
    assert end["error"] == ("agent crm-agent: secret llm-credentials/api-key cannot be sent as an HTTP header: "
                            "it contains a NUL character (spec.llm.apiKeySecretRef)")
    assert LLM_KEY not in record.model_dump_json()
