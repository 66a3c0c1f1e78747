"""Each platform's body template, rendered as that platform renders it, posted to ingest."""

from __future__ import annotations

import json

import httpx
import pytest
import yaml
from nats.js import JetStreamContext

import platforms
from agentstudio import bus, crdgen, keys
from agentstudio.bundle import KeyMaterial, compile_bundle
from agentstudio.calls import CallRequest
from agentstudio.natsserver import NatsServer
from conftest import SEED_BODY, Tenant, docs, example_resources, ingest_client, wait_for_bundle


async def send(client: httpx.AsyncClient, tenant: Tenant, key: str, raw: str) -> httpx.Response:
    return await client.post(
        "/api/v1/webhooks/ingest",
        content=raw.encode(),
        headers={**tenant.auth(key), "Content-Type": "application/json"},
    )


async def queued(js: JetStreamContext, tenant: Tenant, resp: httpx.Response, status: int = 201) -> CallRequest:
    assert resp.status_code == status, resp.text
    msg = await js.get_last_msg(bus.CALLS_STREAM, bus.dispatch_subject(tenant.name, resp.json()["call_id"]))
    return CallRequest.model_validate_json(msg.data)


CLEVERTAP_PROFILE = {
    "Phone": "+919876543210",
    "Identity": "ct-42",
    "Name": "Asha",
    "trial_start_date": "2026-02-01",
    "selected_plan": "premium",
    "user_segment": "high_value",
}


async def test_clevertap(client: httpx.AsyncClient, tenant: Tenant, js: JetStreamContext) -> None:
    call = await queued(js, tenant, await send(client, tenant, "clevertap", platforms.clevertap(CLEVERTAP_PROFILE)))
    assert call.phone_number == "+919876543210" and call.user_id == "ct-42"
    assert call.user_context == {"name": "Asha", "trial_started_at": "2026-02-01", "plan_type": "premium"}
    assert call.metadata == {"campaign_id": "trial_recovery_v2", "source": "clevertap", "segment": "high_value"}


async def test_clevertap_profile_without_phone_is_400_naming_it(client: httpx.AsyncClient, tenant: Tenant) -> None:
    profile = {k: v for k, v in CLEVERTAP_PROFILE.items() if k != "Phone"}
    raw = platforms.clevertap(profile)
    assert '"$Phone"' in raw
    resp = await send(client, tenant, "clevertap", raw)
    assert resp.status_code == 400
    assert resp.json()["error"]["field"] == "phone_number"


async def test_clevertap_tokens_a_profile_lacks_count_as_absent(
    client: httpx.AsyncClient, tenant: Tenant, js: JetStreamContext
) -> None:
    profile = {"Phone": "+919876543210", "selected_plan": "premium"}
    raw = platforms.clevertap(profile)
    assert '"$Name"' in raw and '"$Identity"' in raw and '"$user_segment"' in raw
    call = await queued(js, tenant, await send(client, tenant, "clevertap", raw))
    assert call.user_id is None
    assert call.user_context == {"plan_type": "premium"}  # the agent never reads "Hi $Name"
    assert call.metadata == {"campaign_id": "trial_recovery_v2", "source": "clevertap"}


