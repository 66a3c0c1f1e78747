"""bench/queue_metrics: what the operator's read of the dispatch queue costs (OperatorMetrics.refresh:
the published bundle versions and each tenant's undelivered calls and oldest age, on a timer), at
1, 10 and 100 tenants each with a backlog, against a baseline measured in the same run on the same
nats-server: one `consumer_info` of the dialers' consumer per tenant, the cheapest JetStream read a
per-tenant figure could take. Also the share of the refresh interval (15 s by default) one read takes.

    .venv/bin/python bench/queue_metrics.py [--tenants 1,10,100] [--backlog 50] [--rounds 5]

Prints JSON and writes bench/results/queue_metrics.json. Not a test: nothing asserts on it.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import report  # noqa: E402
from backlog import queue_backlog  # noqa: E402

from agentstudio import bundle_store, bus  # noqa: E402
from agentstudio.natsserver import NatsServer  # noqa: E402
from agentstudio.operator.main import empty_bundle  # noqa: E402
from agentstudio.operator.metrics import OperatorMetrics  # noqa: E402
from agentstudio.settings import Settings  # noqa: E402
from nats.js.api import AckPolicy, ConsumerConfig  # noqa: E402


async def timed(fn: Any, rounds: int) -> float:
    """Median milliseconds of `rounds` awaits of fn()."""
    took = []
    for _ in range(rounds):
        start = time.perf_counter()
        await fn()
        took.append((time.perf_counter() - start) * 1000)
    return sorted(took)[len(took) // 2]


async def main(args: argparse.Namespace) -> dict[str, Any]:
    results = []
    with tempfile.TemporaryDirectory() as folder, NatsServer(Path(folder)) as server:
        nc = await bus.connect(server.url, "bench-queue-metrics")
        js = nc.jetstream()
        await bus.ensure_calls_stream(js)
        store = await bundle_store.buckets(js)
        # The dialers' consumer, having taken nothing yet: every call queued is undelivered.
        await js.pull_subscribe(bus.DISPATCH_ALL, durable=bus.DISPATCH_CONSUMER, stream=bus.CALLS_STREAM,
                                config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, max_deliver=-1))
        tenants: list[str] = []
        for count in args.tenants:
            while len(tenants) < count:
                tenant = f"t-{uuid.uuid4().hex[:10]}"
                await bundle_store.publish(store, empty_bundle(tenant))
                await queue_backlog(js, tenant, args.backlog)
                tenants.append(tenant)
            metrics = OperatorMetrics()
            ours = await timed(lambda: metrics.refresh(store, []), args.rounds)

            async def baseline() -> None:
                for _ in tenants:
                    await js.consumer_info(bus.CALLS_STREAM, bus.DISPATCH_CONSUMER)

            base = await timed(baseline, args.rounds)
            results.append({"tenants": count, "backlog_per_tenant": args.backlog, "refresh_ms": round(ours, 2),
                            "baseline_consumer_info_per_tenant_ms": round(base, 2), "ratio": round(ours / base, 2),
                            "refresh_ms_per_tenant": round(ours / count, 3),
                            "share_of_refresh_interval": round(ours / 1000 / Settings().metrics_refresh_seconds, 5)})
        await nc.close()
    return {"bench": "queue_metrics", "rounds": args.rounds, "results": results}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tenants", type=lambda s: [int(x) for x in s.split(",")], default=[1, 10, 100])
    parser.add_argument("--backlog", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    result = asyncio.run(main(parser.parse_args()))
    report.save("queue_metrics", result)
