"""Bundle storage: a namespace far past NATS's 1 MiB message limit (5,000 agents, 5,000 workflows and
5,000 keys) compiles, publishes, loads at ingest and takes a change, through the store and through
`agent-studio dev`; publishers racing never overwrite each other; old bodies are deleted."""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from agentstudio import bundle_store, bus, keys
from agentstudio.bundle import Bundle, KeyMaterial, compile_bundle
from agentstudio.bundle_store import BundleWatcher, Head
from agentstudio.manifests import parse
from agentstudio.natsserver import NatsServer, free_port
from conftest import Tenant, docs, ingest_client, wait_for_bundle
from test_dev import DevProcess, ready

N = 5000
API = "agentstudio.io/v1alpha1"
PROMPT = ("You are the assistant of campaign {i}. Greet {{{{user.name}}}} briefly, ask whether the trial "
          "worked for them and whether they want help, then thank them and end the call. Keep every "
          "answer short; never ask for payment details on the phone.")


def agent(i: int) -> str:
    return (f"apiVersion: {API}\nkind: Agent\nmetadata: {{name: agent-{i}}}\n"
            f"spec: {{prompt: \"{PROMPT.format(i=i)}\", firstMessage: \"Hi {{{{user.name}}}}\", "
            "tools: [{name: end_call, description: Hang up after saying goodbye., action: {type: end_call}}]}\n")


def workflow(i: int, entry: int | None = None) -> str:
    return (f"apiVersion: {API}\nkind: Workflow\nmetadata: {{name: workflow-{i}}}\n"
            f"spec: {{entryAgent: agent-{i if entry is None else entry}, sharedContext: {{company: Tap Health, campaign: 'c-{i}'}}, "
            "userContextSchema: {type: object, properties: {name: {type: string}}}}\n")


def api_key(i: int) -> str:
    return (f"apiVersion: {API}\nkind: ApiKey\nmetadata: {{name: key-{i}}}\n"
            "spec: {scopes: [\"calls:create\"], mode: test, rateLimitPerMinute: 600}\n")


def call(workflow_slug: str) -> dict[str, object]:
    return {"workflow_slug": workflow_slug, "phone_number": "+14155552671", "user_context": {"name": "Ana"}}


def manifests(n: int) -> dict[str, str]:
    """One file per kind, as a team with many campaigns would keep them."""
    return {f"{kind}.yaml": "---\n".join(make(i) for i in range(n))
            for kind, make in (("agents", agent), ("workflows", workflow), ("keys", api_key))}


