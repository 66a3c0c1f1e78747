"""Traces against a real Jaeger (scripts/build-jaeger): the seed's campaign call end to end — the
ingest request, the queue, the dialer's placement, the conversation's turns, model requests, tools
and a handoff, the webhook delivery — is one trace, read back through Jaeger's query API; no span
attribute holds the phone number, a key or a secret; the requests the call makes to other systems
carry the traceparent of their spans (unless switched off). Off, nothing is exported, nothing is
propagated and the SDK is not imported."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from nats.js import JetStreamContext

from agentstudio import signing, tracing
from agentstudio.dialer.phone_line import Line
from agentstudio.natsserver import NatsServer
from agentstudio.settings import Settings
from conftest import SEED_BODY, example_resources, published_tenant
from jaeger import Jaeger, running
from processes import running_ingest
from scripted_model import Reply
from test_dialer import dialers, queue_call, until_status
from test_dialer_twilio import live, twilio_settings  # noqa: F401 - live is a fixture
from test_webhooks import Receiver
from twilio_mock import TwilioMock
from voice_stack import LLM_KEY, example_manifests, voice_stack

# The seed's agent may hand the call to a second one, which ends it.
CARE = yaml.safe_load("""
apiVersion: agentstudio.io/v1alpha1
kind: Agent
metadata: {name: care-agent}
spec:
  prompt: "You help {{user.name}} finish activating their trial."
  firstMessage: "Hello {{user.name}}, I'm from the care team."
  llm: {baseUrl: MODEL_URL, apiKeySecretRef: {name: llm-credentials, key: api-key}}
  allowedHosts: [127.0.0.1]
  tools:
    - name: end_call
      action: {type: end_call}
""")
CAPTURED = {"faced_issues": True, "issue": "the OTP never arrived", "wants_help": True}


@pytest.fixture(scope="module")
def jaeger(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Jaeger]:
    with running(tmp_path_factory.mktemp("jaeger")) as server:
        yield server


@pytest.fixture
def traced(jaeger: Jaeger, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[str]:
    """Tracing on in this process, exporting to Jaeger under a service name of this test's own;
    requests to other systems carry the traceparent unless the test parametrizes it with
    AGENTSTUDIO_TRACE_OUTBOUND's value, read as a dialer reads it."""
    service = f"agent-studio-test-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", jaeger.traces_endpoint)
    monkeypatch.setenv("OTEL_SERVICE_NAME", service)
    if hasattr(request, "param"):
        monkeypatch.setenv("AGENTSTUDIO_TRACE_OUTBOUND", request.param)
    assert tracing.setup("test", outbound=Settings().trace_outbound)
    try:
        yield service
    finally:
        tracing.shutdown()


class TargetUrl:
    """Says TARGET_URL, which voice_stack points at its HTTP target."""

    def url(self, path: str) -> str:
        return "TARGET_URL" + path


def seed_with_handoff() -> list[dict[str, Any]]:
    """The examples, for voice_stack to point at its model (MODEL_URL) and target (TARGET_URL)."""
    manifests = example_manifests("MODEL_URL", TargetUrl())  # type: ignore[arg-type]
    for doc in manifests:
        if doc["kind"] == "Workflow":
            doc["spec"] |= {"agents": ["care-agent"],
                            "handoffs": [{"from": "trial-followup-agent", "to": "care-agent",
                                          "when": "the user wants help activating"}]}
    return [*manifests, CARE]


async def callee(line: Line) -> None:
    """John answers, says what went wrong, is handed to the care agent and thanks it."""
    assert (await line.hear()).startswith("Hi John")  # type: ignore[union-attr]
    await line.say("Yes, sure.")
    await line.hear()
    await line.say("The OTP never arrived. I'd like help.")
    assert (await line.hear()) == "Hello John, I'm from the care team."
    await line.say("Thanks.")
    while await line.hear() is not None:
        pass


def tags(span: dict[str, Any]) -> dict[str, Any]:
    return {t["key"]: t["value"] for t in span["tags"]}


def parent(span: dict[str, Any]) -> str | None:
    return next((r["spanID"] for r in span["references"] if r["refType"] == "CHILD_OF"), None)


