"""The metrics a platform team alerts on, produced by the real roles on a real nats-server: a dialer
process counting the calls it ends and serving its tenants' slots and bundles, ingest counting the
calls it cancels, webhook deliveries to a receiver that is down ending in dead letters, and the
operator's reading of the dispatch queue over a real backlog."""

from __future__ import annotations

import asyncio
import os
import re
import uuid
from datetime import datetime, timedelta, timezone
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.js.api import AckPolicy, ConsumerConfig
from prometheus_client.parser import text_string_to_metric_families

from agentstudio import bus
from agentstudio.bundle_store import buckets
from agentstudio.dialer import main as dialer_main
from agentstudio.dialer.metrics import DialerMetrics
from agentstudio.metrics import end_reason_label
from agentstudio.natsserver import NatsServer, free_port
from agentstudio.operator.metrics import OperatorMetrics
from agentstudio.secrets import StaticSecrets
from agentstudio.settings import Settings
import controlplane
from agentstudio.resources import GROUP, VERSION
from backlog import queue_backlog
from conftest import Tenant, docs, ingest_client, wait_for_bundle
from processes import Process
from test_dialer import MANIFESTS, dialers, queue_call, until_status
from test_operator import Cluster
from test_webhooks import OPS_KEY, subscription


def samples(text: str, name: str, **labels: str) -> list[float]:
    """The values of `name`'s samples whose labels include `labels`."""
    return [s.value for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == name and labels.items() <= s.labels.items()]


def total(text: str, name: str, **labels: str) -> float:
    return sum(samples(text, name, **labels))


def start_dialer(nats_url: str, log: Path) -> tuple[Process, str]:
    port = free_port()
    env = {**os.environ, "AGENTSTUDIO_HOST": "127.0.0.1", "AGENTSTUDIO_PORT": str(port),
           "AGENTSTUDIO_NATS_URL": nats_url, "AGENTSTUDIO_WEBHOOK_SECRETS": "none",
           "AGENTSTUDIO_METRICS_REFRESH_SECONDS": "0.2", "AGENTSTUDIO_MAX_CONCURRENT_CALLS_PER_TENANT": "7"}
    return Process.agent_studio("dialer", log=log, env=env), f"http://127.0.0.1:{port}"


async def eventually(process: Process, check, what: str, timeout: float = 20) -> Any:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        process.alive()
        try:
            if found := await check():
                return found
        except httpx.TransportError:
            pass
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what}: not after {timeout} s\n{process.output()}")
        await asyncio.sleep(0.1)