@pytest.fixture(scope="module")
def own_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A server of its own for the big bundles: on the shared one, every later test's ingest and
    dialers would load them at start (seconds each), and wait_for_bundle would time out."""
    with NatsServer(tmp_path_factory.mktemp("nats-big-bundles")) as server:
        yield server


@pytest.fixture
async def own_js(own_nats: NatsServer) -> AsyncIterator[JetStreamContext]:
    nc = await bus.connect(own_nats.url, "test-big-bundles")
    js = nc.jetstream()
    await bus.ensure_calls_stream(js)
    yield js
    await nc.close()


async def test_the_store_carries_a_namespace_past_the_message_limit(own_js: JetStreamContext, own_nats: NatsServer) -> None:
    tenant = f"t-{uuid.uuid4().hex[:10]}"
    resources = docs("---\n".join(manifests(N).values()))
    plain = {f"key-{i}": keys.generate("test") for i in range(N)}
    material = {name: [KeyMaterial(keys.digest(key))] for name, key in plain.items()}
    figures: dict[str, float] = {}

    start = time.perf_counter()
    result = compile_bundle(tenant, resources, material)
    figures["compile_s"] = time.perf_counter() - start
    assert result.bundle is not None, [str(e) for e in result.errors[:5]]
    assert len(result.bundle.to_bytes()) > 4 * 1024 * 1024  # well past the 1 MiB a message may carry

    store = await bundle_store.buckets(own_js)
    start = time.perf_counter()
    published = await bundle_store.publish(store, result.bundle)
    figures["publish_s"] = time.perf_counter() - start

    start = time.perf_counter()
    async with ingest_client(own_nats.url) as (client, svc):
        await wait_for_bundle(svc, tenant, published.version, timeout=60)
        figures["load_s"] = time.perf_counter() - start
        resp = await client.post("/api/v1/webhooks/ingest", json=call("workflow-4999"),
                                 headers={"Authorization": f"Bearer {plain['key-4999']}"})
        assert resp.status_code == 201, resp.text

        # A change after that is in force: one more workflow.
        extra, _ = parse({"apiVersion": API, "kind": "Workflow", "metadata": {"name": "late"},
                          "spec": {"entryAgent": "agent-1"}}, "<test>", 0)
        assert extra is not None
        start = time.perf_counter()
        changed = compile_bundle(tenant, [*resources, extra], material).bundle
        assert changed is not None
        version = (await bundle_store.publish(store, changed)).version
        await wait_for_bundle(svc, tenant, version, timeout=60)
        figures["apply_to_in_force_s"] = time.perf_counter() - start
        assert version > published.version
        resp = await client.post("/api/v1/webhooks/ingest", json=call("late"),
                                 headers={"Authorization": f"Bearer {plain['key-0']}"})
        assert resp.status_code == 201, resp.text
    print("\n5,000 each through the store:", {k: round(v, 2) for k, v in figures.items()})


def test_dev_serves_a_folder_past_the_message_limit(tmp_path: Path) -> None:
    folder = tmp_path / "manifests"
    folder.mkdir()
    for name, text in manifests(N).items():
        (folder / name).write_text(text)
    start = time.monotonic()
    dev = DevProcess(folder, free_port())
    try:
        found: dict[str, str] = {}
        while (line := dev.expect(r"^(api key (\S+): (\S+)|ingest: )", timeout=120)).group(1) != "ingest: ":
            found[line.group(2)] = line.group(3)
        dev.process.wait_until(lambda: ready(dev.url), "dev's ingest ready")
        started = time.monotonic() - start
        ingest = f"{dev.url}/api/v1/webhooks/ingest"
        resp = httpx.post(ingest, json=call("workflow-4999"), headers={"Authorization": f"Bearer {found['key-4999']}"})
        assert resp.status_code == 201, resp.text

        # Editing one file is picked up: a workflow appended to the end of it.
        with (folder / "workflows.yaml").open("a") as file:
            file.write("---\n" + workflow(N, entry=0))
        start = time.monotonic()
        dev.expect(r"^bundle default: version (\d+)", timeout=120)
        applied = time.monotonic() - start
        resp = httpx.post(ingest, json=call(f"workflow-{N}"), headers={"Authorization": f"Bearer {found['key-0']}"})
        assert resp.status_code == 201, resp.text
        assert dev.interrupt() == 0
    finally:
        dev.process.kill()
    print(f"\n5,000 each through dev: start → ready {started:.1f} s, edit → in force {applied:.1f} s")


SMALL = """
apiVersion: agentstudio.io/v1alpha1
kind: Agent
metadata: {name: a}
spec: {prompt: "%s"}
"""


async def bodies(js: JetStreamContext, tenant: str) -> list[str]:
    """Every object of the tenant in the bodies bucket, deleted ones' markers included."""
    store = await bundle_store.buckets(js)
    try:
        infos = await store.bodies.list()
    except NotFoundError:  # the bucket is empty
        return []
    return sorted(i.name for i in infos if i.name.startswith(f"{tenant}/"))


async def until_version(watcher: BundleWatcher, tenant: str, version: int) -> None:
    for _ in range(500):
        if (current := watcher.snapshot.bundles.get(tenant)) is not None and current.version >= version:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the watcher never loaded {tenant} v{version}")


async def a_watcher_serves(store: bundle_store.Buckets, bundle: Bundle, agent: str) -> None:
    """A fresh watcher loads `bundle` (its version or newer) with `agent`'s prompt as published."""
    watcher = BundleWatcher(store)
    await watcher.start()
    try:
        await until_version(watcher, bundle.tenant, bundle.version)
        assert watcher.snapshot.bundles[bundle.tenant].agents[agent].spec.prompt == bundle.agents[agent].spec.prompt
    finally:
        await watcher.stop()


async def test_racing_publishers_each_get_their_own_version(js: JetStreamContext) -> None:
    t = Tenant(f"t-{uuid.uuid4().hex[:10]}", js, docs(SMALL % "v0"))
    await t.publish()
    store = await bundle_store.buckets(js)
    bundles = [compile_bundle(t.name, docs(SMALL % f"racer {i}"), {}).bundle for i in range(6)]
    published = await asyncio.gather(*(bundle_store.publish(store, b) for b in bundles if b is not None))
    versions = sorted(b.version for b in published)
    assert len(set(versions)) == 6  # each publish moved the head once, from the head it had read
    last = max(published, key=lambda b: b.version)
    head = Head.model_validate_json((await store.heads.get(t.name)).value)
    assert head.digest == last.digest
    await a_watcher_serves(store, last, "a")


async def test_republishing_the_same_content_keeps_the_version(js: JetStreamContext) -> None:
    t = Tenant(f"t-{uuid.uuid4().hex[:10]}", js, docs(SMALL % "same"))
    first = await t.publish()
    again = await t.publish()
    assert again.version == first.version
    assert len(await bodies(js, t.name)) == 1