async def test_the_seed_call_is_one_trace_in_jaeger(nats_server: NatsServer, js: JetStreamContext, jaeger: Jaeger,
                                                    traced: str) -> None:
    receiver = Receiver(signing.new_secret())
    subscription = {"apiVersion": "agentstudio.io/v1alpha1", "kind": "WebhookSubscription",
                    "metadata": {"name": "crm"}, "spec": {"url": receiver.url, "events": ["call.completed"]}}
    async with voice_stack(nats_server.url, js, seed_with_handoff(), extra=[subscription]) as stack:
        stack.model.script([
            Reply("You started a free trial but didn't finish activating it. Did anything get in the way?"),
            Reply(tool_calls=[("capture_lead_response", CAPTURED), ("log_call", {"outcome": "needs_help"}),
                              ("handoff_to_care_agent", {"summary": "the OTP never arrived"})]),
            Reply("You're welcome, John. Goodbye!", tool_calls=[("end_call", {})]),
        ])
        t = stack.tenant
        async with stack.campaign(nats_server.url, receiver, "crm-webhook-secret", callee) as client:
            call_id = await stack.seed_call(client, receiver)
        api_key = t.auth("clevertap")["Authorization"].removeprefix("Bearer ")
    assert receiver.received[0]["event"]["data"]["end_reason"] == "end_call"
    assert tracing.flush()

    found = await asyncio.to_thread(jaeger.wait_for_traces, traced, 18, calls={call_id})
    assert len(found) == 1, [sorted({s["operationName"] for s in tr["spans"]}) for tr in found]
    spans = jaeger.trace(found[0]["traceID"])["spans"]
    by_id = {s["spanID"]: s for s in spans}
    names = sorted(s["operationName"] for s in spans)
    assert names == sorted([
        "POST /api/v1/webhooks/ingest", "calls publish", "dialer dispatch", "provider place",
        "conversation", *["conversation turn"] * 4, *["llm request"] * 3, *["tool call"] * 4, "handoff",
        "webhook deliver",
    ]), names

    def one(name: str) -> dict[str, Any]:
        [span] = [s for s in spans if s["operationName"] == name]
        return span

    def parent_name(span: dict[str, Any]) -> str | None:
        p = parent(span)
        return by_id[p]["operationName"] if p is not None else None

    ingest, publish, dispatch = one("POST /api/v1/webhooks/ingest"), one("calls publish"), one("dialer dispatch")
    place, conversation, webhook = one("provider place"), one("conversation"), one("webhook deliver")
    # The chain across processes' boundaries: HTTP → NATS headers → the record → NATS headers.
    assert parent(ingest) is None
    assert parent_name(publish) == "POST /api/v1/webhooks/ingest"
    assert parent_name(dispatch) == "calls publish"
    assert parent_name(place) == "dialer dispatch"
    assert parent_name(conversation) == "dialer dispatch"
    assert parent_name(webhook) == "dialer dispatch"
    turns = [s for s in spans if s["operationName"] == "conversation turn"]
    assert all(parent(s) == conversation["spanID"] for s in turns)
    assert sorted(tags(s)["trigger"] for s in turns) == ["callee", "callee", "callee", "start"]
    assert all(parent_name(s) == "conversation turn" for s in spans if s["operationName"] in ("llm request", "handoff"))
    assert all(parent_name(s) == "conversation turn" for s in spans if s["operationName"] == "tool call")
    assert sorted(tags(s)["tool"] for s in spans if s["operationName"] == "tool call") == [
        "capture_lead_response", "end_call", "handoff_to_care_agent", "log_call"]

    # What each says.
    assert tags(ingest)["http.response.status_code"] == 201 and tags(ingest)["http.route"] == "/api/v1/webhooks/ingest"
    assert tags(ingest)["span.kind"] == "server" and tags(place)["span.kind"] == "client"
    assert tags(publish)["span.kind"] == "producer" and tags(dispatch)["span.kind"] == "consumer"
    for span in (ingest, publish, dispatch, place, conversation, webhook):
        assert tags(span)["call_id"] == call_id, span["operationName"]
    for span in (ingest, publish, dispatch, place, conversation, webhook):
        assert tags(span)["tenant"] == t.name, span["operationName"]
    assert tags(ingest)["workflow"] == tags(conversation)["workflow"] == "free-trial-followup"
    assert tags(place)["phone"] == "*********3210" and tags(place)["provider"] == "simulated"
    assert tags(conversation)["agent"] == "trial-followup-agent" and tags(conversation)["end_reason"] == "end_call"
    handoff = one("handoff")
    assert (tags(handoff)["from_agent"], tags(handoff)["to_agent"]) == ("trial-followup-agent", "care-agent")
    llms = sorted((s for s in spans if s["operationName"] == "llm request"), key=lambda s: s["startTime"])
    assert [tags(s)["tool_calls"] for s in llms] == [0, 3, 1]
    assert all(tags(s)["gen_ai.request.model"] == "gpt-4o-mini" for s in llms)
    # Time to first token where words came, with its event; the tool-calls-only reply has neither.
    assert [tags(s).get("time_to_first_token_ms", -1) >= 0 for s in llms] == [True, False, True]
    assert [[f["value"] for e in s["logs"] for f in e["fields"] if f["key"] == "event"] for s in llms] == [
        ["first token"], [], ["first token"]]
    assert tags(webhook)["http.response.status_code"] == 204 and tags(webhook)["event_type"] == "call.completed"
    assert tags(webhook)["subscription"] == "crm"

    # Nothing that must not be seen: the number (in any spelling), the API key, the model's key, the
    # webhook's signing secret.
    text = yaml.safe_dump([s["tags"] + [f for e in s["logs"] for f in e["fields"]] for s in spans])
    for secret in ("919876543210", "9876543210", api_key, LLM_KEY, receiver.secret):
        assert secret not in text