async def test_a_dialer_process_counts_the_calls_it_ends_and_serves_slots_and_bundles(nats_server, js, tmp_path) -> None:  # type: ignore[no-untyped-def]
    t = Tenant(f"t-{uuid.uuid4().hex[:10]}", js, docs(MANIFESTS))
    bundle = await t.publish()
    dialer, url = start_dialer(nats_server.url, tmp_path / "dialer.log")
    try:
        async with ingest_client(nats_server.url) as (api, svc), httpx.AsyncClient(base_url=url) as scrape:
            await wait_for_bundle(svc, t.name, bundle.version)
            await eventually(dialer, lambda: _ok(scrape.get("/readyz")), "dialer ready")
            done = [await queue_call(api, t, simulate_duration_seconds=0) for _ in range(2)]
            failed = await queue_call(api, t, simulate_duration_seconds=0, simulate_outcome="failed")
            for call_id in done:
                await until_status(api, t, call_id, "completed")
            await until_status(api, t, failed, "failed")
            # Canceled through ingest: counted by ingest, whose write ended it.
            later = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()
            resp = await api.post("/api/v1/webhooks/ingest", headers=t.auth("test"), json={
                "agent_slug": "a", "phone_number": "+14155552671", "user_id": "u-1", "scheduled_at": later})
            assert resp.status_code == 201, resp.text
            canceled = resp.json()["call_id"]
            assert (await api.post(f"/api/v1/calls/{canceled}/cancel", headers=t.auth("test"))).status_code == 200

            async def counted() -> str | None:
                text = (await scrape.get("/metrics")).text
                ended = "agentstudio_calls_ended_total"
                return text if total(text, ended, tenant=t.name, status="completed") == 2 \
                    and total(text, ended, tenant=t.name, status="failed") == 1 else None

            text = await eventually(dialer, counted, "two completed and one failed call counted")
            assert total(text, "agentstudio_calls_ended_total", tenant=t.name, status="canceled") == 0
            ingest_text = (await api.get("/metrics")).text
            assert total(ingest_text, "agentstudio_calls_ended_total", tenant=t.name, status="canceled",
                         end_reason="canceled_by_api") == 1
            assert total(ingest_text, "agentstudio_calls_ended_total", tenant=t.name, status="completed") == 0
            # Both serve the bundle they loaded; the dialer its tenant's slots: none held now, the cap
            # its setting (the bundle sets none).
            for served in (text, ingest_text):
                assert samples(served, "agentstudio_bundle_loaded_version", tenant=t.name) == [bundle.version]
                compiled, = samples(served, "agentstudio_bundle_loaded_compiled_timestamp_seconds", tenant=t.name)
                assert compiled == bundle.compiled_at.timestamp()
            # Read on a timer: a read while the calls were live said they held slots; the next, none.

            async def slots() -> str | None:
                text = (await scrape.get("/metrics")).text
                return text if samples(text, "agentstudio_concurrency_slots_in_use", tenant=t.name) == [0] else None

            text = await eventually(dialer, slots, "the ended calls' slots read as free")
            assert samples(text, "agentstudio_concurrency_slots_cap", tenant=t.name) == [7]
            # No call id and no phone number in any label.
            for family in text_string_to_metric_families(text + ingest_text):
                for s in family.samples:
                    for value in s.labels.values():
                        assert value not in [*done, failed, canceled] and "4155552671" not in value, s
    finally:
        dialer.stop()


@given(st.one_of(st.none(), st.text(max_size=80), st.sampled_from(["end_call", "callee_hangup", "canceled_by_api"])))
def test_an_end_reason_label_is_one_of_ours_or_other(reason: str | None) -> None:
    # Whatever reaches the label (a model's words, a phone number), it stays a short token of ours.
    label = end_reason_label(reason)
    assert label in ("none", "other") or (label == reason and re.fullmatch(r"[a-z][a-z0-9_]{0,39}", label))
    assert end_reason_label("+14155552671") == "other" and end_reason_label("end_call") == "end_call"


async def _ok(response: Any) -> bool:
    return (await response).status_code == 200


async def test_slots_in_use_are_read_from_the_shared_record(js) -> None:  # type: ignore[no-untyped-def]
    tenant = f"t-{uuid.uuid4().hex[:10]}"
    tracker = await dialer_main.tracker_for(js._nc)  # noqa: SLF001 - the dialer's own
    for call_id in ("c1", "c2", "c3"):
        assert await tracker.concurrency.acquire(tenant, call_id, 3)
    metrics = DialerMetrics()
    await metrics.refresh_slots(tracker.concurrency, [tenant], lambda _: 3)
    text = metrics.render().decode()
    assert samples(text, "agentstudio_concurrency_slots_in_use", tenant=tenant) == [3]
    assert samples(text, "agentstudio_concurrency_slots_cap", tenant=tenant) == [3]
    await tracker.concurrency.release(tenant, "c2")
    await metrics.refresh_slots(tracker.concurrency, [tenant], lambda _: 3)
    assert samples(metrics.render().decode(), "agentstudio_concurrency_slots_in_use", tenant=tenant) == [2]
    await metrics.refresh_slots(tracker.concurrency, [], lambda _: 3)  # its bundle removed: no series left
    assert samples(metrics.render().decode(), "agentstudio_concurrency_slots_in_use", tenant=tenant) == []