async def test_clevertap_phone_token_is_400_naming_phone_number_as_missing(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    resp = await send(client, tenant, "clevertap", platforms.clevertap({"Name": "Asha"}))
    assert resp.status_code == 400
    assert resp.json()["error"] == {"code": "missing_field", "message": "phone_number is required", "field": "phone_number"}


UNFILLED_EVERYWHERE = {
    "workflow_slug": "free-trial-followup",
    "phone_number": "+919876543210",
    "user_id": "$Identity",
    "user_context": {"name": "$Name", "price": "$5", "note": "", "address": {"city": "$City", "zip": "400001"},
                     "tags": ["$Tier", "vip"], "greeting": "Hi $Name"},
    "metadata": {"segment": "$user_segment", "source": "clevertap"},
}


async def test_clevertap_tokens_are_absent_at_any_depth_and_only_whole_values(
    client: httpx.AsyncClient, tenant: Tenant, js: JetStreamContext
) -> None:
    resp = await client.post("/api/v1/webhooks/ingest", json=UNFILLED_EVERYWHERE, headers=tenant.auth("clevertap"))
    call = await queued(js, tenant, resp)
    assert call.user_id is None
    # "$5" is no token (a price), "Hi $Name" is not exactly one, "" is not CleverTap's unfilled form
    assert call.user_context == {"price": "$5", "note": "", "address": {"zip": "400001"}, "tags": ["vip"],
                                 "greeting": "Hi $Name"}
    assert call.metadata == {"source": "clevertap"}


@pytest.mark.parametrize("key", ["sandbox", "moengage"])
async def test_without_a_platform_form_dollar_words_and_blanks_are_data(
    client: httpx.AsyncClient, tenant: Tenant, js: JetStreamContext, key: str
) -> None:
    # MoEngage does not send a webhook whose attribute is missing: it has no unfilled form.
    resp = await client.post("/api/v1/webhooks/ingest", json=UNFILLED_EVERYWHERE, headers=tenant.auth(key))
    call = await queued(js, tenant, resp)
    assert call.user_id == "$Identity"
    assert call.user_context == UNFILLED_EVERYWHERE["user_context"]
    assert call.metadata == UNFILLED_EVERYWHERE["metadata"]


async def test_clevertap_quote_in_a_name_breaks_the_json_and_is_400(client: httpx.AsyncClient, tenant: Tenant) -> None:
    resp = await send(client, tenant, "clevertap", platforms.clevertap({**CLEVERTAP_PROFILE, "Name": 'Ann "Jo"'}))
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "invalid_json"


async def test_moengage(client: httpx.AsyncClient, tenant: Tenant, js: JetStreamContext) -> None:
    raw = platforms.moengage({"phone": "+91 98765 43210", "user_id": "moe-7", "name": "Ravi"}, campaign_id="cmp-1")
    call = await queued(js, tenant, await send(client, tenant, "moengage", raw))
    assert call.phone_number == "+919876543210" and call.user_id == "moe-7"
    assert call.user_context == {"name": "Ravi"} and call.metadata == {"campaign_id": "cmp-1", "source": "moengage"}


def test_moengage_does_not_send_when_an_attribute_is_missing() -> None:
    with pytest.raises(platforms.NotSent):
        platforms.moengage({"phone": "+919876543210", "name": "Ravi"}, campaign_id="cmp-1")


async def test_braze(client: httpx.AsyncClient, tenant: Tenant, js: JetStreamContext) -> None:
    raw = platforms.braze(
        {"phone_number": "+14155552671", "user_id": "b-1", "first_name": "Lee"}, campaign={"api_id": "camp-9"}
    )
    call = await queued(js, tenant, await send(client, tenant, "braze", raw))
    assert call.phone_number == "+14155552671" and call.user_id == "b-1"
    assert call.user_context == {"name": "Lee"} and call.metadata == {"campaign_id": "camp-9", "source": "braze"}


async def test_braze_missing_attributes_render_empty_and_count_as_absent(
    client: httpx.AsyncClient, tenant: Tenant, js: JetStreamContext
) -> None:
    raw = platforms.braze({"phone_number": "+14155552671"}, campaign={})
    assert '"name": ""' in raw and '"campaign_id": ""' in raw
    call = await queued(js, tenant, await send(client, tenant, "braze", raw))
    # Braze's blank is its unfilled form, inside user_context and metadata too, so an agent's
    # {{ user.name | default("there") }} says "there", not "".
    assert call.user_id is None and call.user_context == {} and call.metadata == {"source": "braze"}
    no_phone = await send(client, tenant, "braze", platforms.braze({"user_id": "b-1"}, campaign={}))
    assert no_phone.status_code == 400 and no_phone.json()["error"]["field"] == "phone_number"


async def test_webengage(client: httpx.AsyncClient, tenant: Tenant, js: JetStreamContext) -> None:
    raw = platforms.webengage({"phone": "+447911123456", "userId": "we-3", "firstName": "Sam"}, {"journeyId": "j-5"})
    call = await queued(js, tenant, await send(client, tenant, "webengage", raw), status=200)
    assert call.phone_number == "+447911123456" and call.user_id == "we-3"
    assert call.user_context == {"name": "Sam"} and call.metadata == {"campaign_id": "j-5", "source": "webengage"}


async def test_webengage_missing_attributes_render_empty(client: httpx.AsyncClient, tenant: Tenant, js: JetStreamContext) -> None:
    call = await queued(js, tenant, await send(client, tenant, "webengage", platforms.webengage({"phone": "+447911123456"}, {})), 200)
    assert call.user_id is None and call.user_context == {"name": ""} and call.metadata["campaign_id"] == ""
    no_phone = await send(client, tenant, "webengage", platforms.webengage({"userId": "we-3"}, {}))
    assert no_phone.status_code == 400 and no_phone.json()["error"]["field"] == "phone_number"


# --- the status an accepted call is answered with -----------------------------------------------


async def test_webengage_accepted_calls_and_their_retries_are_answered_200(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    # WebEngage counts only HTTP 200 as success (docs.webengage.com/docs/webhooks, "Response").
    raw = platforms.webengage({"phone": "+447911123456", "userId": "we-3"}, {"journeyId": "j-5"})
    headers = {**tenant.auth("webengage"), "Content-Type": "application/json", "Idempotency-Key": "we-3-j-5"}
    first = await client.post("/api/v1/webhooks/ingest", content=raw.encode(), headers=headers)
    again = await client.post("/api/v1/webhooks/ingest", content=raw.encode(), headers=headers)
    assert first.status_code == 200 and again.status_code == 200, (first.text, again.text)
    assert first.json() == again.json() == {"call_id": first.json()["call_id"], "status": "pending"}
    assert again.headers["Idempotent-Replayed"] == "true"
    assert (await send(client, tenant, "clevertap", platforms.clevertap(CLEVERTAP_PROFILE))).status_code == 201


SUCCESS_STATUS_KEYS = """
apiVersion: agentstudio.io/v1alpha1
kind: ApiKey
metadata: {name: custom-sender}
spec: {scopes: ["calls:create"], successStatus: 200}
---
apiVersion: agentstudio.io/v1alpha1
kind: ApiKey
metadata: {name: webengage-201}
spec: {scopes: ["calls:create"], platform: webengage, successStatus: 201}
"""


async def test_success_status_of_a_key_overrides_its_platform(nats_server: NatsServer, tenant: Tenant) -> None:
    bundle = await tenant.publish([*tenant.resources, *docs(SUCCESS_STATUS_KEYS)])
    async with ingest_client(nats_server.url) as (client, svc):
        await wait_for_bundle(svc, tenant.name, bundle.version)
        assert (await send(client, tenant, "custom-sender", json.dumps(SEED_BODY))).status_code == 200
        assert (await send(client, tenant, "webengage-201", json.dumps(SEED_BODY))).status_code == 201


def test_success_status_compiles_into_the_key_entry_and_the_crd() -> None:
    resources = [*example_resources(), *docs(SUCCESS_STATUS_KEYS)]
    names = {"webengage", "clevertap", "custom-sender", "webengage-201"}
    material = {name: [KeyMaterial(keys.digest(keys.generate("live")))] for name in names}
    result = compile_bundle("t", resources, material)
    assert result.bundle is not None, result.errors
    status = {entry.name: entry.success_status for entry in result.bundle.keys.values()}
    assert status == {"webengage": 200, "clevertap": 201, "custom-sender": 200, "webengage-201": 201}
    crd = yaml.safe_load(crdgen.render_all()["apikeys.agentstudio.io.yaml"])
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec["properties"]["successStatus"]["enum"] == [200, 201]
    assert spec["properties"]["successStatus"]["type"] == "integer"
