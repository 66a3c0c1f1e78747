"""The do-not-call list on a real nats-server: the API (add, check, remove, CSV import, scopes), ingest
refusing a listed number, the dialer not dialing a number listed after its call was queued, and the
agent's opt_out tool listing the callee during a relay conversation."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from nats.js import JetStreamContext

from agentstudio import bus
from agentstudio.do_not_call import DoNotCall
from agentstudio.natsserver import NatsServer
from conftest import SEED_BODY, Tenant, docs, ingest_client, wait_for_bundle
from scripted_model import Reply
from test_dialer import dialers, events_of, queue_call, until_status
from voice_stack import TwilioRelay, example_manifests, voice_stack

MANIFESTS = """
apiVersion: agentstudio.io/v1alpha1
kind: Agent
metadata: {name: a}
spec: {prompt: "Hello"}
---
apiVersion: agentstudio.io/v1alpha1
kind: ApiKey
metadata: {name: manager}
spec: {scopes: ["dnc:manage"], rateLimitPerMinute: 100000}
---
apiVersion: agentstudio.io/v1alpha1
kind: ApiKey
metadata: {name: reader}
spec: {scopes: ["calls:read"], rateLimitPerMinute: 100000}
---
apiVersion: agentstudio.io/v1alpha1
kind: ApiKey
metadata: {name: creator}
spec: {scopes: ["calls:create"], rateLimitPerMinute: 100000}
---
apiVersion: agentstudio.io/v1alpha1
kind: ApiKey
metadata: {name: test}
spec: {scopes: ["calls:create", "calls:read", "webhooks:manage", "dnc:manage"], mode: test, rateLimitPerMinute: 100000}
"""
DNC = "/api/v1/do-not-call"


async def _tenant(js: JetStreamContext) -> Tenant:
    t = Tenant(f"t-{uuid.uuid4().hex[:10]}", js, docs(MANIFESTS))
    await t.publish()
    return t


@pytest.fixture
async def tenant(js: JetStreamContext) -> Tenant:
    return await _tenant(js)


@pytest.fixture
async def api(nats_server: NatsServer, tenant: Tenant) -> AsyncIterator[httpx.AsyncClient]:
    async with ingest_client(nats_server.url, dnc_import_max_bytes=4096) as (client, svc):
        assert tenant.bundle is not None
        await wait_for_bundle(svc, tenant.name, tenant.bundle.version)
        yield client


async def test_a_number_is_added_checked_and_removed_with_the_right_scopes(
    api: httpx.AsyncClient, tenant: Tenant, nats_server: NatsServer, js: JetStreamContext
) -> None:
    t = tenant
    added = await api.post(DNC, headers=t.auth("manager"),
                           json={"phone_number": "+1 (415) 555-2671", "reason": "asked by email"})
    assert added.status_code == 201, added.text
    listing = added.json()
    assert listing["phone_number"] == "+14155552671" and listing["source"] == "api"
    assert listing["reason"] == "asked by email" and listing["added_at"]
    again = await api.post(DNC, headers=t.auth("manager"), json={"phone_number": "+14155552671"})
    assert again.status_code == 200 and again.json() == listing  # the first listing is kept

    # A check is allowed with dnc:manage or calls:read; a change only with dnc:manage.
    for key in ("manager", "reader"):
        seen = await api.get(f"{DNC}/+14155552671", headers=t.auth(key))
        assert seen.status_code == 200 and seen.json() == listing
    assert (await api.get(f"{DNC}/%2B14155552671", headers=t.auth("reader"))).status_code == 200
    assert (await api.get(f"{DNC}/+14155552671", headers=t.auth("creator"))).status_code == 403
    for refused in (api.post(DNC, headers=t.auth("reader"), json={"phone_number": "+14155552672"}),
                    api.delete(f"{DNC}/+14155552671", headers=t.auth("reader")),
                    api.post(f"{DNC}/import", headers={**t.auth("reader"), "Content-Type": "text/csv"},
                             content="+14155552672\n")):
        response = await refused
        assert response.status_code == 403 and "dnc:manage" in response.json()["error"]["message"]
    assert (await api.get(f"{DNC}/+14155552672", headers=t.auth("reader"))).status_code == 404

    # Another tenant's list is its own.
    other = await _tenant(js)
    async with ingest_client(nats_server.url) as (client, svc):
        assert other.bundle is not None
        await wait_for_bundle(svc, other.name, other.bundle.version)
        assert (await client.get(f"{DNC}/+14155552671", headers=other.auth("manager"))).status_code == 404

    # Bad numbers are a 400 naming the field.
    bad = await api.post(DNC, headers=t.auth("manager"), json={"phone_number": "$Phone"})
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "phone_number"
    assert bad.json()["error"]["code"] == "invalid_phone_number"
    bad = await api.get(f"{DNC}/4155552671", headers=t.auth("manager"))
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "phone_number"

    removed = await api.delete(f"{DNC}/+14155552671", headers=t.auth("manager"))
    assert removed.status_code == 204
    assert (await api.get(f"{DNC}/+14155552671", headers=t.auth("manager"))).status_code == 404
    assert (await api.delete(f"{DNC}/+14155552671", headers=t.auth("manager"))).status_code == 404
    # Listed again after a removal: a new listing.
    assert (await api.post(DNC, headers=t.auth("manager"), json={"phone_number": "+14155552671"})).status_code == 201


async def test_a_csv_import_lists_the_valid_numbers_and_names_the_bad_lines(
    api: httpx.AsyncClient, tenant: Tenant
) -> None:
    t = tenant
    csv_headers = {**t.auth("manager"), "Content-Type": "text/csv"}
    body = (
        "\ufeffname,phone_number,plan\r\n"  # a spreadsheet's BOM and CRLF
        "Ann,+14155552671,premium\r\n"
        "Ravi,+91 98765 43210,basic\r\n"
        "\r\n"
        "Bob,not a number,basic\r\n"
        "Eve,,basic\r\n"
        "Ann again,+14155552671,premium\r\n"
        "Max,+33612345678"  # no final newline
    )
    report = await api.post(f"{DNC}/import", headers=csv_headers, content=body)
    assert report.status_code == 200, report.text
    got = report.json()
    assert (got["added"], got["already_listed"], got["invalid"]) == (3, 1, 2)
    assert [(e["line"], e["message"].split(":")[0]) for e in got["errors"]] == [
        (5, "invalid phone number"), (6, "no phone_number on this line")]
    for number in ("+14155552671", "+919876543210", "+33612345678"):
        seen = await api.get(f"{DNC}/{number}", headers=t.auth("manager"))
        assert seen.status_code == 200 and seen.json()["source"] == "import"

    # One number per line, without a header; importing it twice changes nothing the second time.
    plain = "+447911123456\n+61412345678\n+14155552671\n12345\n+1415,extra\n"
    first = (await api.post(f"{DNC}/import", headers=csv_headers, content=plain)).json()
    assert (first["added"], first["already_listed"], first["invalid"]) == (2, 1, 2)
    assert [e["line"] for e in first["errors"]] == [4, 5]
    second = (await api.post(f"{DNC}/import", headers=csv_headers, content=plain)).json()
    assert (second["added"], second["already_listed"], second["invalid"]) == (0, 3, 2)

    # The body is bounded (4096 bytes here) also when it is streamed without a Content-Length.
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(400):
            yield b"+14155550100\n"

    too_big = await api.post(f"{DNC}/import", headers=csv_headers, content=chunks())
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "payload_too_large"
    wrong_type = await api.post(f"{DNC}/import", headers=t.auth("manager"), json=["+14155552671"])
    assert wrong_type.status_code == 415


async def test_ingest_refuses_a_listed_number_with_a_final_409(api: httpx.AsyncClient, tenant: Tenant) -> None:
    t = tenant
    assert (await api.post(DNC, headers=t.auth("manager"), json={"phone_number": "+14155552671"})).status_code == 201
    refused = await api.post("/api/v1/webhooks/ingest", headers=t.auth("test"),
                             json={"agent_slug": "a", "phone_number": "+1 415 555 2671"})
    assert refused.status_code == 409
    assert refused.json()["error"] == {"code": "do_not_call", "field": "phone_number",
                                       "message": "phone_number is on the do-not-call list; no call was queued"}
    page = (await api.get("/api/v1/calls", headers=t.auth("test"))).json()
    assert page["data"] == []  # nothing was queued
    # Another number of the same tenant is queued as before.
    await queue_call(api, t, phone_number="+14155552672")


async def test_a_number_listed_after_its_call_was_queued_is_never_dialed(
    api: httpx.AsyncClient, tenant: Tenant, nats_server: NatsServer, js: JetStreamContext
) -> None:
    t = tenant
    listed_later = await queue_call(api, t, phone_number="+14155552673")
    other = await queue_call(api, t, phone_number="+14155552674")
    assert (await api.post(DNC, headers=t.auth("manager"), json={"phone_number": "+14155552673"})).status_code == 201
    async with dialers(nats_server.url) as (dialer,):
        record = await until_status(api, t, listed_later, "canceled")
        await until_status(api, t, other, "completed")
    placed: list[str] = dialer.simulated.placed  # type: ignore[attr-defined]
    assert listed_later not in placed and other in placed
    assert record["error"]["code"] == "do_not_call" and record["end_reason"] == "do_not_call"
    assert [e["status"] for e in record["events"]] == ["pending", "canceled"]
    [event] = await events_of(js, t, listed_later)
    assert event["type"] == "call.canceled" and event["data"]["end_reason"] == "do_not_call"


class _Placeholders:
    """Stands in for the HTTP target: voice_stack puts its real URL where TARGET_URL is."""

    def url(self, path: str) -> str:
        return "TARGET_URL" + path


OPT_OUT_TOOL: dict[str, Any] = {
    "name": "opt_out",
    "description": "The callee asks never to be called again.",
    "parameters": {"type": "object", "properties": {"reason": {"type": "string"}}},
    "action": {"type": "opt_out"},
}


async def test_the_opt_out_tool_lists_the_callee_and_the_call_ends_politely(
    nats_server: NatsServer, js: JetStreamContext
) -> None:
    manifests = example_manifests("MODEL_URL", _Placeholders())  # type: ignore[arg-type]
    for doc in manifests:
        if doc["kind"] == "Agent":
            doc["spec"]["tools"].append(OPT_OUT_TOOL)
    async with voice_stack(nats_server.url, js, manifests) as stack:
        stack.model.script([
            Reply(tool_calls=[("opt_out", {"reason": "asked not to be called again"})]),
            Reply("Understood, we won't call you again. Goodbye!", tool_calls=[("end_call", {})]),
        ])
        call, sid = await stack.answered_call()
        async with TwilioRelay.connect(stack.relay, call, sid) as twilio:
            await twilio.utterance()
            await twilio.prompt("Please don't call me again.")
            assert await twilio.utterance() == "Understood, we won't call you again. Goodbye!"
            assert await twilio.end() == {"reason": "end_call"}
        record = await stack.closed_record(call.call_id)
        listing = await DoNotCall(await bus.dnc_bucket(stack.js)).get(stack.tenant.name, SEED_BODY["phone_number"])
    assert listing is not None
    assert listing.source == "opt_out" and listing.reason == "asked not to be called again"
    [tool] = [t for t in record.transcript if t["kind"] == "tool" and t["tool"] == "opt_out"]
    assert "error" not in tool and "do-not-call" in tool["result"]
    assert "do-not-call list" in stack.model.requests[1]["messages"][-1]["content"]  # the model was told
    assert record.end_reason == "end_call"
