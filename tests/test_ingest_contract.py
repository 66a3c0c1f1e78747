"""The ingest contract, status code by status code, against a real nats-server."""

from __future__ import annotations

import copy
import json
import uuid
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from nats.js import JetStreamContext

from agentstudio import bus
from agentstudio.calls import CallRequest
from agentstudio.natsserver import NatsServer
from conftest import SEED_BODY, Tenant, docs, example_resources, ingest_client, wait_for_bundle


def body(**changes: object) -> dict[str, object]:
    out = copy.deepcopy(SEED_BODY)
    for key, value in changes.items():
        if value is ...:
            out.pop(key, None)
        else:
            out[key] = value
    return out


async def post(client: httpx.AsyncClient, tenant: Tenant, payload: object, key: str = "clevertap",
               **headers: str) -> httpx.Response:
    return await client.post("/api/v1/webhooks/ingest", json=payload, headers={**tenant.auth(key), **headers})


def assert_error(resp: httpx.Response, status: int, field: str | None) -> dict[str, str]:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["code"] and error["message"]
    assert error.get("field") == field, error
    return error


async def queued(js: JetStreamContext, tenant: Tenant, call_id: str) -> CallRequest:
    msg = await js.get_last_msg(bus.CALLS_STREAM, bus.dispatch_subject(tenant.name, call_id))
    return CallRequest.model_validate_json(msg.data)


# --- 201 -----------------------------------------------------------------------------------


async def test_seed_request_is_queued_durably(client: httpx.AsyncClient, tenant: Tenant, js: JetStreamContext) -> None:
    resp = await post(client, tenant, SEED_BODY)
    assert resp.status_code == 201
    assert set(resp.json()) == {"call_id", "status"} and resp.json()["status"] == "pending"
    call_id = resp.json()["call_id"]
    assert str(uuid.UUID(call_id)) == call_id
    call = await queued(js, tenant, call_id)
    assert call.workflow_slug == "free-trial-followup" and call.agent_slug is None
    assert call.phone_number == "+919876543210"
    assert call.user_context == SEED_BODY["user_context"] and call.metadata == SEED_BODY["metadata"]
    assert call.user_id == "user-123" and call.api_key == "clevertap" and call.test is False


async def test_agent_slug_call(client: httpx.AsyncClient, tenant: Tenant, js: JetStreamContext) -> None:
    resp = await post(client, tenant, {"agent_slug": "trial-followup-agent", "phone_number": "+919876543210"})
    assert resp.status_code == 201
    call = await queued(js, tenant, resp.json()["call_id"])
    assert call.agent_slug == "trial-followup-agent" and call.workflow_slug is None
    assert call.user_context == {} and call.metadata == {} and call.user_id is None


async def test_phone_number_separators_are_normalised(client: httpx.AsyncClient, tenant: Tenant, js: JetStreamContext) -> None:
    resp = await post(client, tenant, body(phone_number=" +91 (98765) 432-10 "))
    assert resp.status_code == 201
    assert (await queued(js, tenant, resp.json()["call_id"])).phone_number == "+919876543210"


async def test_empty_optional_strings_count_as_absent(client: httpx.AsyncClient, tenant: Tenant, js: JetStreamContext) -> None:
    resp = await post(client, tenant, body(agent_slug="", user_id="", user_context="", metadata=""))
    assert resp.status_code == 201, resp.text
    call = await queued(js, tenant, resp.json()["call_id"])
    assert call.workflow_slug == "free-trial-followup" and call.agent_slug is None
    assert call.user_id is None and call.user_context == {} and call.metadata == {}


async def test_numeric_user_id_is_kept_as_text(client: httpx.AsyncClient, tenant: Tenant, js: JetStreamContext) -> None:
    resp = await post(client, tenant, body(user_id=12345))
    assert resp.status_code == 201
    assert (await queued(js, tenant, resp.json()["call_id"])).user_id == "12345"


async def test_test_key_marks_the_call_test(client: httpx.AsyncClient, tenant: Tenant, js: JetStreamContext) -> None:
    resp = await post(client, tenant, SEED_BODY, key="sandbox")
    assert resp.status_code == 201
    assert (await queued(js, tenant, resp.json()["call_id"])).test is True


async def test_charset_parameter_is_still_json(client: httpx.AsyncClient, tenant: Tenant) -> None:
    resp = await client.post(
        "/api/v1/webhooks/ingest",
        content=json.dumps(SEED_BODY).encode(),
        headers={**tenant.auth("clevertap"), "Content-Type": "application/json; charset=utf-8"},
    )
    assert resp.status_code == 201