@dataclass
class Outbound:
    """What the systems a call reached were sent: the headers of each request, in order."""

    call_id: str
    webhooks: list[dict[str, str]]  # the receiver's two attempts', each signature verified there
    tools: list[dict[str, str]]  # the api_call target's (log_call)
    model: list[dict[str, str]]  # the scripted model's


async def seed_call_outbound(nats_server: NatsServer, js: JetStreamContext) -> Outbound:
    """The seed call with a handoff, as in the trace above, its webhook answered at the second
    attempt: the headers its requests carried."""
    receiver = Receiver(signing.new_secret(), fail_first=1)
    subscription = {"apiVersion": "agentstudio.io/v1alpha1", "kind": "WebhookSubscription",
                    "metadata": {"name": "crm"}, "spec": {"url": receiver.url, "events": ["call.completed"]}}
    async with voice_stack(nats_server.url, js, seed_with_handoff(), extra=[subscription]) as stack:
        stack.model.script([
            Reply("You started a free trial but didn't finish activating it. Did anything get in the way?"),
            Reply(tool_calls=[("capture_lead_response", CAPTURED), ("log_call", {"outcome": "needs_help"}),
                              ("handoff_to_care_agent", {"summary": "the OTP never arrived"})]),
            Reply("You're welcome, John. Goodbye!", tool_calls=[("end_call", {})]),
        ])
        async with stack.campaign(nats_server.url, receiver, "crm-webhook-secret", callee) as client:
            call_id = await stack.seed_call(client, receiver)
    out = Outbound(call_id, receiver.headers, [r["headers"] for r in stack.target.seen], stack.model.headers)
    # Each system was reached: an absent header below is a request that did not carry it.
    assert (len(out.webhooks), len(out.tools), len(out.model)) == (2, 1, 3)
    return out


def traceparent_ids(headers: dict[str, str]) -> tuple[int, int]:
    """(trace id, parent span id) of a request's W3C traceparent, as numbers (Jaeger's query API
    spells ids in hex without leading zeros)."""
    version, trace_id, span_id, flags = headers["traceparent"].split("-")
    assert version == "00" and int(flags, 16) & 1 and len(trace_id) == 32 and len(span_id) == 16  # 1: sampled
    return int(trace_id, 16), int(span_id, 16)


