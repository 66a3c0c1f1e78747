"""bench/operator: how quickly an applied change is in force at ingest, and what it costs the API server.

Measures, on a real kube-apiserver + etcd and a real nats-server, with the examples plus `--agents`
Agents and `--apikeys` ApiKeys in the namespace (1,000 each by default):
- apply → in force: the time from replacing an Agent's prompt through the API server until a running
  ingest serves a bundle with that prompt (the operator's watch, debounce, compile, Secret reads,
  publish, and ingest's KV watch), against a baseline in the same run: publishing an equivalent bundle
  straight to the KV bucket until ingest serves it;
- status writes per change: the API server's own count of requests to a `/status` subresource of
  our kinds (`apiserver_request_total{group="agentstudio.io",subresource="status"}` on /metrics),
  from the change until the changed Agent reports its new generation and the count stops growing.

    .venv/bin/python bench/operator.py [--changes 20] [--agents 1000] [--apikeys 1000]

Prints JSON and writes bench/results/operator.json. Not a test: nothing asserts on it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from kubernetes import client

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import controlplane  # noqa: E402
from latency import summary  # noqa: E402
import report  # noqa: E402

from agentstudio import bundle_store  # noqa: E402
from agentstudio.ingest.service import IngestService  # noqa: E402
from agentstudio.natsserver import NatsServer  # noqa: E402
from agentstudio.resources import GROUP, KINDS, VERSION  # noqa: E402
from agentstudio.settings import Settings  # noqa: E402

NS = "bench"


async def until_prompt(svc: IngestService, prompt: str, timeout: float = 30) -> float:
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        bundle = svc.snapshot.bundles.get(NS)
        if bundle and bundle.agents["trial-followup-agent"].spec.prompt == prompt:
            return time.perf_counter()
        await asyncio.sleep(0.002)
    raise TimeoutError(prompt)


def status_writes(plane: controlplane.ControlPlane) -> int:
    return sum(plane.requests_served(model.PLURAL, ("PATCH", "UPDATE", "APPLY"), GROUP, "status")
               for model in KINDS.values())


def populate(custom: client.CustomObjectsApi, agents: int, apikeys: int) -> dict[str, int]:
    """The examples plus the generated objects; how many of each kind there are."""
    counts = {"Agent": agents, "ApiKey": apikeys}
    for file in sorted((ROOT / "examples").glob("*.yaml")):
        for doc in (d for d in yaml.safe_load_all(file.read_text()) if d):
            custom.create_namespaced_custom_object(GROUP, VERSION, NS, KINDS[doc["kind"]].PLURAL, doc)
            counts[doc["kind"]] = counts.get(doc["kind"], 0) + 1
    for i in range(agents):
        custom.create_namespaced_custom_object(GROUP, VERSION, NS, "agents", {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "Agent", "metadata": {"name": f"agent-{i}"},
            "spec": {"prompt": f"You are agent {i}. Greet {{{{user.name}}}}."}})
    for i in range(apikeys):
        custom.create_namespaced_custom_object(GROUP, VERSION, NS, "apikeys", {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "ApiKey", "metadata": {"name": f"key-{i}"},
            "spec": {"scopes": ["calls:create"]}})
    return counts


def all_reported(custom: client.CustomObjectsApi) -> bool:
    for model in KINDS.values():
        for obj in custom.list_namespaced_custom_object(GROUP, VERSION, NS, model.PLURAL)["items"]:
            status = obj.get("status") or {}
            if status.get("observedGeneration") != obj["metadata"]["generation"] or any(
                    c["type"] == "Reconciling" for c in status.get("conditions", [])):
                return False
    return True


async def settled(custom: client.CustomObjectsApi, generation: int, timeout: float = 60) -> None:
    """The changed Agent reports `generation`: the operator has written what this change causes."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        agent = await asyncio.to_thread(custom.get_namespaced_custom_object, GROUP, VERSION, NS, "agents",
                                        "trial-followup-agent")
        if (agent.get("status") or {}).get("observedGeneration") == generation:
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"generation {generation} not reported")


