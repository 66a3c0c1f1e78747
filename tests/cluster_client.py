"""What a campaign platform and a dashboard user do against a tenant in the test node, run INSIDE the
node's network namespace (`node.python(__file__, ...)`, where Service names resolve): post calls the
way a platform retries them, and read calls back. Prints one JSON document on stdout.

    cluster_client.py post BASE KEY BODY [--count N] [--rate R] [--until-file PATH] [--prefix P]
    cluster_client.py calls BASE KEY CALL_ID...
    cluster_client.py status BASE KEY BODY       (one POST, no retry: its status code)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx

INGEST = "/api/v1/webhooks/ingest"
GIVE_UP_SECONDS = 120  # a platform retries for minutes; the tests never need as long


def post(base: str, key: str, body: dict[str, Any], count: int, rate: float, until: Path | None,
         prefix: str) -> dict[str, Any]:
    """Calls at `rate` per second, each with its own Idempotency-Key, retried on 503, 5xx and broken
    connections (as CleverTap or Braze retry) until 201: the count of each answer seen, and the call
    id each key got."""
    answers: dict[str, int] = {}
    accepted: dict[str, str] = {}
    refused: dict[str, int] = {}
    started = time.monotonic()
    with httpx.Client(base_url=base, timeout=10, headers={"Authorization": f"Bearer {key}"}) as http:
        n = 0
        while (n < count) if until is None else not until.exists():
            idem = f"{prefix}-{n}"
            give_up = time.monotonic() + GIVE_UP_SECONDS
            while True:
                try:
                    resp = http.post(INGEST, json=body, headers={"Idempotency-Key": idem})
                    answer = str(resp.status_code)
                except httpx.TransportError as exc:
                    resp, answer = None, type(exc).__name__
                answers[answer] = answers.get(answer, 0) + 1
                if resp is not None and resp.status_code in (200, 201):
                    accepted[idem] = resp.json()["call_id"]
                    break
                if (resp is not None and resp.status_code < 500) or time.monotonic() > give_up:
                    refused[idem] = resp.status_code if resp is not None else 0
                    break
                time.sleep(0.2)
            n += 1
            time.sleep(max(0.0, started + n / rate - time.monotonic()))
    return {"answers": answers, "accepted": accepted, "refused": refused,
            "seconds": round(time.monotonic() - started, 2)}


def calls(base: str, key: str, ids: list[str]) -> dict[str, Any]:
    """Each call's record; over the key's rate limit (a test polling 80 calls every 2 s is), it waits
    as told by Retry-After, as a dashboard would, instead of reporting the 429 as the call's state."""
    out: dict[str, Any] = {}
    give_up = time.monotonic() + GIVE_UP_SECONDS
    with httpx.Client(base_url=base, timeout=10, headers={"Authorization": f"Bearer {key}"}) as http:
        for call_id in ids:
            while True:
                resp = http.get(f"/api/v1/calls/{call_id}")
                if resp.status_code != 429 or time.monotonic() > give_up:
                    break
                time.sleep(min(10.0, float(resp.headers.get("Retry-After") or 1)))
            out[call_id] = resp.json() if resp.status_code == 200 else {"http_status": resp.status_code}
    return out


def status(base: str, key: str, body: dict[str, Any]) -> dict[str, Any]:
    resp = httpx.post(base + INGEST, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=10)
    return {"status": resp.status_code, "body": resp.text[:500]}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("post")
    p.add_argument("base"), p.add_argument("key"), p.add_argument("body", type=json.loads)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--rate", type=float, default=5.0)
    p.add_argument("--until-file", type=Path)
    p.add_argument("--prefix", default="call")
    p = sub.add_parser("calls")
    p.add_argument("base"), p.add_argument("key"), p.add_argument("ids", nargs="+")
    p = sub.add_parser("status")
    p.add_argument("base"), p.add_argument("key"), p.add_argument("body", type=json.loads)
    args = parser.parse_args(argv)
    if args.command == "post":
        result = post(args.base, args.key, args.body, args.count, args.rate, args.until_file, args.prefix)
    elif args.command == "calls":
        result = calls(args.base, args.key, args.ids)
    else:
        result = status(args.base, args.key, args.body)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
