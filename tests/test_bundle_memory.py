"""What a loaded bundle costs in memory: agents with prompts of a few KB and their tools are held as
their JSON, not as parsed models, and still read back whole; a body with an invalid agent is refused
when it is read, as before; a process that has loaded a bundle gives back what parsing it took."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import tracemalloc
from pathlib import Path

import orjson
import pytest
from pydantic import ValidationError

from agentstudio import bundle_store, bus, keys
from agentstudio.bundle import Bundle, KeyMaterial, compile_bundle
from agentstudio.manifests import Located, parse
from agentstudio.natsserver import NatsServer

API = "agentstudio.io/v1alpha1"
N = 200
SENTENCE = ("Speak in short sentences, one idea at a time, and wait for {{{{user.name}}}} to finish before you "
            "answer; agent {i} never asks for a password or a card number. ")


def agent(i: int) -> dict[str, object]:
    return {"apiVersion": API, "kind": "Agent", "metadata": {"name": f"agent-{i}"}, "spec": {
        "prompt": SENTENCE.format(i=i) * 24, "firstMessage": f"Hi {{{{user.name}}}}, agent {i} here.",
        "callPolicy": "calm" if i % 2 else None,
        "tools": [
            {"name": "capture_response", "description": "Record what the user said.",
             "parameters": {"type": "object", "required": ["interested"], "properties": {
                 "interested": {"type": "boolean", "description": "Whether they want to go on."},
                 "issue": {"type": "string", "description": "The problem they describe, if any."}}},
             "action": {"type": "capture"}},
            {"name": "log_call", "description": "Log the outcome in the CRM.",
             "parameters": {"type": "object", "properties": {"outcome": {"type": "string"}}},
             "action": {"type": "api_call", "method": "POST", "url": f"https://crm.example.com/agents/{i}",
                        "body": {"phone": "{{context.phone_number}}", "outcome": "{{params.outcome}}"}}},
            {"name": "end_call", "description": "Hang up after saying goodbye.", "action": {"type": "end_call"}},
        ]}}


def resources(n: int = N) -> list[Located]:
    documents = [agent(i) for i in range(n)] + [
        {"apiVersion": API, "kind": "CallPolicy", "metadata": {"name": "calm"}, "spec": {"preset": "auto"}},
        {"apiVersion": API, "kind": "Workflow", "metadata": {"name": "campaign"}, "spec": {"entryAgent": "agent-1"}},
        {"apiVersion": API, "kind": "ApiKey", "metadata": {"name": "key"}, "spec": {"scopes": ["calls:create"]}},
    ]
    located = [parse(document, "<test>", i) for i, document in enumerate(documents)]
    assert all(item for item, _ in located), [problems for _, problems in located if problems]
    return [item for item, _ in located if item]


@pytest.fixture(scope="module")
def compiled() -> Bundle:
    result = compile_bundle("memory", resources(), {"key": [KeyMaterial(keys.digest(keys.generate("live")))]})
    assert result.bundle is not None, result.errors
    return result.bundle


def test_a_loaded_bundle_holds_little_more_than_its_json(compiled: Bundle) -> None:
    data = compiled.to_bytes()
    gc.collect()
    tracemalloc.start()
    try:
        loaded = Bundle.from_bytes(data)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Parsed into models, these 200 agents held 2.9 times their JSON (orjson's bytes of them: 6.2 times).
    assert held < 1.5 * len(data), f"{held / len(data):.1f} times its {len(data)} bytes of JSON"
    assert len(loaded.agents) == N


def test_an_agent_reads_back_whole_after_loading(compiled: Bundle) -> None:
    loaded = Bundle.from_bytes(compiled.to_bytes())
    assert loaded.content_digest() == compiled.content_digest()
    for slug, agent in compiled.agents.items():
        assert loaded.agents[slug].spec == agent.spec
    assert loaded.policy_name_for(None, "agent-1") == "calm"
    assert loaded.policy_name_for(None, "agent-2") is None
    assert loaded.policy_name_for("campaign", None) == "calm"
    assert "{{user.name}}" in loaded.agents["agent-7"].spec.prompt


def test_a_body_with_an_invalid_agent_is_refused_when_it_is_read(compiled: Bundle) -> None:
    body = orjson.loads(compiled.to_bytes())
    body["agents"]["agent-3"]["spec"]["tools"][0]["action"] = {"type": "teleport"}
    with pytest.raises(ValidationError):
        Bundle.from_bytes(orjson.dumps(body))


# A watcher in a fresh interpreter: how much its RSS grew from before the watch started to after the
# bundle was loaded, and the bundle's JSON size.
WATCHING = """
import asyncio, gc, sys
from agentstudio import bundle_store, bus

def rss():
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmRSS:"))

async def main():
    nc = await bus.connect(sys.argv[1], "test-bundle-memory")
    store = await bundle_store.buckets(nc.jetstream())
    gc.collect()
    before = rss()
    watcher = bundle_store.BundleWatcher(store)
    await watcher.start()
    await asyncio.wait_for(watcher.loaded.wait(), 60)
    bundle = watcher.snapshot.bundles["memory"]
    gc.collect()
    print(rss() - before, len(bundle.to_bytes()))
    await watcher.stop()
    await nc.close()

asyncio.run(main())
"""


def test_a_process_that_loaded_a_bundle_holds_what_it_keeps_not_what_parsing_took(tmp_path: Path) -> None:
    result = compile_bundle("memory", resources(1000), {"key": [KeyMaterial(keys.digest(keys.generate("live")))]})
    assert result.bundle is not None, result.errors
    with NatsServer(tmp_path / "nats") as server:
        async def publish() -> None:
            nc = await bus.connect(server.url, "test-bundle-memory")
            await bundle_store.publish(await bundle_store.buckets(nc.jetstream()), result.bundle)
            await nc.close()

        asyncio.run(publish())
        run = subprocess.run([sys.executable, "-c", WATCHING, server.url], capture_output=True, text=True,
                             timeout=120)
    assert run.returncode == 0, run.stderr
    grown, json_bytes = map(int, run.stdout.split())
    # Parsing a body takes far more than the bundle keeps (the JSON's tree, each agent as a model on
    # its way to JSON), and the C heap kept it: RSS grew 2.3 times the bundle's JSON, 1.2 once given back.
    assert grown < 1.6 * json_bytes, f"RSS grew {grown / json_bytes:.1f} times the bundle's {json_bytes} bytes"
