"""bench/cluster: ingest at half its max rate against a three-node JetStream cluster (R3) and against
one nats-server (R1), both in this run with one uvicorn worker each and the same load generator
(vegeta); then the leader of CALLS killed under a steady load: how long ingest answered 503, and how
long until it answered 201 again.

    .venv/bin/python bench/cluster.py [--seconds 10] [--connections 32]

Prints JSON and writes bench/results/cluster.json. Not a test: nothing asserts on it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from ingest import BODIES, publish_tenant, serve  # noqa: E402
from loadgen import attack  # noqa: E402

from agentstudio import bus, keys  # noqa: E402
from agentstudio.natsserver import NatsCluster, NatsServer, free_port  # noqa: E402

INGEST = "/api/v1/webhooks/ingest"


def start_ingest(nats_url: str, tmp: Path, name: str) -> tuple[str, object]:
    port = free_port()
    env = {**os.environ, "AGENTSTUDIO_NATS_URL": nats_url, "AGENTSTUDIO_HOST": "127.0.0.1",
           "AGENTSTUDIO_PORT": str(port), "AGENTSTUDIO_LOG_LEVEL": "WARNING",
           "AGENTSTUDIO_CALLS_INDEX_DIR": str(tmp / f"calls-{name}")}
    proc = serve([str(Path(sys.executable).parent / "agent-studio"), "ingest", "--workers", "1"], env,
                 f"http://127.0.0.1:{port}/readyz", tmp / f"ingest-{name}.log")
    return f"http://127.0.0.1:{port}{INGEST}", proc


async def calls_leader(nats_url: str) -> str:
    nc = await bus.connect(nats_url, "bench")
    try:
        info = await nc.jetstream().stream_info(bus.CALLS_STREAM)
        assert info.cluster is not None and info.cluster.leader
        return info.cluster.leader
    finally:
        await nc.close()


def leader_kill(cluster: NatsCluster, url: str, headers: dict[str, str], rate: float) -> dict[str, float]:
    """A platform posting `rate` calls a second, each retried with its Idempotency-Key until 201;
    the leader of CALLS SIGKILLed 3 s in."""
    answers: list[tuple[float, int]] = []
    stop = threading.Event()

    def post() -> None:
        with httpx.Client(timeout=10, headers=headers) as http:
            n = 0
            while not stop.is_set():
                while not stop.is_set():
                    try:
                        status = http.post(url, json=BODIES[n % len(BODIES)],
                                           headers={"Idempotency-Key": f"kill-{n}"}).status_code
                    except httpx.TransportError:
                        status = 0
                    answers.append((time.monotonic(), status))
                    if status in (200, 201):
                        break
                    time.sleep(0.1)
                n += 1
                time.sleep(1 / rate)

    poster = threading.Thread(target=post)
    poster.start()
    time.sleep(3)
    leader = asyncio.run(calls_leader(cluster.url))
    killed = time.monotonic()
    cluster.node(leader).stop(kill=True)
    time.sleep(20)
    stop.set()
    poster.join()
    failed = [t for t, s in answers if t >= killed and s not in (200, 201)]
    back = next((t for t, s in answers if t > killed and s in (200, 201) and (not failed or t > failed[0])), None)
    cluster.restart(cluster.node(leader))
    return {
        "first_503_after_kill_s": round(failed[0] - killed, 2) if failed else 0.0,
        "unavailable_s": round(back - failed[0], 2) if failed and back else 0.0,
        "201_again_after_kill_s": round(back - killed, 2) if back else -1.0,
        "answers_not_201": len(failed),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()

    key = keys.generate("live")
    headers = {"Authorization": f"Bearer {key}"}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        with NatsServer(tmp / "single") as single, NatsCluster(tmp / "cluster") as cluster:
            urls, procs = {}, []
            for name, nats_url in (("one node", single.url), ("three nodes", cluster.url)):
                asyncio.run(publish_tenant(nats_url, key))
                urls[name], proc = start_ingest(nats_url, tmp, name.replace(" ", "-"))
                procs.append(proc)
            try:
                peak = {}
                for name, url in urls.items():
                    attack(url, BODIES, headers, seconds=2, workers=args.connections)  # warm-up
                    peak[name] = attack(url, BODIES, headers, seconds=args.seconds, workers=args.connections)
                # The same offered load for both: half what ingest on one node reached.
                half = max(1, int(peak["one node"].rate / 2))
                at_half = {name: attack(url, BODIES, headers, seconds=args.seconds, rate=half,
                                        workers=args.connections) for name, url in urls.items()}
                kill = leader_kill(cluster, urls["three nodes"], headers, rate=20)
            finally:
                for proc in procs:
                    proc.terminate()  # type: ignore[attr-defined]
                    proc.wait(timeout=10)  # type: ignore[attr-defined]
    out = {
        "connections": args.connections,
        "seconds": args.seconds,
        "half_rate": half,
        "max": {name: asdict(r) for name, r in peak.items()},
        "at_half_rate": {name: asdict(r) for name, r in at_half.items()},
        "calls_leader_killed_at_20_per_s": kill,
    }
    print(json.dumps(out, indent=2))
    results_dir = ROOT / "bench" / "results"
    results_dir.mkdir(exist_ok=True)
    (results_dir / "cluster.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