async def test_replaced_bodies_are_deleted(js: JetStreamContext, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bundle_store, "STRAY_AGE_SECONDS", 0.0)  # no publisher runs beside this one
    t = Tenant(f"t-{uuid.uuid4().hex[:10]}", js, docs(SMALL % "v0"))
    store = await bundle_store.buckets(js)
    heads = []
    for i in range(4):
        await t.publish(docs(SMALL % f"v{i}"))
        heads.append(Head.model_validate_json((await store.heads.get(t.name)).value).body)
    # The current body and the one it replaced (a watcher may still be fetching it); no markers.
    assert await bodies(js, t.name) == sorted(heads[-2:])
    await bundle_store.remove(store, t.name)
    assert await bodies(js, t.name) == []


async def test_a_head_naming_a_missing_body_keeps_the_last_good_bundle(js: JetStreamContext) -> None:
    t = Tenant(f"t-{uuid.uuid4().hex[:10]}", js, docs(SMALL % "good"))
    good = await t.publish()
    store = await bundle_store.buckets(js)
    watcher = BundleWatcher(store)
    await watcher.start()
    try:
        await until_version(watcher, t.name, good.version)
        await store.heads.put(t.name, Head(body=f"{t.name}/missing", digest="0" * 64).model_dump_json().encode())
        later = await t.publish(docs(SMALL % "later"))
        await until_version(watcher, t.name, later.version)
        assert watcher.snapshot.bundles[t.name].agents["a"].spec.prompt == "later"
        assert watcher._task is not None and not watcher._task.done()  # noqa: SLF001 - the watch lives on
    finally:
        await watcher.stop()


async def test_a_body_that_compresses_badly_is_chunked(own_js: JetStreamContext) -> None:
    """Prompts of random text: even compressed, the body is past what one message may carry."""
    t = Tenant(f"t-{uuid.uuid4().hex[:10]}", own_js, docs("---\n".join(
        f"apiVersion: {API}\nkind: Agent\nmetadata: {{name: agent-{i}}}\nspec: {{prompt: {secrets.token_hex(1024)}}}\n"
        for i in range(1000))))
    bundle = await t.publish()
    store = await bundle_store.buckets(own_js)
    head = Head.model_validate_json((await store.heads.get(t.name)).value)
    info = await store.bodies.get_info(head.body)
    assert info.size is not None and info.size > 1024 * 1024 and (info.chunks or 0) > 8
    await a_watcher_serves(store, bundle, "agent-999")


async def test_watchers_loading_more_bodies_than_a_stream_allows_consumers_load_them_all(tmp_path: Path) -> None:
    """The server allows 1,000 consumers a stream and keeps a finished one for seconds: reading
    bodies through consumers, the 1,001st read in a few seconds failed and its tenant was not served."""
    with NatsServer(tmp_path / "nats") as server:
        nc = await bus.connect(server.url, "test-many-tenants")
        js = nc.jetstream()
        store = await bundle_store.buckets(js)
        resources = docs(SMALL % "v0")
        tenants = [f"t-{i:04d}" for i in range(600)]
        for name in tenants:
            result = compile_bundle(name, resources, {})
            assert result.bundle is not None
            await bundle_store.publish(store, result.bundle)
        watchers = [BundleWatcher(store), BundleWatcher(store)]  # 1,200 reads, as two processes starting
        try:
            for watcher in watchers:
                await watcher.start()
                await asyncio.wait_for(watcher.loaded.wait(), 60)
            assert [sorted(w.snapshot.bundles) for w in watchers] == [tenants, tenants]
        finally:
            for watcher in watchers:
                await watcher.stop()
            await nc.close()


async def test_a_watch_restarted_while_nats_is_away_keeps_trying_and_sees_the_next_bundle(tmp_path: Path) -> None:
    """A reconnection restarts the watch (its consumer is gone); in a cluster still electing leaders
    the first tries fail. One failed try used to leave the process with no watch at all: every later
    bundle (a new key, a changed prompt) was never seen."""
    with NatsServer(tmp_path / "nats") as server:
        nc = await bus.connect(server.url, "test-watch-restart")
        watcher: BundleWatcher | None = None
        try:
            js = nc.jetstream(timeout=1)
            t = Tenant(f"t-{uuid.uuid4().hex[:10]}", js, docs(SMALL % "before"))
            first = await t.publish()
            watcher = BundleWatcher(await bundle_store.buckets(js))
            await watcher.start()
            await until_version(watcher, t.name, first.version)
            server.stop(kill=True)
            watcher.restart_soon()  # as a reconnection does; NATS is not there to start a watch
            await asyncio.sleep(1)
            server.start()
            async with asyncio.timeout(20):
                while True:
                    try:
                        later = await t.publish(docs(SMALL % "after"))
                        break
                    except (NatsError, asyncio.TimeoutError):
                        await asyncio.sleep(0.2)
                while (b := watcher.snapshot.bundles.get(t.name)) is None or b.version < later.version:
                    await asyncio.sleep(0.05)
            assert watcher.snapshot.bundles[t.name].agents["a"].spec.prompt == "after"
        finally:
            if watcher is not None:
                await watcher.stop()
            await nc.close()
