"""bench/console: the console's calls page (its first page and its counts by status) with N calls in
one tenant's retention window, server time (the app in process, no network), beside the calls API's
first page (plain, by status, by a sparse metadata value) in the same run; and what the calls table
costs a replica started on that week: the time to build it from the stream and its size on disk.
Each time is also given as a ratio to reading one call by id in the same run (the floor of any read).

Calls are written as a week of real traffic leaves them: the request on its dispatch subject and,
for 9 in 10, a finished state (completed or failed) in the calls bucket; the rest wait (pending).

    .venv/bin/python bench/console.py [--calls 10000 100000] [--requests 20]

Prints JSON and writes bench/results/console.json. Not a test: nothing asserts on it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import nats.errors
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import Tenant, docs, ingest_client, wait_for_bundle  # noqa: E402
from latency import summary  # noqa: E402
import report  # noqa: E402

from agentstudio import bus  # noqa: E402
from agentstudio.calls import CallRequest  # noqa: E402
from agentstudio.callstate import CallEvent, CallState  # noqa: E402
from agentstudio.natsserver import NatsServer  # noqa: E402

MANIFESTS = """
apiVersion: agentstudio.io/v1alpha1
kind: Agent
metadata: {name: a}
spec: {prompt: "Hello"}
---
apiVersion: agentstudio.io/v1alpha1
kind: ApiKey
metadata: {name: reader}
spec: {scopes: ["calls:read"], mode: live, rateLimitPerMinute: 1000000}
"""
BATCH = 1000


async def populate(js: Any, tenant: str, count: int) -> float:
    """`count` calls over the last six days, oldest first; seconds taken."""
    kv = await bus.calls_bucket(js)
    start = time.perf_counter()
    first = datetime.now(timezone.utc) - timedelta(days=6)
    step = timedelta(days=6) / count

    async def one(i: int) -> None:
        created = first + step * i
        call = CallRequest(call_id=str(uuid.uuid4()), tenant=tenant, api_key="reader", agent_slug="a",
                           phone_number="+14155552671", user_context={}, metadata={"campaign_id": f"c{i % 10}",
                                                              "batch": "rare" if i % 10_000 == 5 else "common"},
                           test=False, created_at=created,
                           bundle_version=1)
        await _retried(lambda: js.publish(bus.dispatch_subject(tenant, call.call_id), call.model_dump_json().encode(),
                                          stream=bus.CALLS_STREAM, headers={"Nats-Msg-Id": call.call_id}))
        if i % 10:
            status = "completed" if i % 10 < 8 else "failed"
            state = CallState(call_id=call.call_id, tenant=tenant, status=status, ended_at=created, duration_seconds=30,
                              events=[CallEvent(status="pending", at=created), CallEvent(status=status, at=created)])
            await _retried(lambda: kv.put(f"{tenant}.{call.call_id}", orjson.dumps(state.model_dump(mode="json"))))

    for lo in range(0, count, BATCH):
        await asyncio.gather(*(one(i) for i in range(lo, min(count, lo + BATCH))))
    return time.perf_counter() - start


async def _retried(publish: Any) -> None:
    """A publish that timed out on a busy machine, sent again (the message id or the key makes it once)."""
    for _ in range(5):
        try:
            await publish()
            return
        except nats.errors.TimeoutError:
            await asyncio.sleep(1)
    await publish()


async def timed(client: httpx.AsyncClient, url: str, requests: int, **kw: Any) -> dict[str, float]:
    """Server time of `requests` GETs."""
    took = []
    for _ in range(requests):
        start = time.perf_counter()
        resp = await client.get(url, **kw)
        took.append(time.perf_counter() - start)
        assert resp.status_code == 200, resp.text[:300]
    return summary(took, (95,))


async def run(sizes: list[int], requests: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for size in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            server = NatsServer(Path(tmp))
            server.start()
            try:
                async with ingest_client(server.url) as (client, svc):
                    tenant = Tenant(f"t-{uuid.uuid4().hex[:8]}", svc.js, docs(MANIFESTS))
                    bundle = await tenant.publish()
                    await wait_for_bundle(svc, tenant.name, bundle.version)
                    populated = await populate(svc.js, tenant.name, size)
                    lag = time.perf_counter()
                    await svc.table.caught_up(svc.js, timeout=3600)
                    lag = time.perf_counter() - lag
                    signed_in = await client.post("/console/sign-in", data={"key": tenant.keys["reader"]})
                    assert signed_in.status_code == 303, signed_in.text
                    auth = tenant.auth("reader")
                    results[str(size)] = {
                        "populate_seconds": round(populated, 1),
                        "table_behind_after_populate_seconds": round(lag, 2),
                        "console_calls_page": await timed(client, "/console/calls", requests),
                        "console_calls_page_metadata_filter": await timed(
                            client, "/console/calls?metadata=campaign_id%3Dc3", requests),
                        "console_calls_page_failed": await timed(client, "/console/calls?status=failed", requests),
                        "api_first_page_25": await timed(client, "/api/v1/calls?limit=25", requests, headers=auth),
                        "api_first_page_25_pending": await timed(
                            client, "/api/v1/calls?limit=25&status=pending", requests, headers=auth),
                        # one call in 10,000 carries this value: a page that must look far for its 25
                        "api_first_page_25_rare_metadata": await timed(
                            client, "/api/v1/calls?limit=25&metadata.batch=rare", requests, headers=auth),
                        "table_mib": round(sum(p.stat().st_size for p in
                                               svc.table.path.parent.glob(svc.table.path.name + "*")) / 2**20, 1),
                    }
                    # A replica started now builds its table from the stream and the bucket.
                    start = time.perf_counter()
                    async with ingest_client(server.url) as (_, later):
                        built = time.perf_counter() - start
                        await later.table.caught_up(later.js, timeout=3600)
                        results[str(size)]["replica_start_seconds"] = round(built, 2)
                        results[str(size)]["replica_table_built_seconds"] = round(time.perf_counter() - start, 2)
                    # The baseline: reading one call by id (a stream get and a KV get), the floor of any read.
                    one = await client.get("/api/v1/calls?limit=1", headers=auth)
                    floor = await timed(client, f"/api/v1/calls/{one.json()['data'][0]['call_id']}", requests,
                                        headers=auth)
                    results[str(size)]["baseline_read_one_call"] = floor
                    results[str(size)]["ratio_p95_to_baseline"] = {
                        name: round(r["p95_ms"] / floor["p95_ms"], 1) for name, r in results[str(size)].items()
                        if isinstance(r, dict) and "p95_ms" in r and name != "baseline_read_one_call"}
                    print(json.dumps({size: results[str(size)]}), flush=True)
            finally:
                server.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--requests", type=int, default=20)
    args = parser.parse_args()
    results = asyncio.run(run(args.calls, args.requests))
    report.save("console", results)


if __name__ == "__main__":
    main()