async def test_deliveries_to_a_receiver_that_is_down_end_in_a_counted_dead_letter(nats_server, js) -> None:  # type: ignore[no-untyped-def]
    down = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there
    t = Tenant(f"t-{uuid.uuid4().hex[:10]}", js,
               docs(MANIFESTS + OPS_KEY + subscription("r", down, events='["call.completed"]')))
    bundle = await t.publish()
    metrics = DialerMetrics()
    settings = Settings(nats_url=nats_server.url, webhook_retry_schedule="0,0.2", webhook_timeout_seconds=2)
    nc = await bus.connect(nats_server.url, "test-webhook-metrics")
    dispatcher, watcher = await dialer_main.webhooks(
        nc, settings, StaticSecrets({(t.name, "r-webhook-secret", "secret"): "whsec_" + "a" * 32}), metrics)
    stop = asyncio.Event()
    running = asyncio.create_task(dispatcher.run(stop))
    try:
        async with ingest_client(nats_server.url) as (api, svc):
            await wait_for_bundle(svc, t.name, bundle.version)
            async with dialers(nats_server.url):
                call_id = await queue_call(api, t, simulate_duration_seconds=0)
                await until_status(api, t, call_id, "completed")
                deadline = asyncio.get_running_loop().time() + 20
                while total(metrics.render().decode(), "agentstudio_webhook_deliveries_total",
                            outcome="dead_lettered") < 1:
                    assert asyncio.get_running_loop().time() < deadline, metrics.render().decode()
                    await asyncio.sleep(0.1)
        text = metrics.render().decode()
        # Two failed attempts retried, the third past the schedule: one dead letter, nothing delivered.
        assert samples(text, "agentstudio_webhook_deliveries_total", tenant=t.name, outcome="retry") == [2]
        assert samples(text, "agentstudio_webhook_deliveries_total", tenant=t.name, outcome="dead_lettered") == [1]
        assert samples(text, "agentstudio_webhook_deliveries_total", tenant=t.name, outcome="delivered") == [0]
    finally:
        stop.set()
        await running
        await watcher.stop()
        await nc.close()


async def test_the_operator_reads_each_tenants_backlog_from_the_dispatch_consumer(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # A server of its own: the dialers' consumer and its counts are this test's alone.
    with NatsServer(tmp_path / "nats") as server:
        nc = await bus.connect(server.url, "test-queue-metrics")
        try:
            js = nc.jetstream()
            a = Tenant(f"t-{uuid.uuid4().hex[:10]}", js, docs(MANIFESTS))
            b = Tenant(f"t-{uuid.uuid4().hex[:10]}", js, docs(MANIFESTS))
            versions = {a.name: (await a.publish()).version, b.name: (await b.publish()).version}
            metrics = OperatorMetrics()
            store = await buckets(js)
            for _ in ("before ingest made the stream", "before anything was queued"):
                await metrics.refresh(store, [])
                text = metrics.render().decode()
                assert samples(text, "agentstudio_queue_pending_calls", tenant=a.name) == [0]
                assert samples(text, "agentstudio_queue_oldest_pending_age_seconds", tenant=a.name) == [0]
                await bus.ensure_calls_stream(js)

            await queue_backlog(js, a.name, 3)
            await asyncio.sleep(1.0)  # the backlog ages
            await queue_backlog(js, b.name, 1)
            await metrics.refresh(store, [])
            text = metrics.render().decode()
            assert samples(text, "agentstudio_queue_pending_calls", tenant=a.name) == [3]
            assert samples(text, "agentstudio_queue_pending_calls", tenant=b.name) == [1]
            age_a, = samples(text, "agentstudio_queue_oldest_pending_age_seconds", tenant=a.name)
            age_b, = samples(text, "agentstudio_queue_oldest_pending_age_seconds", tenant=b.name)
            assert age_a >= 1.0 > age_b >= 0
            for tenant, version in versions.items():
                assert samples(text, "agentstudio_bundle_published_version", tenant=tenant) == [version]
            assert samples(text, "agentstudio_queue_ack_pending_calls") == [0]
            assert samples(text, "agentstudio_queue_oldest_unacked_age_seconds")[0] >= 1.0  # no dialer yet

            # A dialer takes A's first two calls from the dialers' consumer: places one, holds the other.
            sub = await js.pull_subscribe(bus.DISPATCH_ALL, durable=bus.DISPATCH_CONSUMER, stream=bus.CALLS_STREAM,
                                          config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, max_deliver=-1))
            first, second = await sub.fetch(2, timeout=5)
            await first.ack_sync()
            await metrics.refresh(store, [])
            text = metrics.render().decode()
            assert samples(text, "agentstudio_queue_pending_calls", tenant=a.name) == [1]
            assert samples(text, "agentstudio_queue_pending_calls", tenant=b.name) == [1]
            assert samples(text, "agentstudio_queue_ack_pending_calls") == [1]
            assert samples(text, "agentstudio_queue_oldest_unacked_age_seconds")[0] >= 1.0  # the one held
            await second.ack_sync()
            await metrics.refresh(store, [b.name])  # an operator serving B only
            text = metrics.render().decode()
            assert samples(text, "agentstudio_queue_pending_calls", tenant=a.name) == []
            assert samples(text, "agentstudio_queue_pending_calls", tenant=b.name) == [1]
            assert samples(text, "agentstudio_queue_ack_pending_calls") == [0]
            # Nothing after the ack floor is older than A's third call, queued with the first two.
            assert samples(text, "agentstudio_queue_oldest_unacked_age_seconds")[0] >= 1.0
        finally:
            await nc.close()


