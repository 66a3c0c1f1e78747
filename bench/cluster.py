"""bench/cluster: ingest at half its max rate against a three-node JetStream cluster (R3) and against
one nats-server (R1), both in this run with one uvicorn worker each and the same load generator
(vegeta); then the leader of CALLS killed under a steady load: how long ingest answered 503, and how
long until it answered 201 again.

Then the whole pipeline on a fresh three-node cluster (ingest, two dialers, webhooks to a live
receiver) under 20 calls/s: a node killed and restarted, then the leader of CALLS killed; how long
until ingest, dialers and webhooks work again, and what was redelivered, retried, dead-lettered or
done twice, against a baseline of the same load with nothing killed in the same run.

    .venv/bin/python bench/cluster.py [--seconds 10] [--connections 32] [--after-kill 10] [--faults-only]

Prints JSON and writes bench/results/cluster.json. Not a test: nothing asserts on it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import orjson
from nats.errors import Error as NatsError
from nats.js import JetStreamContext

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import Tenant, docs  # noqa: E402
import report  # noqa: E402
from ingest import BODIES, publish_tenant, serve  # noqa: E402
from jetstream_cluster import every_replica_current, leader_of  # noqa: E402
from load import INGEST, Load  # noqa: E402
from loadgen import attack  # noqa: E402
from test_dialer import MANIFESTS, dialers  # noqa: E402
from test_webhooks import OPS_KEY, Receiver, serving, subscription  # noqa: E402

from agentstudio import bus, keys, signing  # noqa: E402
from agentstudio.callstate import CallStore  # noqa: E402
from agentstudio.dialer import main as dialer_main  # noqa: E402
from agentstudio.dialer.webhooks import FANOUT_CONSUMER  # noqa: E402
from agentstudio.dialer.worker import CONSUMER, Dialer  # noqa: E402
from agentstudio.natsserver import NatsCluster, NatsServer, free_port  # noqa: E402
from agentstudio.secrets import StaticSecrets  # noqa: E402
from agentstudio.settings import Settings  # noqa: E402

log = logging.getLogger("bench")  # marks the steps in bench/results/cluster.log, between the roles' lines


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

# --- The whole pipeline under faults: ingest, two dialers, webhooks to a live receiver -------------

RATE = 20.0  # calls a second: a platform's steady campaign, as in tests/test_nats_cluster.py
WEBHOOK_SCHEDULE = "0,1,2,4,8,16"  # the default's first steps are minutes apart: too long for a bench
SETTLE_SECONDS = 180.0  # the bound on "every accepted call final and its webhooks delivered"


OK = ("200", "201")


@dataclass
class Phase:
    """One tenant's share of the run: its subscription's receiver, its load, what the dialers and
    the receiver saw of its calls and when."""

    name: str
    tenant: Tenant
    receiver: Receiver
    load: Load | None = None
    delivered: dict[str, int] = field(default_factory=dict)  # dispatch subject → highest num_delivered
    placed_at: dict[str, float] = field(default_factory=dict)  # call id → when a dialer first placed it
    webhook_at: dict[str, float] = field(default_factory=dict)  # call id → its first 2xx-answered webhook
    redelivered_max: int = 0  # the dialers' consumer's num_redelivered, the highest sampled


def observe(running: list[Dialer], phases: list[Phase]) -> None:
    """Note the delivery count of each dispatch message the dialers handle (JetStream's own
    num_delivered), per phase by the tenant in its subject."""
    by_tenant = {p.tenant.name: p for p in phases}
    for dialer in running:
        handle = dialer.handle

        async def observed(msg, handle=handle):  # type: ignore[no-untyped-def]
            phase = by_tenant.get(msg.subject.split(".")[1])
            if phase is not None:
                phase.delivered[msg.subject] = max(phase.delivered.get(msg.subject, 0), msg.metadata.num_delivered)
            await handle(msg)

        dialer.handle = observed  # type: ignore[method-assign]


async def watch(running: list[Dialer], phase: Phase, js: JetStreamContext) -> None:
    """Stamp each call's first placing and first webhook as they happen, and, apart (a consumer
    info waits while a leader is elected), sample the dialers' consumer's redelivery count:
    JetStream counts only what is still unacknowledged, so its highest is what it reports."""

    async def stamp() -> None:
        seen = 0
        while True:
            for dialer in running:
                for call_id in dialer.simulated.placed:  # type: ignore[attr-defined]
                    phase.placed_at.setdefault(call_id, time.monotonic())
            received = phase.receiver.received
            for got in received[seen:]:
                phase.webhook_at.setdefault(got["event"]["data"]["call_id"], time.monotonic())
            seen = len(received)
            await asyncio.sleep(0.02)

    async def sample() -> None:
        while True:
            try:
                info = await js.consumer_info(bus.CALLS_STREAM, CONSUMER, timeout=1)
                phase.redelivered_max = max(phase.redelivered_max, info.num_redelivered or 0)
            except (NatsError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(0.5)

    await asyncio.gather(stamp(), sample())


async def settle(js: JetStreamContext, phase: Phase, running: list[Dialer],
                 bound: float = SETTLE_SECONDS) -> dict[str, object]:
    """Wait (bounded) until every accepted call is final and every webhook for it is delivered or
    dead-lettered; then count what each part did twice, retried or gave up."""
    assert phase.load is not None
    tenant = phase.tenant.name
    deadline = time.monotonic() + bound
    store = CallStore(await bus.calls_bucket(js))
    ids = set(phase.load.accepted.values())
    statuses: dict[str, str] = {}
    while len(statuses) < len(ids) and time.monotonic() < deadline:
        for call_id in ids - set(statuses):
            try:
                state = await store.get(tenant, call_id)
            except (NatsError, asyncio.TimeoutError):
                break
            if state is not None and state.terminal:
                statuses[call_id] = state.status
        await asyncio.sleep(0.5)
    # Events fanned out and each subscription's deliveries acknowledged (a retry waits unacknowledged).
    consumers = ((bus.EVENTS_STREAM, FANOUT_CONSUMER), (bus.WEBHOOKS_STREAM, f"wh-{tenant}-results"))
    records: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        try:
            infos = [await js.consumer_info(s, c) for s, c in consumers]
            if all(i.num_pending == 0 and i.num_ack_pending == 0 for i in infos):
                kv = await bus.deliveries_bucket(js)
                keys = await bus.kv_keys(js, bus.DELIVERIES_BUCKET, f"{tenant}.")
                records = [orjson.loads((await kv.get(k)).value) for k in keys]
                if all(r["state"] in ("delivered", "dead_lettered") for r in records):
                    break
        except (NatsError, asyncio.TimeoutError):
            pass
        await asyncio.sleep(0.5)
    await bus.ensure_webhooks(js)
    webhook_dead = await bus.kv_keys(js, bus.DEAD_LETTER_BUCKET, f"{tenant}.")
    calls_info = await js.stream_info(bus.CALLS_STREAM, subjects_filter=bus.dead_subject(tenant, "*"))
    placed = Counter(c for d in running for c in d.simulated.placed)  # type: ignore[attr-defined]
    received = Counter(r["id"] for r in phase.receiver.received)
    return {
        "calls_accepted": len(ids),
        "final": dict(Counter(statuses.values())),
        "not_final_after_bound": len(ids) - len(statuses),
        "calls_placed_more_than_once": sum(1 for c in ids if placed[c] > 1),
        "calls_never_placed": sum(1 for c in ids if placed[c] == 0),
        "dispatch_redelivered_max_sampled": phase.redelivered_max,
        "dispatch_messages_delivered_more_than_once": sum(1 for n in phase.delivered.values() if n > 1),
        "dispatch_most_deliveries_of_one_message": max(phase.delivered.values(), default=0),
        "dispatch_dead_letters": sum((calls_info.state.subjects or {}).values()),
        "webhook_deliveries": len(records),
        "webhook_deliveries_not_settled": sum(1 for r in records if r["state"] not in ("delivered", "dead_lettered")),
        # A delivery's record holds its last attempt's num_delivered: beyond 1, JetStream delivered it
        # again, after an attempt that failed or one whose ack was lost (the receiver then sees it twice).
        "webhook_deliveries_redelivered": sum(1 for r in records if attempts(r) > 1),
        "webhook_redeliveries": sum(attempts(r) - 1 for r in records),
        # The receiver is always up and answers 2xx: an attempt it never saw is one that failed.
        "webhook_attempts_failed": sum(attempts(r) for r in records) - len(phase.receiver.attempts),
        "webhook_dead_letters": len(webhook_dead),
        "webhook_ids_received_more_than_once": sum(1 for n in received.values() if n > 1),
    }


def attempts(record: dict[str, object]) -> int:
    return int(record["attempts"])  # type: ignore[call-overload]


def since(kill: float, at: dict[str, float], accepted_at: dict[str, float]) -> float:
    """Seconds from `kill` to the first of `at` for a call accepted after it (-1: none)."""
    after = [at[c] for c, t in accepted_at.items() if t > kill and c in at]
    return round(min(after) - kill, 2) if after else -1.0


async def under_faults(cluster: NatsCluster, js: JetStreamContext, phase: Phase, running: list[Dialer],
                       after_kill: float) -> tuple[dict[str, object], float]:
    """Load; a node that does not lead CALLS killed and restarted; once every replica is current
    again, the leader of CALLS killed; load kept `after_kill` s; then every call settled."""
    assert phase.load is not None
    load, stop = phase.load, asyncio.Event()
    watching = asyncio.create_task(watch(running, phase, js))
    loading = asyncio.create_task(load.run(stop))
    started = time.monotonic()
    figures: dict[str, object] = {}
    await asyncio.sleep(3)
    leader = await leader_of(js, bus.CALLS_STREAM)
    follower = next(n for n in cluster.nodes if n.name != leader)
    node_killed = time.monotonic()
    log.warning("killing %s, not the leader of CALLS", follower.name)
    follower.stop(kill=True)
    await asyncio.sleep(2)
    restarted = time.monotonic()
    await asyncio.to_thread(cluster.restart, follower)
    figures["node_restart_to_healthy_s"] = round(time.monotonic() - restarted, 2)
    figures["replicas_current_after_healthy_s"] = round(await every_replica_current(js, 90), 2)
    figures["node_kill_503_s"] = round(load.unavailable(node_killed), 2)

    leader = await leader_of(js, bus.CALLS_STREAM)
    killed = time.monotonic()
    log.warning("killing %s, the leader of CALLS", leader)
    cluster.node(leader).stop(kill=True)
    await asyncio.sleep(after_kill)
    stop.set()
    await loading
    load_seconds = time.monotonic() - started
    await asyncio.to_thread(cluster.restart, cluster.node(leader))
    log.warning("load stopped, %s restarted; settling", leader)
    counts = await settle(js, phase, running)
    watching.cancel()

    failed = next((a.at for a in load.answers if a.at >= killed and a.answer not in OK), None)
    back = next((a.at for a in load.answers if a.at > (failed or killed) and a.answer in OK), None)
    figures.update({
        "leader_kill_503_s": round(load.unavailable(killed), 2),
        "leader_kill_answers_not_201": sum(1 for a in load.answers if a.at >= killed and a.answer not in OK),
        "201_again_after_kill_s": round(back - killed, 2) if back else -1.0,
        "placing_again_after_kill_s": since(killed, phase.placed_at, load.accepted_at),
        "webhook_again_after_kill_s": since(killed, phase.webhook_at, load.accepted_at),
    })
    return {**counts, **figures, "answers": dict(Counter(a.answer for a in load.answers))}, load_seconds


async def without_faults(js: JetStreamContext, phase: Phase, running: list[Dialer], seconds: float) -> dict[str, object]:
    """The same load for as long, nothing killed: what each count is when nothing goes wrong."""
    assert phase.load is not None
    await every_replica_current(js, 90)
    log.warning("baseline: the same load, nothing killed")
    stop = asyncio.Event()
    watching = asyncio.create_task(watch(running, phase, js))
    loading = asyncio.create_task(phase.load.run(stop))
    await asyncio.sleep(seconds)
    stop.set()
    await loading
    counts = await settle(js, phase, running)
    watching.cancel()
    return {**counts, "answers": dict(Counter(a.answer for a in phase.load.answers))}


async def accepting(base: str, tenant: Tenant) -> None:
    """Until ingest has the tenant's bundle (a listing answers 401 before)."""
    async with httpx.AsyncClient(base_url=base, timeout=5) as http, asyncio.timeout(30):
        while (await http.get("/api/v1/calls", headers=tenant.auth("test"))).status_code != 200:
            await asyncio.sleep(0.1)


