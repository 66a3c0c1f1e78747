"""bench/operator: how quickly an applied change is in force at ingest.

Measures, on a real kube-apiserver + etcd and a real nats-server, the time from replacing an Agent's
prompt through the API server until a running ingest serves a bundle with that prompt (the operator's
watch, debounce, compile, Secret reads, publish, and ingest's KV watch), against a baseline in the
same run: publishing an equivalent bundle straight to the KV bucket until ingest serves it.

    .venv/bin/python bench/operator.py [--changes 40]

Prints JSON and writes bench/results/operator.json. Not a test: nothing asserts on it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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

from agentstudio import bundle_store, bus  # noqa: E402
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


async def measure(plane: controlplane.ControlPlane, nats_url: str, changes: int) -> dict[str, object]:
    custom = client.CustomObjectsApi(plane.api())
    svc = IngestService(Settings(nats_url=nats_url))
    await svc.start()
    try:
        for file in sorted((ROOT / "examples").glob("*.yaml")):
            for doc in (d for d in yaml.safe_load_all(file.read_text()) if d):
                custom.create_namespaced_custom_object(GROUP, VERSION, NS, KINDS[doc["kind"]].PLURAL, doc)
        await until_prompt(svc, yaml.safe_load((ROOT / "examples" / "agents.yaml").read_text())["spec"]["prompt"], 60)

        via_operator = []
        for i in range(changes):
            agent = await asyncio.to_thread(custom.get_namespaced_custom_object, GROUP, VERSION, NS, "agents",
                                            "trial-followup-agent")
            prompt = f"You are calling {{{{user.name}}}}. Change {i}."
            agent["spec"]["prompt"] = prompt
            start = time.perf_counter()
            await asyncio.to_thread(custom.replace_namespaced_custom_object, GROUP, VERSION, NS, "agents",
                                    "trial-followup-agent", agent)
            via_operator.append(await until_prompt(svc, prompt) - start)
            await asyncio.sleep(0.3)  # separate changes, as people make them

        kv = await bus.bundles_bucket(svc.js)
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
        "apply_to_ingest": operator_stats,
        "baseline_kv_publish_to_ingest": direct_stats,
        "ratio_p95": operator_stats["p95_ms"] / direct_stats["p95_ms"],
        "goal_p95_ms": 2000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--changes", type=int, default=40)
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
                out = asyncio.run(measure(plane, nats.url, args.changes))
            finally:
                operator.terminate()
                operator.wait(timeout=20)
    finally:
        plane.stop()
    print(json.dumps(out, indent=2))
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / "operator.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