async def test_outbound_requests_carry_the_traceparent_of_their_span(
        nats_server: NatsServer, js: JetStreamContext, jaeger: Jaeger, traced: str) -> None:
    """The webhook receiver (each attempt), the api_call tool's endpoint and the model each get a
    traceparent naming the call's trace and, as parent, the span of that very request, so their spans
    join the call's trace under it; the webhook's signature still verifies (at the receiver, with
    standardwebhooks)."""
    sent = await seed_call_outbound(nats_server, js)
    assert tracing.flush()
    [found] = await asyncio.to_thread(jaeger.wait_for_traces, traced, 19, calls={sent.call_id})
    trace_id, spans = int(found["traceID"], 16), jaeger.trace(found["traceID"])["spans"]

    def span_ids(name: str, **where: Any) -> list[int]:
        chosen = [s for s in sorted(spans, key=lambda s: s["startTime"]) if s["operationName"] == name
                  and all(tags(s).get(k) == v for k, v in where.items())]
        return [int(s["spanID"], 16) for s in chosen]

    assert [traceparent_ids(h) for h in sent.webhooks] == [(trace_id, i) for i in span_ids("webhook deliver")]
    assert [traceparent_ids(h) for h in sent.tools] == [(trace_id, i) for i in span_ids("tool call", tool="log_call")]
    assert [traceparent_ids(h) for h in sent.model] == [(trace_id, i) for i in span_ids("llm request")]


@pytest.mark.parametrize("traced", ["false"], indirect=True, ids=["outbound-off"])
async def test_the_switch_keeps_the_traceparent_from_other_systems(
        nats_server: NatsServer, js: JetStreamContext, jaeger: Jaeger, traced: str) -> None:
    """AGENTSTUDIO_TRACE_OUTBOUND=false: the call is traced all the same, its requests carry no trace."""
    sent = await seed_call_outbound(nats_server, js)
    assert tracing.flush()
    [found] = await asyncio.to_thread(jaeger.wait_for_traces, traced, 19, calls={sent.call_id})
    assert {"webhook deliver", "tool call", "llm request"} <= {s["operationName"] for s in found["spans"]}
    for headers in (*sent.webhooks, *sent.tools, *sent.model):
        assert not {"traceparent", "tracestate"} & set(headers), headers


async def test_untraced_requests_carry_no_trace(nats_server: NatsServer, js: JetStreamContext) -> None:
    assert not tracing.on()
    sent = await seed_call_outbound(nats_server, js)
    for headers in (*sent.webhooks, *sent.tools, *sent.model):
        assert not {"traceparent", "tracestate"} & set(headers), headers


def ingest_process_trace(nats_server: NatsServer, tmp_path: Path, env: dict[str, str]) -> str:
    """Queue the seed call through a real `agent-studio ingest` process started with `env`; its
    service name, for the query."""
    service = f"agent-studio-ingest-{uuid.uuid4().hex[:8]}"
    tenant = published_tenant(nats_server.url, example_resources())
    with running_ingest(nats_server.url, tenant, tmp_path / "ingest.log", OTEL_SERVICE_NAME=service, **env) as url:
        answer = httpx.post(f"{url}/api/v1/webhooks/ingest", json=SEED_BODY, headers=tenant.auth("clevertap"))
        assert answer.status_code == 201, answer.text
    return service  # stopped: what it had buffered is exported


def test_the_ingest_process_exports_only_when_asked(nats_server: NatsServer, jaeger: Jaeger, tmp_path: Path) -> None:
    endpoint = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": jaeger.traces_endpoint}
    on = ingest_process_trace(nats_server, tmp_path / "on", endpoint)
    [trace] = jaeger.wait_for_traces(on, 2)
    assert sorted(s["operationName"] for s in trace["spans"]) == ["POST /api/v1/webhooks/ingest", "calls publish"]
    # The same endpoint, but the exporter said none: nothing arrives.
    off = ingest_process_trace(nats_server, tmp_path / "off", {**endpoint, "OTEL_TRACES_EXPORTER": "none"})
    assert jaeger.wait_for_traces(off, 1, timeout=3) == []
    assert off not in jaeger.services() and on in jaeger.services()


@pytest.mark.parametrize(("env", "on"), [
    ({}, False),
    ({"OTEL_SERVICE_NAME": "x", "OTEL_TRACES_SAMPLER": "always_on"}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:9/v1/traces"}, True),
    ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
    ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}, False),
    ({"OTEL_TRACES_EXPORTER": "console"}, False),
    ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, False),
])
def test_tracing_is_on_only_when_the_otel_variables_ask(env: dict[str, str], on: bool) -> None:
    assert tracing.enabled(env) is on


@pytest.mark.parametrize(("env", "on"), [({"OTEL_SERVICE_NAME": "x"}, False),
                                         ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}, True)])