async def quiet(plane: controlplane.ControlPlane) -> int:
    """The status write count once it has stopped growing for a second."""
    count = await asyncio.to_thread(status_writes, plane)
    while True:
        await asyncio.sleep(1)
        now = await asyncio.to_thread(status_writes, plane)
        if now == count:
            return count
        count = now


async def measure(plane: controlplane.ControlPlane, nats_url: str, changes: int, agents: int,
                  apikeys: int) -> dict[str, object]:
    custom = client.CustomObjectsApi(plane.api())
    svc = IngestService(Settings(nats_url=nats_url))
    await svc.start()
    try:
        started = time.perf_counter()
        counts = await asyncio.to_thread(populate, custom, agents, apikeys)
        await until_prompt(svc, yaml.safe_load((ROOT / "examples" / "agents.yaml").read_text())["spec"]["prompt"], 300)
        # Every key generated, in force, and every object reported on before measuring.
        while True:
            bundle = svc.snapshot.bundles[NS]
            if len(bundle.keys) >= counts["ApiKey"] and len(bundle.agents) >= counts["Agent"] \
                    and await asyncio.to_thread(all_reported, custom):
                break
            await asyncio.sleep(1)
        setup_s = time.perf_counter() - started

        via_operator, writes = [], []
        for i in range(changes):
            agent = await asyncio.to_thread(custom.get_namespaced_custom_object, GROUP, VERSION, NS, "agents",
                                            "trial-followup-agent")
            prompt = f"You are calling {{{{user.name}}}}. Change {i}."
            agent["spec"]["prompt"] = prompt
            before = await asyncio.to_thread(status_writes, plane)
            start = time.perf_counter()
            replaced = await asyncio.to_thread(custom.replace_namespaced_custom_object, GROUP, VERSION, NS, "agents",
                                               "trial-followup-agent", agent)
            via_operator.append(await until_prompt(svc, prompt) - start)
            await settled(custom, replaced["metadata"]["generation"])
            writes.append(await quiet(plane) - before)

        kv = await bundle_store.buckets(svc.js)
        base = svc.snapshot.bundles[NS]
        direct = []
        for i in range(changes):
            prompt = f"Direct change {i}."
            agent = base.agents["trial-followup-agent"]
            changed = base.model_copy(update={"agents": {**base.agents, agent.slug: agent.model_copy(
                update={"spec": agent.spec.model_copy(update={"prompt": prompt})})}})
            changed = changed.model_copy(update={"digest": changed.content_digest()})
            start = time.perf_counter()
            await bundle_store.publish(kv, changed)
            direct.append(await until_prompt(svc, prompt) - start)
    finally:
        await svc.stop()
    operator_stats, direct_stats = summary(via_operator, (95,)), summary(direct, (95,))
    return {
        "objects": counts,
        "setup_to_all_in_force_s": round(setup_s, 1),
        "status_writes_per_change": {"min": min(writes), "max": max(writes), "n": len(writes)},
        "apply_to_ingest": operator_stats,
        "baseline_kv_publish_to_ingest": direct_stats,
        "ratio_p95": operator_stats["p95_ms"] / direct_stats["p95_ms"],
        "goal_p95_ms": 2000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--changes", type=int, default=20)
    parser.add_argument("--agents", type=int, default=1000, help="Agents besides the examples'")
    parser.add_argument("--apikeys", type=int, default=1000, help="ApiKeys besides the examples'")
    args = parser.parse_args()
    plane = controlplane.start()
    try:
        plane.tenant_namespace(NS)
        with tempfile.TemporaryDirectory() as tmp, NatsServer(Path(tmp) / "nats") as nats:
            env = {**os.environ, "KUBECONFIG": str(plane.kubeconfig("operator")), "AGENTSTUDIO_NATS_URL": nats.url,
                   "AGENTSTUDIO_LOG_LEVEL": "WARNING"}
            operator = subprocess.Popen([str(Path(sys.executable).parent / "agent-studio"), "operator", "-n", NS],
                                        env=env)
            try:
                out = asyncio.run(measure(plane, nats.url, args.changes, args.agents, args.apikeys))
            finally:
                operator.terminate()
                operator.wait(timeout=20)
    finally:
        plane.stop()
    report.save("operator", out)


if __name__ == "__main__":
    main()