async def pipeline(tmp: Path, after_kill: float) -> dict[str, object]:
    """Ingest (its own process), two dialers with the simulated provider and two webhook dispatchers
    (in this process, as two dialer processes would run them), a receiver per tenant, on three nodes."""
    with NatsCluster(tmp / "pipeline") as cluster:
        admin = await bus.connect(cluster.url, "bench-admin")
        js = admin.jetstream()
        await bus.ensure_calls_stream(js)
        phases = []
        for name in ("faults", "baseline"):
            receiver = Receiver(signing.new_secret())
            tenant = Tenant(f"{name}-{uuid.uuid4().hex[:8]}", js,
                            docs(MANIFESTS + OPS_KEY + subscription("results", receiver.url)))
            await tenant.publish()
            phases.append(Phase(name, tenant, receiver))
        url, ingest = await asyncio.to_thread(start_ingest, cluster.url, tmp, "pipeline")
        secrets = StaticSecrets({(p.tenant.name, "results-webhook-secret", "secret"): p.receiver.secret for p in phases})
        settings = Settings(nats_url=cluster.url, webhook_retry_schedule=WEBHOOK_SCHEDULE, webhook_timeout_seconds=2)
        stop, conns, delivering, watchers = asyncio.Event(), [], [], []
        try:
            for _ in range(2):
                conns.append(await bus.connect(cluster.url, "bench-webhooks"))
                dispatcher, watcher = await dialer_main.webhooks(conns[-1], settings, secrets)
                watchers.append(watcher)
                delivering.append(asyncio.create_task(dispatcher.run(stop)))
            async with serving(*(p.receiver for p in phases)), \
                    dialers(cluster.url, count=2, max_concurrent_calls_per_tenant=100) as running:
                observe(running, phases)
                for p in phases:
                    await accepting(url.removesuffix(INGEST), p.tenant)
                    p.load = Load([url.removesuffix(INGEST)], p.tenant.keys["test"], RATE, prefix=p.name)
                faults, seconds = await under_faults(cluster, js, phases[0], running, after_kill)
                baseline = await without_faults(js, phases[1], running, seconds)
        finally:
            stop.set()
            await asyncio.gather(*delivering, return_exceptions=True)
            for watcher in watchers:
                await watcher.stop()
            for nc in conns:
                await nc.close()
            await admin.close()
            ingest.terminate()  # type: ignore[attr-defined]
            ingest.wait(timeout=10)  # type: ignore[attr-defined]
    return {"rate_per_s": RATE, "load_seconds": round(seconds, 1), "webhook_retry_schedule": WEBHOOK_SCHEDULE,
            "under_faults": faults, "baseline": baseline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--after-kill", type=float, default=10, help="seconds of load after the leader's kill")
    parser.add_argument("--faults-only", action="store_true", help="only the pipeline under faults and its baseline")
    args = parser.parse_args()
    report.RESULTS.mkdir(exist_ok=True)
    # The in-process dialers' warnings (thousands while a leader is elected) go to a file, not the JSON.
    logging.basicConfig(filename=report.RESULTS / "cluster.log", filemode="w", level=logging.WARNING)
    out: dict[str, object] = {}
    if not args.faults_only:
        out.update(rates_and_leader_kill(args.seconds, args.connections))
    with tempfile.TemporaryDirectory() as tmp_name:
        out["pipeline_under_faults"] = asyncio.run(pipeline(Path(tmp_name), args.after_kill))
    report.save("cluster", out)


def rates_and_leader_kill(seconds: float, connections: int) -> dict[str, object]:
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
                    attack(url, BODIES, headers, seconds=2, workers=connections)  # warm-up
                    peak[name] = attack(url, BODIES, headers, seconds=seconds, workers=connections)
                # The same offered load for both: half what ingest on one node reached.
                half = max(1, int(peak["one node"].rate / 2))
                at_half = {name: attack(url, BODIES, headers, seconds=seconds, rate=half,
                                        workers=connections) for name, url in urls.items()}
                kill = leader_kill(cluster, urls["three nodes"], headers, rate=20)
            finally:
                for proc in procs:
                    proc.terminate()  # type: ignore[attr-defined]
                    proc.wait(timeout=10)  # type: ignore[attr-defined]
    return {
        "connections": connections,
        "seconds": seconds,
        "half_rate": half,
        "max": {name: asdict(r) for name, r in peak.items()},
        "at_half_rate": {name: asdict(r) for name, r in at_half.items()},
        "calls_leader_killed_at_20_per_s": kill,
    }


if __name__ == "__main__":
    main()
