"""Listing and exporting a tenant's calls against a real nats-server: filters, cursor paging that
neither skips nor repeats, CSV and JSON Lines exports, scopes, tenant isolation and bad parameters."""

from __future__ import annotations

import asyncio
import copy
import csv
import io
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import orjson
import pytest
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from agentstudio import bus, calls, calls_index
from agentstudio.callstate import CallError, CallState, CallStore
from agentstudio.natsserver import NatsServer
from conftest import SEED_BODY, Tenant, example_resources, ingest_client, wait_for_bundle

READER = "analytics-readonly"
FIXED = ["call_id", "created_at", "status", "workflow_slug", "agent_slug", "user_id", "phone_number", "test",
         "duration_seconds", "answered_at", "ended_at", "error_code", "error_message", "end_reason", "captured"]


async def queue(client: httpx.AsyncClient, tenant: Tenant, key: str = "clevertap", **changes: Any) -> str:
    payload = copy.deepcopy(SEED_BODY)
    if "agent_slug" in changes:
        payload.pop("workflow_slug")
    payload.update(changes)
    resp = await client.post("/api/v1/webhooks/ingest", json=payload, headers=tenant.auth(key))
    assert resp.status_code == 201, resp.text
    return str(resp.json()["call_id"])


async def listing(client: httpx.AsyncClient, tenant: Tenant, key: str = READER, **params: Any) -> dict[str, Any]:
    resp = await client.get("/api/v1/calls", params=params, headers=tenant.auth(key))
    assert resp.status_code == 200, resp.text
    return resp.json()  # type: ignore[no-any-return]


async def ids(client: httpx.AsyncClient, tenant: Tenant, **params: Any) -> list[str]:
    page = await listing(client, tenant, **params)
    assert page["next_cursor"] is None, "expected a single page"
    return [c["call_id"] for c in page["data"]]


async def every_page(client: httpx.AsyncClient, tenant: Tenant, **params: Any) -> list[list[str]]:
    pages, cursor = [], None
    while True:
        page = await listing(client, tenant, **params, **({"cursor": cursor} if cursor else {}))
        pages.append([c["call_id"] for c in page["data"]])
        cursor = page["next_cursor"]
        if cursor is None:
            return pages


async def advance(js: JetStreamContext, tenant: Tenant, call_id: str, *path: str,
                  error: CallError | None = None) -> None:
    """Move a call along `path` as a dialer would record it."""
    call = await calls.fetch(js, tenant.name, call_id)
    assert call is not None
    state: CallState | None = CallState.new(call)
    for status in path:
        assert state is not None
        state = state.advanced(status, error=error if status == path[-1] else None)  # type: ignore[arg-type]
    store = CallStore(await bus.calls_bucket(js))
    await store.change(tenant.name, call_id, lambda _: state)


def assert_error(resp: httpx.Response, status: int, field: str | None) -> None:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["code"] and error["message"]
    assert error.get("field") == field, error


# --- listing -------------------------------------------------------------------------------


async def test_lists_the_tenants_calls_newest_first(client: httpx.AsyncClient, tenant: Tenant, js: JetStreamContext) -> None:
    first = await queue(client, tenant)
    second = await queue(client, tenant, agent_slug="trial-followup-agent", metadata={"campaign_id": "c-2"})
    third = await queue(client, tenant)
    await advance(js, tenant, first, "dialing", "ringing", "in_progress", "completed")
    page = await listing(client, tenant)
    assert [c["call_id"] for c in page["data"]] == [third, second, first]
    assert page["next_cursor"] is None
    by_id = {c["call_id"]: c for c in page["data"]}
    assert by_id[third]["status"] == "pending" and by_id[third]["events"][0]["status"] == "pending"
    assert by_id[third]["metadata"] == SEED_BODY["metadata"] and by_id[third]["user_context"] == SEED_BODY["user_context"]
    assert by_id[second]["agent_slug"] == "trial-followup-agent" and by_id[second]["workflow_slug"] is None
    assert by_id[first]["status"] == "completed" and by_id[first]["ended_at"] is not None
    # the same record GET /calls/{id} gives
    one = (await client.get(f"/api/v1/calls/{first}", headers=tenant.auth(READER))).json()
    assert one == by_id[first]