def test_the_roles_import_the_sdk_only_when_tracing_is_on(env: dict[str, str], on: bool) -> None:
    """A fresh interpreter with the roles' modules, as a role starts: the SDK and the exporter are
    loaded only when tracing is on."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    script = (
        "import sys\n"
        "import agentstudio.ingest.app, agentstudio.dialer.main, agentstudio.conversation.runtime\n"
        "from agentstudio import tracing\n"
        "print(tracing.setup('ingest'), tracing.on(),\n"
        "      any(m.startswith(('opentelemetry.sdk', 'opentelemetry.exporter')) for m in sys.modules))\n"
        "tracing.shutdown()\n"
    )
    out = subprocess.run([sys.executable, "-c", script], env={**clean, **env}, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(on)] * 3


async def test_a_twilio_placement_is_a_client_span_of_the_call(traced: str, live, nats_server: NatsServer,  # type: ignore[no-untyped-def]
                                                                 twilio_mock: TwilioMock, jaeger: Jaeger) -> None:
    """Through the official Twilio SDK against Twilio's spec (Prism): one call placed, one refused;
    each a `provider place` span under its ingest request, the refusal an error with Twilio's code,
    and neither holding the auth token or the number."""
    client, t = live
    async with dialers(nats_server.url, **twilio_settings(twilio_mock)):
        placed = await queue_call(client, t, key="live")
        await until_status(client, t, placed, "dialing")
    async with dialers(nats_server.url, **twilio_settings(twilio_mock, public_base_url="https://not a url")):
        refused = await queue_call(client, t, key="live")
        record = await until_status(client, t, refused, "failed")
    assert tracing.flush()

    found = await asyncio.to_thread(jaeger.wait_for_traces, traced, 8, calls={placed, refused})
    by_call = {tags(s)["call_id"]: tr for tr in found for s in tr["spans"] if s["operationName"] == "provider place"}
    for call_id in (placed, refused):
        names = sorted(s["operationName"] for s in by_call[call_id]["spans"])
        assert names == ["POST /api/v1/webhooks/ingest", "calls publish", "dialer dispatch", "provider place"], names
    [ok] = [s for s in by_call[placed]["spans"] if s["operationName"] == "provider place"]
    [bad] = [s for s in by_call[refused]["spans"] if s["operationName"] == "provider place"]
    assert tags(ok)["provider"] == "twilio" and tags(ok)["provider_call_id"].startswith("CA")
    assert tags(ok).get("otel.status_code") != "ERROR"
    assert tags(bad)["error.type"] == record["error"]["code"] and tags(bad)["otel.status_code"] == "ERROR"
    text = yaml.safe_dump([s["tags"] + [f for e in s["logs"] for f in e["fields"]] for tr in found for s in tr["spans"]])
    for secret in (twilio_mock.auth_token, "14155552671", *t.keys.values()):
        assert secret not in text


def test_an_error_is_recorded_by_its_type_never_its_message(traced: str, jaeger: Jaeger) -> None:
    """A provider's or a model's error text may quote the number or the callee's words: a span keeps
    only the exception's type."""
    with pytest.raises(ValueError), tracing.span("failing", attributes={"call_id": "c-1"}):
        raise ValueError("The 'To' number +919876543210 is not reachable")
    assert tracing.flush()
    [found] = jaeger.wait_for_traces(traced, 1)
    [span] = found["spans"]
    assert tags(span)["error.type"] == "ValueError" and tags(span)["otel.status_code"] == "ERROR"
    assert "9876543210" not in yaml.safe_dump([span["tags"], span["logs"]])


async def test_a_cancelled_span_names_the_cancel_without_failing(traced: str, jaeger: Jaeger) -> None:
    """A barge-in cancels the model request under way: its span says it was cut short, by type, and
    is not an error (nothing failed)."""
    started = asyncio.Event()

    async def request() -> None:
        with tracing.span("llm request", attributes={"call_id": "c-2"}):
            started.set()
            await asyncio.sleep(60)

    task = asyncio.create_task(request())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert tracing.flush()
    [found] = jaeger.wait_for_traces(traced, 1)
    [span] = found["spans"]
    assert tags(span)["error.type"] == "CancelledError" and "otel.status_code" not in tags(span)
