"""Agent Studio installed the way a platform team installs it, on a real node (tests/node.py): our
images imported into containerd, the CRD chart once, then one release per tenant with `helm install
--wait` in namespaces enforcing the restricted Pod Security profile. Then what users rely on: `helm
test`, the seed campaign end to end with a signed webhook to a receiver pod, tenant isolation, a NATS
pod restarted under load, a zero-drop rolling upgrade, a dialer killed mid-batch, and an uninstall that
leaves the other tenant working. The tests share one installation and run in file order."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import standardwebhooks
import yaml

from conftest import SEED_BODY
from installation import CHARTS, Installed, apply_examples, locked_down, placed, prepare, timestamp
from node import Node

TENANTS = ("tenant-a", "tenant-b")
PRESTOP_SECONDS = 5  # the chart's default dialer.preStopSleepSeconds
RECEIVER_URL = "http://receiver.{ns}.svc.cluster.local:8080/hook"
# Values the tests add to the defaults, for the kill test: a dialer that dies holding a call hands it
# back after 10 s rather than a minute, and the slots of the calls it was playing (held until the stale
# sweep: the simulated provider's calls die with their process) leave room under the cap.
ACK_WAIT_SECONDS = 10
TEST_VALUES = ["--set-json", f'extraEnv=[{{"name":"AGENTSTUDIO_DISPATCH_ACK_WAIT_SECONDS","value":"{ACK_WAIT_SECONDS}"}}]',
               "--set", "calls.maxConcurrentPerTenant=50"]

# A webhook receiver in the cluster (our image: no other exists here): every request one JSON line
# on stdout, answered 200. Locked down to pass the restricted profile.
RECEIVER_CODE = """
import http.server, json, sys, threading
said = threading.Lock()  # one whole line per request, whatever the threads do
class Hook(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
        with said:
            sys.stdout.write(json.dumps({"headers": dict(self.headers), "body": body}) + "\\n")
            sys.stdout.flush()
        self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
    def log_message(self, *args): pass
http.server.ThreadingHTTPServer(("", 8080), Hook).serve_forever()
"""

# From a pod of one tenant: connect to a NATS with that tenant's credentials; prints the outcome.
NATS_PROBE_CODE = """
import asyncio, os, sys, nats
async def quiet(exc):  # the verdict below is the one line printed
    pass
async def main():
    try:
        nc = await nats.connect(sys.argv[1], user=os.environ["NATS_USER"], password=os.environ["NATS_PASSWORD"],
                                allow_reconnect=False, connect_timeout=5, max_reconnect_attempts=0,
                                error_cb=quiet)
        await nc.jetstream().account_info()
        print("connected", flush=True)
        await nc.close()
    except Exception as exc:
        print("refused:", type(exc).__name__, exc, flush=True)
asyncio.run(main())
"""


@pytest.fixture(scope="module")
def cluster(node: Node, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    installed = prepare(node, tmp_path_factory.mktemp("volumes"), TEST_VALUES)
    for ns in TENANTS:
        installed.install(ns)
    yield installed
    for ns in installed.tenants:
        node.helm("uninstall", ns, "-n", ns, "--wait")
    node.kubectl("delete", "namespace", *installed.tenants, "--wait=false")
    print(f"\ninstall figures: {json.dumps({k: round(v, 1) for k, v in installed.seconds.items()})}")


def test_two_tenants_install_ready_and_pass_helm_test(cluster: Installed) -> None:
    rss = sum(_rss(pid) for pid in cluster.node.pids())
    print(f"\nmemory: node and two idle tenants {rss / 2**20:.0f} MiB RSS")
    for ns in TENANTS:
        pods = json.loads(cluster.node.kubectl("get", "pods", "-n", ns, "-o", "json"))["items"]
        components = sorted(p["metadata"]["labels"]["app.kubernetes.io/component"] for p in pods)
        assert components == ["dialer", "ingest", "nats", "operator"], components
        for pod in pods:
            ready = {c["type"]: c["status"] for c in pod["status"]["conditions"]}
            assert pod["status"]["phase"] == "Running" and ready["Ready"] == "True", pod["metadata"]["name"]
        out = cluster.node.helm("test", ns, "-n", ns, "--logs", "--timeout", "3m")
        assert "POST /api/v1/webhooks/ingest 201" in out, out


@dataclass
class Campaign:
    """Tenant A with the examples applied and a webhook receiver pod subscribed."""

    key: str  # clevertap's: calls:create
    reader: str  # analytics-readonly's: calls:read
    signing: str  # the subscription's signing secret


@pytest.fixture(scope="module")
def campaign(cluster: Installed) -> Campaign:
    ns = TENANTS[0]
    node = cluster.node
    key, reader = apply_examples(cluster, ns)
    receiver = locked_down({"name": "receiver", "image": cluster.images.image, "imagePullPolicy": "Never",
                            "command": ["python3", "-c", RECEIVER_CODE], "ports": [{"containerPort": 8080}]})
    node.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump_all([
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "receiver", "labels": {"app": "receiver"}},
         "spec": receiver},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "receiver"},
         "spec": {"selector": {"app": "receiver"}, "ports": [{"port": 8080, "targetPort": 8080}]}},
        {"apiVersion": "agentstudio.io/v1alpha1", "kind": "WebhookSubscription", "metadata": {"name": "results"},
         "spec": {"url": RECEIVER_URL.format(ns=ns), "events": ["call.completed", "call.failed"]}},
    ]))
    for kind, name in (("webhooksubscription", "results"), ("pod", "receiver")):
        node.wait_ready(kind, name, ns)
    return Campaign(key=key, reader=reader, signing=cluster.secret(ns, "results-webhook-secret", "secret"))


def test_the_seed_campaign_runs_in_the_cluster(cluster: Installed, campaign: Campaign) -> None:
    ns = TENANTS[0]
    key, reader, signing = campaign.key, campaign.reader, campaign.signing
    posted = cluster.client("post", cluster.ingest(ns), key, json.dumps(SEED_BODY), "--prefix", uuid.uuid4().hex)
    [call_id] = posted["accepted"].values()
    assert posted["answers"] == {"201": 1}, posted
    record = cluster.wait_calls(ns, reader, [call_id])[call_id]
    assert record["status"] == "completed", record
    assert record["metadata"] == SEED_BODY["metadata"]

    event = receiver_events(cluster, ns, call_id, "call.completed", timeout=60)[0]
    payload = standardwebhooks.Webhook(signing).verify(event["body"], event["headers"])  # raises if forged
    assert payload["type"] == "call.completed"
    assert payload["data"]["metadata"] == SEED_BODY["metadata"]
    assert payload["data"]["duration_seconds"] == record["duration_seconds"]
    assert "transcript" in payload["data"]


def receiver_events(cluster: Installed, ns: str, call_id: str | None, type_: str, timeout: float = 60) -> list[dict[str, Any]]:
    """What the receiver pod got (of `call_id`, or of every call when None), waiting for at least one."""
    deadline = time.monotonic() + timeout
    while True:
        found = []
        for line in cluster.node.kubectl("logs", "receiver", "-n", ns).splitlines():
            event = json.loads(line)
            body = json.loads(event["body"])
            if body.get("type") == type_ and (call_id is None or body["data"].get("call_id") == call_id):
                found.append({**event, "payload": body})
        if found:
            return found
        assert time.monotonic() < deadline, f"no {type_} for {call_id} at the receiver"
        time.sleep(1)


def test_tenants_are_isolated(cluster: Installed, campaign: Campaign) -> None:
    a, b = TENANTS
    key = campaign.key
    assert cluster.client("status", cluster.ingest(b), key, json.dumps(SEED_BODY))["status"] == 401
    assert cluster.client("status", cluster.ingest(a), key, json.dumps(SEED_BODY))["status"] == 201
    # A's pods hold A's NATS credentials: they work on A's NATS and are refused by B's (where no CNI
    # enforces the NetworkPolicy, the server itself keeps tenants apart).
    env = [{"name": var, "valueFrom": {"secretKeyRef": {"name": f"{a}-agent-studio-nats-auth", "key": k}}}
           for var, k in (("NATS_USER", "user"), ("NATS_PASSWORD", "password"))]
    own = cluster.run_pod(a, "nats-own", NATS_PROBE_CODE, f"nats://{a}-agent-studio-nats.{a}.svc.cluster.local:4222", env=env)
    other = cluster.run_pod(a, "nats-other", NATS_PROBE_CODE, f"nats://{b}-agent-studio-nats.{b}.svc.cluster.local:4222", env=env)
    assert own.strip() == "connected", own
    assert other.startswith("refused:") and "authorization violation" in other.lower(), other


def test_a_nats_pod_restarted_under_load_loses_no_accepted_call(cluster: Installed, campaign: Campaign, tmp_path: Path) -> None:
    ns = TENANTS[0]
    key, reader = campaign.key, campaign.reader
    stop = tmp_path / "stop"
    body = {**SEED_BODY, "metadata": {**SEED_BODY["metadata"], "simulate_duration_seconds": 1}}
    stream = cluster.stream(ns, key, body, "--rate", "5", "--until-file", str(stop))
    time.sleep(3)
    old = cluster.pods(ns, "nats")[0]["metadata"]["uid"]
    cluster.node.kubectl("delete", "pod", f"{ns}-agent-studio-nats-0", "-n", ns, "--wait=true")
    cluster.node.wait_ready("statefulset", f"{ns}-agent-studio-nats", ns, timeout=180)
    assert cluster.pods(ns, "nats")[0]["metadata"]["uid"] != old
    time.sleep(3)
    stop.touch()
    result = cluster.finished(stream)
    records = cluster.wait_calls(ns, reader, list(result["accepted"].values()))
    assert {r["status"] for r in records.values()} == {"completed"}
    print(f"\nNATS pod restart: {len(records)} calls accepted, answers {result['answers']}")


def test_a_rolling_upgrade_drops_no_call_and_cuts_no_live_one(cluster: Installed, campaign: Campaign, tmp_path: Path) -> None:
    ns = TENANTS[0]
    node = cluster.node
    key, reader = campaign.key, campaign.reader
    # Calls long enough that some are live on the dialer being replaced when it gets SIGTERM.
    body = {**SEED_BODY, "metadata": {**SEED_BODY["metadata"], "simulate_duration_seconds": 15}}
    stop = tmp_path / "stop"
    stream = cluster.stream(ns, key, body, "--rate", "1", "--until-file", str(stop))
    old_dialer = cluster.pods(ns, "dialer")[0]
    deleted: dict[str, float] = {}
    watching = threading.Event()

    def watch_old_dialer() -> None:
        # When the old dialer was told to go: first seen terminating (its deletionTimestamp is when it
        # would be killed, a grace period later). Its SIGTERM comes after the preStop sleep.
        while not watching.is_set():
            pod = node.get("pod", old_dialer["metadata"]["name"], ns)
            if pod is None:
                return
            if "deletionTimestamp" in pod["metadata"]:
                deleted.setdefault("at", time.time())
            time.sleep(0.5)

    watcher = threading.Thread(target=watch_old_dialer, daemon=True)
    watcher.start()
    time.sleep(5)
    began = time.monotonic()
    rollout = uuid.uuid4().hex[:8]
    node.helm("upgrade", ns, str(CHARTS / "agent-studio"), "-n", ns, *cluster.values(),
              *[arg for c in ("operator", "ingest", "dialer") for arg in ("--set", f"{c}.podAnnotations.rollout={rollout}")],
              "--wait", "--timeout", "5m")
    rollout_seconds = time.monotonic() - began
    time.sleep(5)
    stop.touch()
    result = cluster.finished(stream)
    for component in ("operator", "ingest", "dialer"):
        for pod in cluster.pods(ns, component):
            if "deletionTimestamp" not in pod["metadata"]:
                assert pod["metadata"].get("annotations", {}).get("rollout") == rollout, pod["metadata"]["name"]
    ids = list(result["accepted"].values())
    records = cluster.wait_calls(ns, reader, ids, timeout=240)
    watching.set()
    assert {r["status"] for r in records.values()} == {"completed"}, {i: r["status"] for i, r in records.items()}
    # Live on the old dialer when it was told to stop (answered before it was, ended after it was):
    # finished, not cut.
    assert "at" in deleted, "the old dialer was never seen terminating"
    sigterm = deleted["at"] + PRESTOP_SECONDS
    crossing = [r for r in records.values() if timestamp(r["answered_at"]) < sigterm < timestamp(r["ended_at"])]
    assert crossing, "no call was live across the old dialer's stop"
    # Deliveries follow the calls' ends: wait for every one, then none may have come twice.
    deadline = time.monotonic() + 120
    while missing := set(ids) - {e["payload"]["data"]["call_id"] for e in receiver_events(cluster, ns, None, "call.completed")}:
        assert time.monotonic() < deadline, f"no call.completed for {sorted(missing)}"
        time.sleep(1)
    completed = receiver_events(cluster, ns, None, "call.completed")
    for call_id in ids:
        assert sum(e["payload"]["data"]["call_id"] == call_id for e in completed) == 1, call_id
    print(f"\nrolling upgrade: {rollout_seconds:.1f} s, {len(ids)} calls, {len(crossing)} live across the "
          f"old dialer's stop, client answers {result['answers']}")


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:  # gone meanwhile
        pass
    return 0


BATCH = 80  # 8 s of calls at 10/s: the kill (after 3 s) falls in the middle


def test_a_dialer_killed_mid_batch_places_every_call_once(cluster: Installed, campaign: Campaign) -> None:
    ns = TENANTS[0]
    node = cluster.node
    key, reader = campaign.key, campaign.reader
    [victim] = [p for p in cluster.pods(ns, "dialer") if "deletionTimestamp" not in p["metadata"]]
    name = victim["metadata"]["name"]
    # Its log, kept while it lives: after a forced delete the API has no logs of it.
    victim_log = node.popen([node.bins["KUBECTL"], f"--kubeconfig={node.kubeconfig}", "logs", "-f", name, "-n", ns],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    body = {**SEED_BODY, "metadata": {**SEED_BODY["metadata"], "simulate_duration_seconds": 2}}
    stream = cluster.stream(ns, key, body, "--rate", "10", "--count", str(BATCH))
    time.sleep(3)
    node.kubectl("delete", "pod", name, "-n", ns, "--grace-period=0", "--force")
    result = cluster.finished(stream)
    assert len(result["accepted"]) == BATCH, result
    node.wait_ready("deployment", f"{ns}-agent-studio-dialer", ns, timeout=180)
    killed_at = time.monotonic()
    ids = list(result["accepted"].values())
    # Settled: every call final (the killed dialer's taken over once its lease ran out), a redelivery
    # (ack wait 10 s) has had time, and nothing changes any more.
    seen: list[dict[str, str]] = []
    deadline = killed_at + 240
    while True:
        records = cluster.client("calls", cluster.ingest(ns), reader, *ids)
        statuses = {i: r.get("status", f"http {r.get('http_status')}") for i, r in records.items()}
        seen = [*seen[-2:], statuses]
        unfinished = {"pending", "dialing", "ringing", "in_progress"} & set(statuses.values())
        if (not unfinished and time.monotonic() > killed_at + ACK_WAIT_SECONDS + 10
                and len(seen) == 3 and seen[0] == seen[1] == seen[2]):
            break
        assert time.monotonic() < deadline, f"not settled: {statuses}"
        time.sleep(2)
    victim_log.terminate()
    killed_said = victim_log.communicate(timeout=30)[0]
    survivors = [p["metadata"]["name"] for p in cluster.pods(ns, "dialer") if p["metadata"]["name"] != name]
    by_killed = placed(killed_said)
    by_survivors = placed("".join(node.kubectl("logs", p, "-n", ns) for p in survivors))
    for call_id in ids:  # never twice: by one dialer, or by the replacement after the killed one
        assert by_killed.count(call_id) + by_survivors.count(call_id) <= 1, call_id
    # Every call the survivors placed completed, and every call completed was placed once. What the
    # killed dialer had under way died with it (the simulated provider plays a call inside the
    # dialer's process): a surviving dialer took those claims over and failed them provider_lost.
    assert set(by_killed) & set(ids) and set(by_survivors) & set(ids), "the kill did not fall mid-batch"
    left = [i for i in ids if statuses[i] != "completed"]
    assert not set(left) & set(by_survivors), left
    lost = {i: (statuses[i], (records[i].get("error") or {}).get("code")) for i in left}
    assert set(lost.values()) <= {("failed", "provider_lost")}, lost
    # (A completed call was placed at least once; the log of the killed dialer may lack its last lines,
    # the ones written as it was killed, so "at most once" is what the logs can show.)
    unlogged = [i for i in ids if i not in by_killed and i not in by_survivors]
    print(f"\ndialer kill: {BATCH} calls, {len(set(by_killed) & set(ids))} placed by the killed dialer "
          f"({len(left)} failed provider_lost after it), {len(set(by_survivors) & set(ids))} by its replacement, "
          f"none twice; {len(unlogged)} placements not in the killed dialer's log")


def test_uninstalling_one_tenant_leaves_the_other_and_the_crds(cluster: Installed, campaign: Campaign) -> None:
    a, b = TENANTS
    node = cluster.node
    node.helm("uninstall", b, "-n", b, "--wait")
    cluster.tenants.remove(b)
    deadline = time.monotonic() + 120
    # Its workloads go (pods terminate for a while); only the finished `helm test` pod stays, as Helm
    # leaves test hooks for their logs.
    while pods := [p for p in json.loads(node.kubectl("get", "pods", "-n", b, "-o", "json"))["items"]
                   if p["status"].get("phase") != "Succeeded"]:
        assert time.monotonic() < deadline, [p["metadata"]["name"] for p in pods]
        time.sleep(1)
    crds = node.kubectl("get", "crd", "-o", "name")
    for kind in ("agents", "workflows", "apikeys", "webhooksubscriptions", "callpolicies"):
        assert f"customresourcedefinition.apiextensions.k8s.io/{kind}.agentstudio.io" in crds
    posted = cluster.client("post", cluster.ingest(a), campaign.key, json.dumps(SEED_BODY), "--prefix", uuid.uuid4().hex)
    [call_id] = posted["accepted"].values()
    assert cluster.wait_calls(a, campaign.reader, [call_id])[call_id]["status"] == "completed"
