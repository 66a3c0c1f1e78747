"""`agent-studio ingest` as a real process over HTTP: property tests over phone numbers and bodies
(never a 5xx), and the key never appearing in what the process logs."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentstudio import phone
from agentstudio.natsserver import NatsServer
from conftest import Tenant, docs, example_resources, published_tenant
from processes import running_ingest

FUZZ_KEY = """
apiVersion: agentstudio.io/v1alpha1
kind: ApiKey
metadata: {name: fuzz}
spec: {scopes: ["calls:create", "calls:read"], mode: test, rateLimitPerMinute: 1000000}
"""


@dataclass
class IngestProcess:
    url: str
    tenant: Tenant
    log: Path


@pytest.fixture(scope="module")
def ingest_process(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[IngestProcess]:
    tenant = published_tenant(nats_server.url, example_resources() + docs(FUZZ_KEY))
    log = tmp_path_factory.mktemp("ingest") / "ingest.log"
    with running_ingest(nats_server.url, tenant, log, AGENTSTUDIO_LOG_LEVEL="DEBUG") as url:
        yield IngestProcess(url, tenant, log)


json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
phones = (
    st.from_regex(r"\A\+[0-9 ()\-]{0,20}\Z")
    | st.text(alphabet="+0123456789 -().$abcPhone", max_size=24)
    | st.sampled_from(["+919876543210", "+14155552671", "$Phone", "", "+", "++1", "+1 (415) 555-2671"])
)
fields = st.sampled_from(["phone_number", "workflow_slug", "agent_slug", "user_id", "user_context", "metadata", "x"])
bodies = st.dictionaries(fields, json_values, max_size=7) | json_values


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(number=phones)
def test_any_phone_number_gets_201_or_a_400_naming_it(ingest_process: IngestProcess, number: str) -> None:
    resp = httpx.post(
        f"{ingest_process.url}/api/v1/webhooks/ingest",
        json={"agent_slug": "trial-followup-agent", "phone_number": number},
        headers=ingest_process.tenant.auth("fuzz"),
    )
    try:
        expected = phone.normalize(number.strip())
    except phone.InvalidPhoneNumber:
        expected = None
    if expected is None:
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["field"] == "phone_number"
    else:
        assert resp.status_code == 201, resp.text


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=bodies)
def test_any_body_gets_an_answer_in_the_contract(ingest_process: IngestProcess, payload: object) -> None:
    resp = httpx.post(
        f"{ingest_process.url}/api/v1/webhooks/ingest",
        content=json.dumps(payload).encode(),
        headers={**ingest_process.tenant.auth("fuzz"), "Content-Type": "application/json"},
    )
    assert resp.status_code in (201, 400, 404, 422), resp.text
    if resp.status_code != 201:
        error = resp.json()["error"]
        assert error["code"] and error["message"]


def test_keys_never_appear_in_logs(ingest_process: IngestProcess) -> None:
    tenant = ingest_process.tenant
    url = f"{ingest_process.url}/api/v1/webhooks/ingest"
    good = {"agent_slug": "trial-followup-agent", "phone_number": "+919876543210"}
    for key in ("clevertap", "analytics-readonly", "fuzz"):
        httpx.post(url, json=good, headers=tenant.auth(key))
        httpx.post(url, json={"phone_number": "bad"}, headers=tenant.auth(key))
        httpx.post(url, content=b"{", headers={**tenant.auth(key), "Content-Type": "application/json"})
    wrong = "as_live_" + "Z" * 32
    httpx.post(url, json=good, headers={"Authorization": f"Bearer {wrong}"})
    time.sleep(0.3)
    text = ingest_process.log.read_text()
    assert "call queued" in text  # the log is being written, with the events we sent
    for key in [*tenant.keys.values(), wrong]:
        assert key not in text
        assert key[-12:] not in text
    assert "+919876543210" not in text  # phone numbers are masked too
    assert "********3210" in text