@pytest.fixture(scope="module")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[controlplane.ControlPlane]:
    plane = controlplane.start(tmp_path_factory.mktemp("controlplane"))
    yield plane
    plane.stop()


async def test_the_operator_serves_its_reconcile_errors_queue_and_bundle_versions(
        control_plane: controlplane.ControlPlane, tmp_path: Path) -> None:
    ns = f"t-{uuid.uuid4().hex[:8]}"
    control_plane.tenant_namespace(ns)
    port = free_port()
    agent = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Agent", "metadata": {"name": "a"}, "spec": {"prompt": "hi"}}
    # A NATS of its own, to take away from the operator while it reconciles.
    server = NatsServer(tmp_path / "nats", port=free_port())
    server.start()
    cluster = Cluster(control_plane, server, tmp_path / "operator.log", [ns])
    cluster.start_operator(AGENTSTUDIO_OPERATOR_METRICS_PORT=str(port), AGENTSTUDIO_HOST="127.0.0.1",
                           AGENTSTUDIO_METRICS_REFRESH_SECONDS="0.2")
    try:
        cluster.apply(ns, [agent])
        cluster.wait_ready(ns, "Agent", "a")
        nc = await bus.connect(server.url, "test-operator-metrics")
        try:
            js = nc.jetstream()
            await bus.ensure_calls_stream(js)
            version = (await (await buckets(js)).heads.get(ns)).revision
            await queue_backlog(js, ns, 2)
        finally:
            await nc.close()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as scrape:
            async def read(check) -> str | None:  # type: ignore[no-untyped-def]
                deadline = asyncio.get_running_loop().time() + 30
                while True:
                    assert cluster.proc is not None and cluster.proc.poll() is None, cluster.log.read_text()[-3000:]
                    try:
                        text = (await scrape.get("/metrics")).text
                        if check(text):
                            return text
                    except httpx.TransportError:
                        pass
                    assert asyncio.get_running_loop().time() < deadline, cluster.log.read_text()[-3000:]
                    await asyncio.sleep(0.2)

            text = await read(lambda t: samples(t, "agentstudio_queue_pending_calls", tenant=ns) == [2])
            assert samples(text, "agentstudio_bundle_published_version", tenant=ns) == [version]
            assert total(text, "agentstudio_operator_reconciles_total", tenant=ns) >= 1
            assert samples(text, "agentstudio_operator_reconcile_errors_total", tenant=ns) == [0]

            server.stop()  # the bundle cannot be published: the reconcile fails, and is retried
            cluster.apply(ns, [{**agent, "spec": {"prompt": "hello"}}])
            await read(lambda t: total(t, "agentstudio_operator_reconcile_errors_total", tenant=ns) >= 1)
            server.start()
            cluster.wait_ready(ns, "Agent", "a")  # published once NATS is back
    finally:
        cluster.stop_operator()
        server.stop()