# --- 400 -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        (body(phone_number=...), "phone_number"),
        (body(phone_number=""), "phone_number"),
        (body(phone_number=None), "phone_number"),
        (body(phone_number="$Phone"), "phone_number"),
        (body(phone_number="919876543210"), "phone_number"),
        (body(phone_number="+91 98765"), "phone_number"),
        (body(phone_number="+1-800-FLOWERS"), "phone_number"),
        (body(phone_number=919876543210), "phone_number"),
        (body(workflow_slug=...), "workflow_slug"),
        (body(workflow_slug=""), "workflow_slug"),
        (body(user_context=["John"]), "user_context"),
        (body(user_context="John"), "user_context"),
        (body(metadata=42), "metadata"),
        (body(user_id={"id": 1}), "user_id"),
        (body(campaign="x"), "campaign"),
        (body(user_context={"name": 42}), "user_context.name"),
    ],
)
async def test_bad_fields_are_400_naming_the_field(
    client: httpx.AsyncClient, tenant: Tenant, payload: object, field: str
) -> None:
    assert_error(await post(client, tenant, payload), 400, field)


async def test_invalid_phone_message_says_why(client: httpx.AsyncClient, tenant: Tenant) -> None:
    error = assert_error(await post(client, tenant, body(phone_number="98765 43210")), 400, "phone_number")
    assert "E.164" in error["message"]


@pytest.mark.parametrize("raw", [b"{not json", b"", b'"a string"', b"[1, 2]", b"null"])
async def test_body_not_a_json_object_is_400(client: httpx.AsyncClient, tenant: Tenant, raw: bytes) -> None:
    resp = await client.post(
        "/api/v1/webhooks/ingest", content=raw, headers={**tenant.auth("clevertap"), "Content-Type": "application/json"}
    )
    assert_error(resp, 400, None)


async def test_user_context_schema_is_enforced(js: JetStreamContext, nats_server) -> None:  # type: ignore[no-untyped-def]
    t = Tenant(f"t-{uuid.uuid4().hex[:10]}", js, docs(SCHEMA_MANIFESTS))
    bundle = await t.publish()
    async with ingest_client(nats_server.url) as (client, svc):
        await wait_for_bundle(svc, t.name, bundle.version)
        ok = await post(client, t, {"workflow_slug": "wf", "phone_number": "+14155552671", "user_context": {"name": "A", "age": 3}}, key="k")
        assert ok.status_code == 201, ok.text
        missing = await post(client, t, {"workflow_slug": "wf", "phone_number": "+14155552671"}, key="k")
        assert_error(missing, 400, "user_context.name")
        wrong = await post(client, t, {"workflow_slug": "wf", "phone_number": "+14155552671", "user_context": {"name": "A", "age": "old"}}, key="k")
        assert_error(wrong, 400, "user_context.age")


SCHEMA_MANIFESTS = """
apiVersion: agentstudio.io/v1alpha1
kind: Agent
metadata: {name: a}
spec: {prompt: "Hi {{user.name}}"}
---
apiVersion: agentstudio.io/v1alpha1
kind: Workflow
metadata: {name: wf}
spec:
  entryAgent: a
  userContextSchema:
    type: object
    required: [name]
    properties:
      name: {type: string, minLength: 1}
      age: {type: integer}
---
apiVersion: agentstudio.io/v1alpha1
kind: ApiKey
metadata: {name: k}
spec: {scopes: ["calls:create"]}
"""