async def test_an_empty_tenant_has_an_empty_first_and_last_page(client: httpx.AsyncClient, tenant: Tenant) -> None:
    assert await listing(client, tenant) == {"data": [], "next_cursor": None}


async def test_filters(client: httpx.AsyncClient, tenant: Tenant, js: JetStreamContext) -> None:
    seed = await queue(client, tenant, metadata={"campaign_id": "jan", "source": "clevertap"})
    agent = await queue(client, tenant, agent_slug="trial-followup-agent", metadata={"campaign_id": "feb", "attempt": 2})
    sandbox = await queue(client, tenant, key="sandbox", metadata={"campaign_id": "jan", "source": "braze"})
    done = await queue(client, tenant, metadata={"campaign_id": "jan", "source": "clevertap"})
    failed = await queue(client, tenant, metadata={"campaign_id": "feb"})
    await advance(js, tenant, done, "dialing", "ringing", "in_progress", "completed")
    await advance(js, tenant, failed, "dialing", "failed", error=CallError(code="provider_error", message="refused"))
    dialing = await queue(client, tenant, metadata={})
    await advance(js, tenant, dialing, "dialing")

    assert await ids(client, tenant, workflow_slug="free-trial-followup") == [dialing, failed, done, sandbox, seed]
    assert await ids(client, tenant, agent_slug="trial-followup-agent") == [agent]
    assert await ids(client, tenant, workflow_slug="nope") == []
    assert await ids(client, tenant, **{"metadata.campaign_id": "jan"}) == [done, sandbox, seed]
    assert await ids(client, tenant, **{"metadata.campaign_id": "jan", "metadata.source": "clevertap"}) == [done, seed]
    any_of = await client.get("/api/v1/calls", headers=tenant.auth(READER),
                              params=[("metadata.campaign_id", "feb"), ("metadata.campaign_id", "jan"), ("metadata.source", "braze")])
    assert [c["call_id"] for c in any_of.json()["data"]] == [sandbox]
    assert await ids(client, tenant, **{"metadata.attempt": "2"}) == [agent]  # non-strings compare as JSON text
    assert await ids(client, tenant, **{"metadata.missing": "x"}) == []
    assert await ids(client, tenant, status="completed") == [done]
    assert await ids(client, tenant, status="completed,failed") == [failed, done]
    repeated = await client.get("/api/v1/calls", headers=tenant.auth(READER),
                                params=[("status", "failed"), ("status", "dialing")])
    assert [c["call_id"] for c in repeated.json()["data"]] == [dialing, failed]
    assert await ids(client, tenant, status="pending") == [sandbox, agent, seed]
    assert await ids(client, tenant, test="true") == [sandbox]
    assert await ids(client, tenant, test="false") == [dialing, failed, done, agent, seed]
    assert await ids(client, tenant, status="pending", test="false", **{"metadata.campaign_id": "jan"}) == [seed]

    created = {c["call_id"]: c["created_at"] for c in (await listing(client, tenant))["data"]}
    assert await ids(client, tenant, created_after=created[sandbox]) == [dialing, failed, done, sandbox]
    assert await ids(client, tenant, created_before=created[sandbox]) == [agent, seed]
    assert await ids(client, tenant, created_after=created[agent], created_before=created[done]) == [sandbox, agent]
    far = datetime.now(timezone.utc) + timedelta(days=1)
    assert await ids(client, tenant, created_after=far.isoformat()) == []
    assert len(await ids(client, tenant, created_before=far.strftime("%Y-%m-%dT%H:%M:%S"))) == 6  # no offset: UTC


