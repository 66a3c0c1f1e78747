"""bench/dead_letters: what reading and replaying a tenant's dead letters costs, against the reads they
replace, measured in the same run on the same nats-server:

- `page`: one page of 50 (agentstudio.bus.kv_after, as GET /api/v1/webhooks/dead-letters reads it), the
  first and the last of the tenant's list, against `old list`: the listing it replaces (the tenant's keys
  from the stream's subject index, each record got by key, all of them in one answer; it also lists at
  most 100,000 keys, so it stops being correct past that);
- `walk`: every dead letter read by pages of 500, against the same `old list`;
- `bulk replay`: the tenant's first 1,000 replayed by one POST .../dead-letters/replay
  (agentstudio.ingest.routes.deliveries.replay_dead_letters), against the same 1,000 replayed one at a
  time as the runbook said before (get, publish, remove each; no HTTP counted for either).

Dead letters are call.completed events of ~1.5 KB, split over two subscriptions, with another tenant's
as many beside them in the bucket.

    .venv/bin/python bench/dead_letters.py [--letters 5000,20000] [--rounds 3]

Prints JSON and writes bench/results/dead_letters.json. Not a test: nothing asserts on it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import report  # noqa: E402

from agentstudio import bus  # noqa: E402
from agentstudio.ingest.routes import deliveries  # noqa: E402
from agentstudio.natsserver import NatsServer  # noqa: E402

PAGE = 50
REPLAYED = 1000


def letter(tenant: str, i: int) -> tuple[str, bytes]:
    subscription = ("results", "crm")[i % 2]
    event = {"type": "call.completed", "id": f"evt_{i:032d}", "created_at": "2026-12-01T10:00:00+00:00",
             "data": {"call_id": f"c-{i:07d}", "test": False, "metadata": {"campaign_id": "autumn"},
                      "agent_slug": "a", "user_id": f"u-{i}", "duration_seconds": 42,
                      "captured": {"notes": "x" * 1200}}}
    record = {"subscription": subscription, "event": event, "attempts": 9, "last_error": "HTTP 503",
              "failed_at": 1_764_000_000.0 + i}
    return bus.dead_letter_key(tenant, subscription, event["id"]), orjson.dumps(record)


async def fill(js: Any, upto: int, have: int) -> None:
    sent = asyncio.Semaphore(512)

    async def put(tenant: str, i: int) -> None:
        async with sent:
            key, value = letter(tenant, i)
            await js.publish(f"$KV.{bus.DEAD_LETTER_BUCKET}.{key}", value)

    await asyncio.gather(*(put(t, i) for i in range(have, upto) for t in ("t", "other")))


class Service:
    """What the routes' functions use of an IngestService: its JetStream context."""

    def __init__(self, js: Any) -> None:
        self.js = js


async def old_list(js: Any) -> int:
    dead, _ = await bus.ensure_webhooks(js)
    return len([orjson.loads((await dead.get(k)).value) for k in await bus.kv_keys(js, bus.DEAD_LETTER_BUCKET, "t.")])


async def page(js: Any, after: int, limit: int = PAGE) -> tuple[int, int]:
    """The page's length and its last revision, as the route reads and parses it."""
    got, last = 0, after
    async with contextlib.aclosing(bus.kv_after(js, bus.DEAD_LETTER_BUCKET, "t.", after, batch=limit + 1)) as found:
        async for _, value, revision in found:
            if got == limit:
                break
            deliveries._letter(orjson.loads(value))
            got, last = got + 1, revision
    return got, last


async def walk(js: Any) -> int:
    seen, after = 0, 0
    while True:
        got, after = await page(js, after, 500)
        seen += got
        if got < 500:
            return seen


async def one_by_one(svc: Service, keys: list[str]) -> int:
    for key in keys:
        tenant, subscription, event_id = key.split(".")
        await deliveries.replay_dead_letter(svc, tenant, subscription, event_id)  # type: ignore[arg-type]
    return len(keys)


async def timed(fn: Any, rounds: int) -> tuple[float, Any]:
    """Median seconds of `rounds` awaits of fn(), and what the last one returned."""
    took, out = [], None
    for _ in range(rounds):
        start = time.perf_counter()
        out = await fn()
        took.append(time.perf_counter() - start)
    return sorted(took)[len(took) // 2], out


async def main(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    with tempfile.TemporaryDirectory() as folder, NatsServer(Path(folder)) as server:
        nc = await bus.connect(server.url, "bench-dead-letters")
        js = nc.jetstream()
        await bus.ensure_webhooks(js)
        have = 0
        for n in args.letters:
            await fill(js, n, have)
            have = n
            old, listed = await timed(lambda: old_list(js), args.rounds)
            first, (got, _) = await timed(lambda: page(js, 0), args.rounds)
            # The last page: after the revision of the tenant's (n - PAGE)th.
            _, before_last = await page(js, 0, n - PAGE)
            last, (got_last, _) = await timed(lambda: page(js, before_last), args.rounds)
            whole, walked = await timed(lambda: walk(js), args.rounds)
            assert listed == walked == n and got == got_last == PAGE, (listed, walked, got, got_last)
            rows.append({"letters": n, "old_list_s": round(old, 4), "first_page_s": round(first, 4),
                         "last_page_s": round(last, 4), "walk_s": round(whole, 3),
                         "old_list_over_first_page": round(old / first, 1),
                         "old_list_over_last_page": round(old / last, 1), "old_list_over_walk": round(old / whole, 1)})
        # Replays last: they empty what they replay. Each way gets its own 1,000 of the "results" subscription.
        svc = Service(js)
        keys = sorted(await bus.kv_keys(js, bus.DEAD_LETTER_BUCKET, "t.results."))
        start = time.perf_counter()
        await one_by_one(svc, keys[:REPLAYED])
        singles = time.perf_counter() - start
        start = time.perf_counter()
        done = await deliveries.replay_dead_letters(svc, "t", "results", None, None, REPLAYED)  # type: ignore[arg-type]
        bulk = time.perf_counter() - start
        assert done.queued == REPLAYED, done
        await nc.close()
    return {"rounds": args.rounds, "page": PAGE, "rows": rows,
            "replay": {"letters": REPLAYED, "one_by_one_s": round(singles, 3), "bulk_s": round(bulk, 3),
                       "one_by_one_over_bulk": round(singles / bulk, 1)}}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--letters", type=lambda s: [int(x) for x in s.split(",")], default=[5_000, 20_000])
    parser.add_argument("--rounds", type=int, default=3)
    report.save("dead_letters", asyncio.run(main(parser.parse_args())))