# --- 401 / 403 -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Basic dXNlcjpwYXNz", "Bearer", "Bearer   ", "Bearer as_live_short", "Token as_live_" + "a" * 32,
     "Bearer as_live_" + "a" * 32],
)
async def test_missing_malformed_or_unknown_key_is_401(client: httpx.AsyncClient, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    resp = await client.post("/api/v1/webhooks/ingest", json=SEED_BODY, headers=headers)
    assert_error(resp, 401, "Authorization")
    assert resp.headers["WWW-Authenticate"] == "Bearer"


async def test_scheme_is_case_insensitive(client: httpx.AsyncClient, tenant: Tenant) -> None:
    resp = await client.post(
        "/api/v1/webhooks/ingest", json=SEED_BODY, headers={"Authorization": f"bEaReR {tenant.keys['clevertap']}"}
    )
    assert resp.status_code == 201


async def test_disabled_expired_and_deleted_keys_are_401(tenant: Tenant, nats_server) -> None:  # type: ignore[no-untyped-def]
    async with ingest_client(nats_server.url) as (client, svc):
        past = (datetime.now(timezone.utc) - timedelta(minutes=1)).isoformat()
        changed = [i for i in tenant.resources if i.resource.name not in ("clevertap", "moengage", "braze")]
        changed += docs(f"""
apiVersion: agentstudio.io/v1alpha1
kind: ApiKey
metadata: {{name: clevertap}}
spec: {{scopes: ["calls:create"], disabled: true}}
---
apiVersion: agentstudio.io/v1alpha1
kind: ApiKey
metadata: {{name: moengage}}
spec: {{scopes: ["calls:create"], expiresAt: "{past}"}}
""")
        bundle = await tenant.publish(changed)  # braze is deleted
        await wait_for_bundle(svc, tenant.name, bundle.version)
        for key, why in (("clevertap", "disabled"), ("moengage", "expired"), ("braze", "unknown")):
            error = assert_error(await post(client, tenant, SEED_BODY, key=key), 401, "Authorization")
            assert why in error["message"]
        assert (await post(client, tenant, SEED_BODY, key="webengage")).status_code == 200  # its platform's success


async def test_key_without_scope_is_403(client: httpx.AsyncClient, tenant: Tenant) -> None:
    assert_error(await post(client, tenant, SEED_BODY, key="analytics-readonly"), 403, "Authorization")
    resp = await client.get(f"/api/v1/calls/{uuid.uuid4()}", headers=tenant.auth("clevertap"))
    assert_error(resp, 403, "Authorization")


# --- 404 / 422 / 413 / 415 -----------------------------------------------------------------


async def test_unknown_workflow_or_agent_is_404(client: httpx.AsyncClient, tenant: Tenant) -> None:
    assert_error(await post(client, tenant, body(workflow_slug="nope")), 404, "workflow_slug")
    assert_error(
        await post(client, tenant, {"agent_slug": "nope", "phone_number": "+919876543210"}), 404, "agent_slug"
    )


async def test_other_tenants_workflow_is_404(js: JetStreamContext, nats_server, tenant: Tenant) -> None:  # type: ignore[no-untyped-def]
    other = Tenant(f"t-{uuid.uuid4().hex[:10]}", js, docs(SCHEMA_MANIFESTS))
    bundle = await other.publish()
    async with ingest_client(nats_server.url) as (client, svc):
        await wait_for_bundle(svc, other.name, bundle.version)
        await wait_for_bundle(svc, tenant.name, 1)
        assert_error(await post(client, other, body(), key="k"), 404, "workflow_slug")
        assert (await post(client, tenant, body(workflow_slug="free-trial-followup"))).status_code == 201
        assert_error(await post(client, tenant, body(workflow_slug="wf")), 404, "workflow_slug")


async def test_both_slugs_is_422(client: httpx.AsyncClient, tenant: Tenant) -> None:
    error = assert_error(await post(client, tenant, body(agent_slug="trial-followup-agent")), 422, "workflow_slug")
    assert "not both" in error["message"]


async def test_body_over_64_kib_is_413(client: httpx.AsyncClient, tenant: Tenant) -> None:
    resp = await post(client, tenant, body(metadata={"pad": "x" * (64 * 1024)}))
    assert_error(resp, 413, None)


async def test_body_over_64_kib_without_content_length_is_413(client: httpx.AsyncClient, tenant: Tenant) -> None:
    async def chunks():  # type: ignore[no-untyped-def]
        for _ in range(70):
            yield b" " * 1024

    resp = await client.post(
        "/api/v1/webhooks/ingest", content=chunks(), headers={**tenant.auth("clevertap"), "Content-Type": "application/json"}
    )
    assert_error(resp, 413, None)


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
async def test_non_json_content_type_is_415(client: httpx.AsyncClient, tenant: Tenant, content_type: str | None) -> None:
    headers = tenant.auth("clevertap")
    if content_type:
        headers["Content-Type"] = content_type
    resp = await client.post("/api/v1/webhooks/ingest", content=json.dumps(SEED_BODY).encode(), headers=headers)
    assert_error(resp, 415, "Content-Type")


async def test_overlong_idempotency_key_is_400(client: httpx.AsyncClient, tenant: Tenant) -> None:
    resp = await post(client, tenant, SEED_BODY, **{"Idempotency-Key": "k" * 300})
    assert_error(resp, 400, "Idempotency-Key")


# --- 429 -----------------------------------------------------------------------------------


async def test_over_the_limit_is_429_with_retry_after(js: JetStreamContext, nats_server) -> None:  # type: ignore[no-untyped-def]
    t = Tenant(f"t-{uuid.uuid4().hex[:10]}", js, docs(SCHEMA_MANIFESTS.replace('scopes: ["calls:create"]', 'scopes: ["calls:create"], rateLimitPerMinute: 5')))
    bundle = await t.publish()
    async with ingest_client(nats_server.url) as (client, svc):
        await wait_for_bundle(svc, t.name, bundle.version)
        payload = {"workflow_slug": "wf", "phone_number": "+14155552671", "user_context": {"name": "A"}}
        codes = [(await post(client, t, payload, key="k")).status_code for _ in range(5)]
        assert codes == [201] * 5
        resp = await post(client, t, payload, key="k")
        assert_error(resp, 429, None)
        assert 1 <= int(resp.headers["Retry-After"]) <= 60


# --- reading calls, health, metrics, OpenAPI ---------------------------------------------


async def test_get_call_returns_the_record(client: httpx.AsyncClient, tenant: Tenant) -> None:
    call_id = (await post(client, tenant, SEED_BODY, key="sandbox")).json()["call_id"]
    resp = await client.get(f"/api/v1/calls/{call_id}", headers=tenant.auth("sandbox"))
    assert resp.status_code == 200, resp.text
    record = resp.json()
    assert record["call_id"] == call_id and record["status"] == "pending" and record["test"] is True
    assert record["workflow_slug"] == "free-trial-followup" and record["user_id"] == "user-123"
    assert record["user_context"] == SEED_BODY["user_context"] and record["metadata"] == SEED_BODY["metadata"]
    assert datetime.fromisoformat(record["created_at"]) <= datetime.now(timezone.utc)
    assert_error(await client.get(f"/api/v1/calls/{uuid.uuid4()}", headers=tenant.auth("sandbox")), 404, "call_id")
    assert_error(await client.get("/api/v1/calls/calls.*.dispatch.>", headers=tenant.auth("sandbox")), 404, "call_id")


async def test_calls_of_another_tenant_are_404(client: httpx.AsyncClient, tenant: Tenant, js: JetStreamContext, nats_server) -> None:  # type: ignore[no-untyped-def]
    call_id = (await post(client, tenant, SEED_BODY)).json()["call_id"]
    other = Tenant(f"t-{uuid.uuid4().hex[:10]}", js, example_resources())
    bundle = await other.publish()
    async with ingest_client(nats_server.url) as (c2, svc):
        await wait_for_bundle(svc, other.name, bundle.version)
        resp = await c2.get(f"/api/v1/calls/{call_id}", headers=other.auth("analytics-readonly"))
        assert_error(resp, 404, "call_id")


async def test_readyz_needs_a_bundle_and_nats(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with NatsServer(tmp_path / "nats") as server:
        async with ingest_client(server.url) as (client, svc):
            assert (await client.get("/readyz")).status_code == 503  # no bundle yet
            nc = await bus.connect(server.url, "test")
            t = Tenant("solo", nc.jetstream(), example_resources())
            bundle = await t.publish()
            await wait_for_bundle(svc, t.name, bundle.version)
            assert (await client.get("/readyz")).status_code == 200
            await nc.close()
        server.stop()


async def test_health_ready_and_metrics(client: httpx.AsyncClient, tenant: Tenant) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["nats"] is True
    await post(client, tenant, SEED_BODY)
    await post(client, tenant, body(workflow_slug="nope"))
    text = (await client.get("/metrics")).text
    assert "agentstudio_ingest_accepted_total 1.0" in text
    assert 'agentstudio_ingest_rejected_total{code="404"} 1.0' in text
    assert "agentstudio_ingest_latency_seconds_count 2.0" in text


async def test_openapi_documents_every_route_and_error(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    ingest = spec["paths"]["/api/v1/webhooks/ingest"]["post"]
    assert set(ingest["responses"]) == {"200", "201", "400", "401", "403", "404", "408", "409", "413", "415", "422", "429", "503"}
    assert "do_not_call" in ingest["responses"]["409"]["description"]
    # a key whose successStatus is 200 (WebEngage's) gets the same body
    assert ingest["responses"]["200"]["content"] == ingest["responses"]["201"]["content"]
    assert "successStatus" in ingest["responses"]["200"]["description"]
    assert "phone_number" in ingest["requestBody"]["content"]["application/json"]["schema"]["required"]
    assert {"/api/v1/calls/{call_id}", "/healthz", "/readyz", "/metrics"} <= set(spec["paths"])
    assert "404" in spec["paths"]["/api/v1/calls/{call_id}"]["get"]["responses"]
    assert any(p["name"] == "Idempotency-Key" for p in ingest["parameters"])
    dnc = spec["paths"]["/api/v1/do-not-call/{phone_number}"]
    assert set(dnc["get"]["responses"]) >= {"200", "400", "403", "404"} and "204" in dnc["delete"]["responses"]
    assert "text/csv" in spec["paths"]["/api/v1/do-not-call/import"]["post"]["requestBody"]["content"]