async def test_pages_neither_skip_nor_repeat_while_calls_arrive(client: httpx.AsyncClient, tenant: Tenant) -> None:
    queued = [await queue(client, tenant) for _ in range(7)]
    newest_first = queued[::-1]
    page1 = await listing(client, tenant, limit=3)
    assert [c["call_id"] for c in page1["data"]] == newest_first[:3]
    arrived = [await queue(client, tenant) for _ in range(2)]  # between page fetches
    page2 = await listing(client, tenant, limit=3, cursor=page1["next_cursor"])
    arrived.append(await queue(client, tenant))
    page3 = await listing(client, tenant, limit=3, cursor=page2["next_cursor"])
    seen = [c["call_id"] for p in (page1, page2, page3) for c in p["data"]]
    assert seen == newest_first and page3["next_cursor"] is None
    # starting again from the top shows the late arrivals first
    assert await every_page(client, tenant, limit=4) == [
        arrived[::-1] + newest_first[:1], newest_first[1:5], newest_first[5:]]


async def test_a_full_last_page_says_it_is_the_last(client: httpx.AsyncClient, tenant: Tenant) -> None:
    queued = [await queue(client, tenant) for _ in range(4)]
    assert await every_page(client, tenant, limit=2) == [queued[:1:-1], queued[1::-1]]


async def test_paging_with_a_filter(client: httpx.AsyncClient, tenant: Tenant) -> None:
    jan = []
    for i in range(9):
        call_id = await queue(client, tenant, metadata={"campaign_id": "jan" if i % 2 else "feb"})
        if i % 2:
            jan.append(call_id)
    pages = await every_page(client, tenant, limit=3, **{"metadata.campaign_id": "jan"})
    assert pages == [jan[:0:-1], jan[:1]]


