"""bench/memory: what an ingest worker and a dialer hold with a large bundle (issue 16: ingest ≤ 120 MiB,
dialer ≤ 200 MiB idle, with 1,000 agents and 1,000 keys).

One tenant's bundle of `--agents` Agents (prompts of 2-4 KB, four tools each), as many Workflows and
`--keys` ApiKeys is compiled and published on a real nats-server; real `agent-studio ingest` (one
uvicorn worker) and `agent-studio dialer` (simulated provider) processes are started against it, each
fresh for every state: no bundle, an empty bundle (the tenant with nothing in it), the large bundle,
and for ingest the large bundle after `--requests` accepted calls. A process has loaded the bundle when
its /readyz says so (ingest: "tenants": 1; the dialer: ready only once its bundles are read). The
baseline is a bare `python -c 'import fastapi, uvicorn'` process. Per process: VmRSS, and from
/proc/<pid>/smaps_rollup its Pss and private (clean + dirty) memory, all in MiB. Beside them, what each
role's imports add to a fresh interpreter's RSS, package by package.

    .venv/bin/python bench/memory.py [--agents 1000] [--keys 1000] [--requests 200]

Prints JSON and writes bench/results/memory.json and memory.png. Not a test: nothing asserts on it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import report  # noqa: E402
from ingest import serve  # noqa: E402

from agentstudio import bundle_store, bus, keys  # noqa: E402
from agentstudio.bundle import Bundle, KeyMaterial, compile_bundle  # noqa: E402
from agentstudio.manifests import Located, parse  # noqa: E402
from agentstudio.natsserver import NatsServer, free_port  # noqa: E402

TENANT = "bench"
API = "agentstudio.io/v1alpha1"
SETTLE_SECONDS = 2.0  # after ready: the last of the load (and its garbage) settles before reading

# Sentences a campaign's prompt is made of; each agent draws its own mix, so no two prompts are equal.
SENTENCES = [
    "You are a friendly voice assistant for {company}, calling {{{{user.name}}}} about their {topic}.",
    "The user signed up on {{{{user.signed_up_at}}}} and is on the {{{{user.plan_type | default('basic')}}}} plan.",
    "Speak in short sentences, one idea at a time, and wait for the user to finish before you answer.",
    "If the user asks who you are, say you are the {company} assistant and that the call may be recorded.",
    "Never ask for a password, a card number or a one-time code; if the user offers one, stop them politely.",
    "{{% if user.last_order %}}Their last order was {{{{user.last_order}}}}; mention it only if it helps.{{% endif %}}",
    "If they are busy, offer to call back later and use the schedule_callback tool with the time they name.",
    "When they have answered, record what they said with the capture_response tool before you say goodbye.",
    "If the user wants to speak to a person, hand off with the transfer tool; do not promise a time.",
    "Keep the call under three minutes unless the user is asking questions about {topic}.",
    "The campaign is {{{{metadata.campaign_id | default('unknown')}}}}; do not read it out.",
    "Use the user's language if they switch; you understand English and Hindi.",
]
TOPICS = ["free trial", "renewal", "delivery", "appointment", "subscription", "feedback survey", "account upgrade"]


def agent(i: int, agents: int, rng: random.Random) -> dict[str, Any]:
    company, topic = f"Company {i % 97}", rng.choice(TOPICS)
    lines = [f"# Agent {i}: {topic} calls for {company}."]
    while sum(map(len, lines)) < rng.randint(2048, 4096):
        lines.append(rng.choice(SENTENCES).format(company=company, topic=topic) + f" (step {len(lines)})")
    return {"apiVersion": API, "kind": "Agent", "metadata": {"name": f"agent-{i}"}, "spec": {
        "description": f"{topic} follow-up {i}",
        "prompt": "\n".join(lines),
        "firstMessage": f"Hi {{{{user.name}}}}, this is the {company} assistant about your {topic}. Have you got a minute?",
        "llm": {"baseUrl": "https://api.openai.com/v1", "model": "gpt-4o-mini",
                "apiKeySecretRef": {"name": "llm-credentials", "key": "api-key"}},
        "tools": [
            {"name": "capture_response", "description": f"Record what the user said about their {topic}.",
             "parameters": {"type": "object", "required": ["interested"], "properties": {
                 "interested": {"type": "boolean", "description": "Whether they want to go on."},
                 "issue": {"type": "string", "description": "The problem they describe, if any."},
                 "callback_at": {"type": "string", "description": "When to call back, if asked."}}},
             "action": {"type": "capture"}},
            {"name": "log_call", "description": "Log the outcome in the CRM.",
             "parameters": {"type": "object", "required": ["outcome"], "properties": {
                 "outcome": {"type": "string", "enum": ["done", "callback", "not_interested"]}}},
             "action": {"type": "api_call", "method": "POST", "url": f"https://crm.example.com/agents/{i}/log",
                        "body": {"phone": "{{context.phone_number}}", "user_id": "{{user.user_id}}",
                                 "campaign": "{{metadata.campaign_id}}", "outcome": "{{params.outcome}}"}}},
            {"name": "handoff", "description": "Pass the call to the next team.",
             "action": {"type": "handoff", "agent": f"agent-{(i + 1) % agents}"}},
            {"name": "end_call", "description": "Hang up after saying goodbye.", "action": {"type": "end_call"}},
        ],
    }}


def workflow(i: int, agents: int) -> dict[str, Any]:
    return {"apiVersion": API, "kind": "Workflow", "metadata": {"name": f"workflow-{i}"}, "spec": {
        "entryAgent": f"agent-{i}", "agents": [f"agent-{(i + 1) % agents}"],
        "sharedContext": {"company": f"Company {i % 97}", "support_line": "+15005550006"},
        "userContextSchema": {"type": "object", "properties": {
            "name": {"type": "string"}, "signed_up_at": {"type": "string"}, "plan_type": {"type": "string"},
            "last_order": {"type": "string"}}}}}


def large_bundle(n_agents: int, n_keys: int) -> tuple[Bundle, list[str], dict[str, float]]:
    """The bundle, the keys (to call ingest with) and how long building it took."""
    rng = random.Random(16)
    documents = [agent(i, n_agents, rng) for i in range(n_agents)] + [workflow(i, n_agents) for i in range(n_agents)]
    documents += [{"apiVersion": API, "kind": "ApiKey", "metadata": {"name": f"key-{i}"},
                   "spec": {"scopes": ["calls:create", "calls:read"], "mode": "live", "platform": "clevertap"}}
                  for i in range(n_keys)]
    resources: list[Located] = []
    for index, document in enumerate(documents):
        located, problems = parse(document, "bench", index)
        assert located is not None, problems
        resources.append(located)
    secrets = [keys.generate("live") for _ in range(n_keys)]
    material = {f"key-{i}": [KeyMaterial(keys.digest(k), hint=keys.hint(k), created_at=datetime.now(timezone.utc))]
                for i, k in enumerate(secrets)}
    started = time.perf_counter()
    result = compile_bundle(TENANT, resources, material)
    assert result.bundle is not None, result.errors[:5]
    return result.bundle, secrets, {"compile_s": time.perf_counter() - started}


async def publish(nats_url: str, bundle: Bundle) -> int:
    nc = await bus.connect(nats_url, "bench-memory")
    try:
        return (await bundle_store.publish(await bundle_store.buckets(nc.jetstream()), bundle)).version
    finally:
        await nc.close()


def memory(pid: int) -> dict[str, float]:
    """VmRSS, Pss and private memory of a process, in MiB."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            out["rss"] = int(line.split()[1]) / 1024
    rollup = {line.split(":")[0]: int(line.split()[1]) for line in
              Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]}
    out["pss"] = rollup["Pss"] / 1024
    out["private"] = (rollup["Private_Clean"] + rollup["Private_Dirty"]) / 1024
    return {k: round(v, 1) for k, v in out.items()}


