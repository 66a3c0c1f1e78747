"""bench/sweep: what a dialer's read of the call records costs, as its takeover walk and its stale-call
sweep make it (agentstudio.callstate.unfinished: one pass over the `as-calls` bucket, only records not
finished with parsed), against two baselines measured in the same run on the same nats-server:

- `get per key`: the read it replaces, the keys listed from the stream's subject index and each record
  got by key (it also lists at most 100,000 keys, so it stops being correct past that);
- `raw pass`: the same consumer fetching every record and doing nothing with it, the floor for any read
  of the whole bucket.

Records are a week of calls as dialers leave them: nearly all ended (1 in 1,000 still live), with a
handful of timeline events each.

    .venv/bin/python bench/sweep.py [--records 10000,50000] [--rounds 3]

Prints JSON and writes bench/results/sweep.json. Not a test: nothing asserts on it.
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
from agentstudio.callstate import unfinished  # noqa: E402
from agentstudio.natsserver import NatsServer  # noqa: E402

LIVE_EVERY = 1000


def record(i: int) -> bytes:
    at = "2026-12-01T10:00:00+00:00"
    status = "in_progress" if i % LIVE_EVERY == 0 else "completed"
    return orjson.dumps({
        "call_id": f"c-{i:07d}", "tenant": "t", "status": status, "dialer": "d-1", "provider": "twilio",
        "provider_call_id": f"CA{i:032d}", "attempts": 1, "duration_seconds": 42, "conversation": "closed",
        "end_reason": "end_call", "transcript_turns": 12,
        "events": [{"status": s, "at": at} for s in ("pending", "dialing", "ringing", "in_progress", status)]})


async def fill(js: Any, upto: int, have: int) -> None:
    sent = asyncio.Semaphore(512)

    async def put(i: int) -> None:
        async with sent:
            await js.publish(f"$KV.{bus.CALLS_BUCKET}.t.c-{i:07d}", record(i))

    await asyncio.gather(*(put(i) for i in range(have, upto)))


async def per_key(js: Any) -> int:
    kv = await bus.calls_bucket(js)
    found = 0
    for key in await bus.kv_keys(js, bus.CALLS_BUCKET, ""):
        if orjson.loads((await kv.get(key)).value)["status"] == "in_progress":
            found += 1
    return found


async def raw_pass(js: Any) -> int:
    count = 0
    async with contextlib.aclosing(bus.kv_values(js, bus.CALLS_BUCKET)) as records:
        async for _ in records:
            count += 1
    return count


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
        nc = await bus.connect(server.url, "bench-sweep")
        js = nc.jetstream()
        await bus.calls_bucket(js)
        have = 0
        for n in args.records:
            await fill(js, n, have)
            have = n
            raw, seen = await timed(lambda: raw_pass(js), args.rounds)
            ours, live = await timed(lambda: unfinished(js), args.rounds)
            old, old_live = await timed(lambda: per_key(js), args.rounds)
            assert seen == n and len(live) == old_live == -(-n // LIVE_EVERY), (seen, len(live), old_live)
            rows.append({"records": n, "unfinished_s": round(ours, 3), "per_key_s": round(old, 3),
                         "raw_pass_s": round(raw, 3), "per_key_over_ours": round(old / ours, 1),
                         "ours_over_raw_pass": round(ours / raw, 2),
                         "records_per_s": round(n / ours)})
        await nc.close()
    return {"rounds": args.rounds, "live_every": LIVE_EVERY, "rows": rows}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=lambda s: [int(x) for x in s.split(",")], default=[10_000, 50_000])
    parser.add_argument("--rounds", type=int, default=3)
    report.save("sweep", asyncio.run(main(parser.parse_args())))