async def test_pages_over_a_stream_shared_with_other_tenants_and_a_replica_started_later(
    client: httpx.AsyncClient, tenant: Tenant, js: JetStreamContext, nats_server: NatsServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Calls interleaved with another tenant's, read a page at a time through the calls table (its
    reads made 3 rows at a time, so a page takes several), and the same pages from a replica whose
    table was built from the stream after the calls were queued."""
    monkeypatch.setattr(calls_index, "BATCH", 3)
    other = Tenant(f"t-{uuid.uuid4().hex[:10]}", js, example_resources())
    bundle = await other.publish()
    async with ingest_client(nats_server.url) as (other_client, svc):
        await wait_for_bundle(svc, other.name, bundle.version)
        mine = []
        for burst in (1, 5, 2, 8):
            mine += [await queue(client, tenant) for _ in range(burst)]
            for _ in range(6):
                await queue(other_client, other)
    newest_first = mine[::-1]
    async with ingest_client(nats_server.url) as (later, svc):
        assert tenant.bundle is not None
        await wait_for_bundle(svc, tenant.name, tenant.bundle.version)
        for reader in (client, later):
            for limit in (1, 4, 7, 16, 500):
                pages = await every_page(reader, tenant, limit=limit)
                assert [c for p in pages for c in p] == newest_first, limit
                assert all(len(p) == limit for p in pages[:-1])
            export = await reader.get("/api/v1/calls/export?format=jsonl", headers=tenant.auth(READER))
            assert [orjson.loads(line)["call_id"] for line in export.text.splitlines()] == newest_first


async def test_a_scheduled_call_keeps_its_place_when_it_fires_between_pages(
    client: httpx.AsyncClient, tenant: Tenant, js: JetStreamContext,
) -> None:
    """A call scheduled at ingest waits on its schedule subject; when due, the server moves it to its
    dispatch subject, a newer place in the stream. A listing paged across that moment still finds
    it where it was accepted (the calls table keeps that place), neither skipped nor listed twice."""
    due = datetime.now(timezone.utc) + timedelta(seconds=2)
    scheduled = await queue(client, tenant, scheduled_at=due.isoformat())
    newer = [await queue(client, tenant) for _ in range(2)]
    first = await listing(client, tenant, limit=2)
    assert [c["call_id"] for c in first["data"]] == newer[::-1]
    subject = bus.dispatch_subject(tenant.name, scheduled)
    for _ in range(100):  # the server fires it
        try:
            await js.get_last_msg(bus.CALLS_STREAM, subject)
            break
        except NotFoundError:
            await asyncio.sleep(0.1)
    else:
        raise AssertionError("the scheduled call never moved to its dispatch subject")
    rest = await listing(client, tenant, limit=2, cursor=first["next_cursor"])
    assert [c["call_id"] for c in rest["data"]] == [scheduled] and rest["next_cursor"] is None
    assert [c for p in await every_page(client, tenant, limit=1) for c in p] == [*newer[::-1], scheduled]


async def test_a_cursor_from_before_everything_gives_an_empty_last_page(client: httpx.AsyncClient, tenant: Tenant) -> None:
    await queue(client, tenant)
    assert await listing(client, tenant, cursor=calls_index.encode_cursor(1)) == {"data": [], "next_cursor": None}


# --- scopes and tenants ---------------------------------------------------------------------


async def test_a_key_without_calls_read_is_403(client: httpx.AsyncClient, tenant: Tenant) -> None:
    for path in ("/api/v1/calls", "/api/v1/calls/export", "/api/v1/calls/export?format=jsonl"):
        assert_error(await client.get(path, headers=tenant.auth("clevertap")), 403, "Authorization")
    assert_error(await client.get("/api/v1/calls"), 401, "Authorization")
    # the scope is checked before the parameters
    assert_error(await client.get("/api/v1/calls?status=bogus", headers=tenant.auth("clevertap")), 403, "Authorization")


async def test_a_tenant_sees_only_its_own_calls(client: httpx.AsyncClient, tenant: Tenant, js: JetStreamContext,
                                                nats_server: NatsServer) -> None:
    mine = await queue(client, tenant)
    other = Tenant(f"t-{uuid.uuid4().hex[:10]}", js, example_resources())
    bundle = await other.publish()
    async with ingest_client(nats_server.url) as (other_client, svc):
        await wait_for_bundle(svc, other.name, bundle.version)
        theirs = await queue(other_client, other)
        assert await ids(other_client, other) == [theirs]
        export = await other_client.get("/api/v1/calls/export", params={"format": "jsonl"}, headers=other.auth(READER))
        assert [orjson.loads(line)["call_id"] for line in export.text.splitlines()] == [theirs]
    assert await ids(client, tenant) == [mine]
    export = await client.get("/api/v1/calls/export", headers=tenant.auth(READER))
    assert [row["call_id"] for row in csv.DictReader(io.StringIO(export.text))] == [mine]


# --- export ---------------------------------------------------------------------------------


async def test_csv_export_has_a_column_per_metadata_key(client: httpx.AsyncClient, tenant: Tenant, js: JetStreamContext) -> None:
    plain = await queue(client, tenant, metadata={})
    tricky = await queue(client, tenant, user_id="u,1", metadata={"campaign_id": 'say "hi", bye', "note": "two\nlines"})
    nested = await queue(client, tenant, key="sandbox", metadata={"attempt": 2, "tags": ["a", "b"], "ok": True})
    done = await queue(client, tenant, metadata={"campaign_id": "jan"})
    await advance(js, tenant, done, "dialing", "ringing", "in_progress", "completed")
    failed = await queue(client, tenant, metadata={})
    await advance(js, tenant, failed, "dialing", "failed", error=CallError(code="provider_error", message="refused, twice"))

    resp = await client.get("/api/v1/calls/export", params={"format": "csv"}, headers=tenant.auth(READER))
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/csv")
    disposition = resp.headers["content-disposition"]
    assert disposition.startswith("attachment;") and f'filename="calls-{tenant.name}-' in disposition
    assert disposition.endswith('.csv"')
    reader = csv.reader(io.StringIO(resp.text, newline=""))
    header = next(reader)
    assert header == FIXED + ["metadata.attempt", "metadata.campaign_id", "metadata.note", "metadata.ok", "metadata.tags"]
    rows = {row["call_id"]: row for row in (dict(zip(header, r, strict=True)) for r in reader)}
    assert list(rows) == [failed, done, nested, tricky, plain]
    assert rows[tricky]["user_id"] == "u,1" and rows[tricky]["metadata.campaign_id"] == 'say "hi", bye'
    assert rows[tricky]["metadata.note"] == "two\nlines" and rows[tricky]["metadata.attempt"] == ""
    assert rows[nested]["metadata.attempt"] == "2" and rows[nested]["metadata.tags"] == '["a","b"]'
    assert rows[nested]["metadata.ok"] == "true" and rows[nested]["test"] == "true"
    assert rows[plain]["test"] == "false" and rows[plain]["status"] == "pending"
    assert rows[plain]["phone_number"] == "+919876543210" and rows[plain]["workflow_slug"] == "free-trial-followup"
    assert rows[done]["status"] == "completed" and rows[done]["duration_seconds"] != ""
    assert datetime.fromisoformat(rows[done]["answered_at"]) <= datetime.fromisoformat(rows[done]["ended_at"])
    assert datetime.fromisoformat(rows[plain]["created_at"]).tzinfo is not None
    assert rows[failed]["error_code"] == "provider_error" and rows[failed]["error_message"] == "refused, twice"
    assert rows[plain]["answered_at"] == "" and rows[plain]["error_code"] == ""


async def test_export_applies_the_filters(client: httpx.AsyncClient, tenant: Tenant, js: JetStreamContext) -> None:
    jan = await queue(client, tenant, metadata={"campaign_id": "jan"})
    await queue(client, tenant, metadata={"campaign_id": "feb", "only_feb": "x"})
    done = await queue(client, tenant, metadata={"campaign_id": "jan", "wave": "2"})
    await advance(js, tenant, done, "dialing", "ringing", "in_progress", "completed")

    resp = await client.get("/api/v1/calls/export", params={"metadata.campaign_id": "jan"}, headers=tenant.auth(READER))
    rows = list(csv.DictReader(io.StringIO(resp.text, newline="")))
    assert [r["call_id"] for r in rows] == [done, jan]
    assert "metadata.only_feb" not in rows[0]  # columns come from the calls exported
    resp = await client.get("/api/v1/calls/export", params={"status": "completed", "format": "jsonl"},
                            headers=tenant.auth(READER))
    assert [orjson.loads(line)["call_id"] for line in resp.text.splitlines()] == [done]


async def test_jsonl_export_is_one_call_record_per_line(client: httpx.AsyncClient, tenant: Tenant, js: JetStreamContext) -> None:
    queued = [await queue(client, tenant, metadata={"n": str(i)}) for i in range(3)]
    await advance(js, tenant, queued[0], "dialing", "no_answer")
    resp = await client.get("/api/v1/calls/export", params={"format": "jsonl"}, headers=tenant.auth(READER))
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("application/x-ndjson")
    assert resp.headers["content-disposition"].endswith('.jsonl"')
    assert resp.text.endswith("\n")
    lines = [orjson.loads(line) for line in resp.text.splitlines()]
    assert [r["call_id"] for r in lines] == queued[::-1]
    assert [r["metadata"] for r in lines] == [{"n": "2"}, {"n": "1"}, {"n": "0"}]
    assert lines[2]["status"] == "no_answer" and lines[0]["status"] == "pending"
    for line in lines:  # the same records the listing gives
        assert line in (await listing(client, tenant))["data"]


async def test_an_export_of_nothing_is_just_the_header(client: httpx.AsyncClient, tenant: Tenant) -> None:
    resp = await client.get("/api/v1/calls/export", headers=tenant.auth(READER))
    assert resp.status_code == 200 and resp.text.splitlines() == [",".join(FIXED)]
    resp = await client.get("/api/v1/calls/export?format=jsonl", headers=tenant.auth(READER))
    assert resp.status_code == 200 and resp.text == ""


async def test_export_is_not_taken_for_a_call_id(client: httpx.AsyncClient, tenant: Tenant) -> None:
    resp = await client.get("/api/v1/calls/export", headers=tenant.auth(READER))
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/csv")


# --- 400 ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("status=bogus", "status"),
        ("status=completed,bogus", "status"),
        ("status=", "status"),
        ("workflow_slug=", "workflow_slug"),
        ("agent_slug=", "agent_slug"),
        ("created_after=yesterday", "created_after"),
        ("created_before=2026-13-40T00:00:00Z", "created_before"),
        ("created_after=2026-02-02T00:00:00Z&created_before=2026-02-01T00:00:00Z", "created_before"),
        ("test=maybe", "test"),
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=ten", "limit"),
        ("cursor=not-a-cursor", "cursor"),
        ("cursor=" + calls_index.encode_cursor(1)[:-2], "cursor"),
        ("metadata.=x", "metadata."),
        ("workflow=free-trial-followup", "workflow"),
        ("format=csv", "format"),
    ],
)
async def test_bad_list_parameters_are_400_naming_the_field(
    client: httpx.AsyncClient, tenant: Tenant, query: str, field: str
) -> None:
    assert_error(await client.get(f"/api/v1/calls?{query}", headers=tenant.auth(READER)), 400, field)


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("format=xml", "format"),
        ("format=", "format"),
        ("status=bogus", "status"),
        ("created_after=soon", "created_after"),
        ("limit=10", "limit"),
        ("cursor=x", "cursor"),
    ],
)
async def test_bad_export_parameters_are_400_naming_the_field(
    client: httpx.AsyncClient, tenant: Tenant, query: str, field: str
) -> None:
    assert_error(await client.get(f"/api/v1/calls/export?{query}", headers=tenant.auth(READER)), 400, field)


def test_cursors_round_trip_and_reject_what_was_not_issued() -> None:
    assert calls_index.decode_cursor(calls_index.encode_cursor(12345)) == 12345
    for bad in ("", "e30", "bnVsbA", calls_index.encode_cursor(0), "eyJiZWxvdyI6dHJ1ZX0", "ü"):
        with pytest.raises(ValueError):
            calls_index.decode_cursor(bad)


# --- OpenAPI --------------------------------------------------------------------------------


async def test_openapi_documents_listing_and_export(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    listing_op = spec["paths"]["/api/v1/calls"]["get"]
    # (FastAPI adds a 422 to every route with parameters; this app answers validation errors with 400)
    assert set(listing_op["responses"]) >= {"200", "400", "401", "403", "429", "503"}
    assert listing_op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/CallPage")
    assert listing_op["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    params = {p["name"] for p in listing_op["parameters"]}
    assert params == {"status", "workflow_slug", "agent_slug", "created_after", "created_before", "test", "limit", "cursor"}
    assert "metadata.<key>" in listing_op["description"]
    page = spec["components"]["schemas"]["CallPage"]
    assert set(page["properties"]) == {"data", "next_cursor"}

    export = spec["paths"]["/api/v1/calls/export"]["get"]
    assert set(export["responses"]) >= {"200", "400", "401", "403", "429", "503"}
    assert {"text/csv", "application/x-ndjson"} <= set(export["responses"]["200"]["content"])
    fmt = next(p for p in export["parameters"] if p["name"] == "format")
    assert fmt["schema"]["enum"] == ["csv", "jsonl"]
    assert "/api/v1/calls/{call_id}" in spec["paths"]