def settled(pid: int) -> dict[str, float]:
    time.sleep(SETTLE_SECONDS)
    return memory(pid)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def until(check: Any, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(what)


def environment(nats_url: str, port: int) -> dict[str, str]:
    return {**os.environ, "AGENTSTUDIO_NATS_URL": nats_url, "AGENTSTUDIO_HOST": "127.0.0.1",
            "AGENTSTUDIO_PORT": str(port), "AGENTSTUDIO_LOG_LEVEL": "WARNING",
            # Outside a cluster: the dialer's webhook signing secrets are not read from Kubernetes.
            "AGENTSTUDIO_WEBHOOK_SECRETS": "none"}


def ingest_run(nats_url: str, logs: Path, tenants: int, calls: list[dict[str, Any]], secrets: list[str]) -> dict[str, Any]:
    """A fresh ingest worker until it serves `tenants` bundles; its memory then, and after `calls`."""
    port = free_port()
    proc = serve([str(Path(sys.executable).parent / "agent-studio"), "ingest", "--workers", "1"],
                 environment(nats_url, port), f"http://127.0.0.1:{port}/healthz", logs / "ingest.log")
    url = f"http://127.0.0.1:{port}"
    try:
        until(lambda: httpx.get(f"{url}/readyz").json()["tenants"] == tenants and
              httpx.get(f"{url}/readyz").json()["nats"], "ingest never loaded the bundle")
        out: dict[str, Any] = {"loaded": settled(proc.pid)}
        if calls:
            with httpx.Client(base_url=url) as client:
                for i, body in enumerate(calls):
                    answer = client.post("/api/v1/webhooks/ingest", json=body,
                                         headers={"Authorization": f"Bearer {secrets[i % len(secrets)]}"})
                    assert answer.status_code == 201, answer.text
            out["after_requests"] = settled(proc.pid)
        return out
    finally:
        stop(proc)


def dialer_run(nats_url: str, logs: Path) -> dict[str, Any]:
    """A fresh dialer until its bundles are read; its memory then."""
    port = free_port()
    proc = serve([str(Path(sys.executable).parent / "agent-studio"), "dialer"], environment(nats_url, port),
                 f"http://127.0.0.1:{port}/readyz", logs / "dialer.log")
    try:
        return {"loaded": settled(proc.pid)}
    finally:
        stop(proc)


def baseline(logs: Path) -> dict[str, float]:
    with open(logs / "bare.log", "ab") as out:
        proc = subprocess.Popen([sys.executable, "-c", "import fastapi, uvicorn, sys; print(flush=True); sys.stdin.read()"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=out)
    try:
        assert proc.stdout is not None and proc.stdout.readline(), (logs / "bare.log").read_text()
        return settled(proc.pid)
    finally:
        proc.kill()
        proc.wait()


# What a role's imports cost, package by package in this order (each line: RSS after it minus before).
IMPORTS = {
    "ingest": ["pydantic", "fastapi", "uvicorn", "aiohttp", "nats", "httpx", "jinja2", "jsonschema_rs",
               "phonenumbers", "sqlite3", "twilio.twiml.voice_response", "agentstudio.resources",
               "agentstudio.bundle", "agentstudio.ingest.app"],
    "dialer": ["pydantic", "fastapi", "uvicorn", "aiohttp", "nats", "httpx", "jinja2", "jsonschema_rs",
               "phonenumbers", "sqlite3", "twilio.rest", "agentstudio.conversation.llm", "agentstudio.resources", "agentstudio.bundle",
               "agentstudio.dialer.main"],
}
IMPORTING = """
import importlib, json, sys
def rss():
    return next(int(line.split()[1]) / 1024 for line in open("/proc/self/status") if line.startswith("VmRSS:"))
costs, before = {"interpreter": rss()}, rss()
for name in sys.argv[1:]:
    importlib.import_module(name)
    costs[name], before = rss() - before, rss()
print(json.dumps(costs))
"""


def import_costs(modules: list[str]) -> dict[str, float]:
    run = subprocess.run([sys.executable, "-c", IMPORTING, *modules], capture_output=True, text=True, check=True)
    return {name: round(mib, 1) for name, mib in json.loads(run.stdout).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()

    bundle, secrets, timings = large_bundle(args.agents, args.keys)
    body_bytes = len(bundle.to_bytes())
    empty = compile_bundle(TENANT, [], {}).bundle
    assert empty is not None
    rng = random.Random(200)
    calls = [{"workflow_slug": f"workflow-{rng.randrange(args.agents)}", "phone_number": f"+9198765{i:05d}",
              "user_id": f"user-{i}", "user_context": {"name": "Asha", "plan_type": "premium"},
              "metadata": {"campaign_id": "memory-bench"}} for i in range(args.requests)]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp, NatsServer(Path(tmp) / "nats") as nats:
        logs = Path(tmp)
        results["baseline"] = {"fastapi+uvicorn": baseline(logs)}
        results["ingest"] = {"no_bundle": ingest_run(nats.url, logs, 0, [], [])["loaded"]}
        results["dialer"] = {"no_bundle": dialer_run(nats.url, logs)["loaded"]}
        asyncio.run(publish(nats.url, empty))
        results["ingest"]["empty_bundle"] = ingest_run(nats.url, logs, 1, [], [])["loaded"]
        results["dialer"]["empty_bundle"] = dialer_run(nats.url, logs)["loaded"]
        asyncio.run(publish(nats.url, bundle))
        # The dialer first: it would dial the calls ingest queues.
        results["dialer"]["large_bundle"] = dialer_run(nats.url, logs)["loaded"]
        large = ingest_run(nats.url, logs, 1, calls, secrets)
        results["ingest"]["large_bundle"] = large["loaded"]
        results["ingest"][f"large_bundle_after_{args.requests}_requests"] = large["after_requests"]

    out = {
        "imports_mib": {role: import_costs(modules) for role, modules in IMPORTS.items()},
        "bundle": {"agents": args.agents, "workflows": args.agents, "keys": args.keys, "json_bytes": body_bytes,
                   "prompt_bytes": sum(len(a.spec.prompt) for a in bundle.agents.values()), **timings},
        "goal_mib": {"ingest": 120, "dialer": 200},
        "mib": results,
        "bundle_cost_mib": {role: round(results[role]["large_bundle"]["rss"] - results[role]["empty_bundle"]["rss"], 1)
                            for role in ("ingest", "dialer")},
    }
    report.save("memory", out, plot)


def plot(out: dict[str, Any]) -> Any:
    fig, axes = report.pyplot().subplots(1, 3, figsize=(16, 4.8), gridspec_kw={"width_ratios": [1, 1, 1.2]})
    bare = out["mib"]["baseline"]["fastapi+uvicorn"]
    for ax, role in zip(axes[:2], ("ingest", "dialer")):
        states = list(out["mib"][role])
        labels = ["python\nfastapi+uvicorn", *(s.replace("_", " ").replace("after", "\nafter") for s in states)]
        rows = [bare, *(out["mib"][role][s] for s in states)]
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [r["rss"] for r in rows], 0.4, label="VmRSS", color="#69c")
        ax.bar([i + 0.2 for i in x], [r["private"] for r in rows], 0.4, label="private", color="#2a6")
        ax.axhline(out["goal_mib"][role], color="tab:red", linestyle="--", label=f"goal {out['goal_mib'][role]} MiB")
        ax.set_xticks(list(x), labels, fontsize=7)
        ax.set_title(f"{role} process")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("MiB")
    for ax in axes[:2]:
        ax.set_ylim(0, max(out["goal_mib"].values()) * 1.1)
    names = list(dict.fromkeys(name for costs in out["imports_mib"].values() for name in costs))
    y = range(len(names))
    for offset, (role, color) in zip((-0.2, 0.2), (("ingest", "#c84"), ("dialer", "#86c"))):
        axes[2].barh([i + offset for i in y], [out["imports_mib"][role].get(n, 0) for n in names], 0.4,
                     label=f"{role}: {sum(out['imports_mib'][role].values()):.0f} MiB", color=color)
    axes[2].set_yticks(list(y), names, fontsize=7)
    axes[2].invert_yaxis()
    axes[2].set_xlabel("MiB of RSS added, imported in this order")
    axes[2].set_title("a fresh interpreter importing the role")
    axes[2].legend(fontsize=8)
    b = out["bundle"]
    fig.suptitle(f"Memory with a bundle of {b['agents']:,} agents, {b['workflows']:,} workflows, {b['keys']:,} keys "
                 f"({b['json_bytes'] / 2**20:.1f} MiB of JSON)")
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
