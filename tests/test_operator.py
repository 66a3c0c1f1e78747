"""The operator against a real kube-apiserver + etcd, with its own RBAC identity, and a real NATS."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException
from lupa import LuaRuntime

import controlplane
import kstatus
from agentstudio.ingest.service import IngestService
from agentstudio.natsserver import NatsServer
from agentstudio.resources import GROUP, KINDS, VERSION
from conftest import EXAMPLES, SEED_BODY, ingest_client

PLURALS = {kind: model.PLURAL for kind, model in KINDS.items()}
ARGOCD_CM = EXAMPLES / "argocd" / "argocd-cm.yaml"


def argocd_health(obj: dict[str, Any]) -> dict[str, str]:
    """What Argo CD says of `obj` with the health check in examples/argocd: it runs the script of the
    object's group and kind with the object as the global `obj`, and reads back {status, message}."""
    scripts = yaml.safe_load(ARGOCD_CM.read_text())["data"]
    lua = LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    health = lua.execute(scripts[f"resource.customizations.health.agentstudio.io_{obj['kind']}"])
    return {"status": health["status"], "message": health["message"]}


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[controlplane.ControlPlane]:
    plane = controlplane.start(tmp_path_factory.mktemp("controlplane"))
    yield plane
    plane.stop()


def manifests(path: Path) -> list[dict[str, Any]]:
    docs = []
    for file in sorted(path.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(file.read_text()) if d]
    return docs


@dataclass
class Cluster:
    """What a tenant's admin does (as cluster admin) and sees, plus the operator process."""

    plane: controlplane.ControlPlane
    nats: NatsServer
    log: Path
    namespaces: list[str]
    proc: subprocess.Popen[bytes] | None = None

    @property
    def custom(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.plane.api())

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.plane.api())

    def start_operator(self, **settings: str) -> None:
        env = {**os.environ, "KUBECONFIG": str(self.plane.kubeconfig("operator")),
               "AGENTSTUDIO_NATS_URL": self.nats.url, "AGENTSTUDIO_LOG_LEVEL": "DEBUG", **settings}
        args = [str(Path(sys.executable).parent / "agent-studio"), "operator"]
        for ns in self.namespaces:
            args += ["-n", ns]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)

    def stop_operator(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def apply(self, namespace: str, docs: list[dict[str, Any]]) -> None:
        for doc in docs:
            plural = PLURALS[doc["kind"]]
            name = doc["metadata"]["name"]
            try:
                current = self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
            except ApiException as exc:
                if exc.status != 404:
                    raise
                self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, plural, doc, field_validation="Strict")
            else:
                doc = {**doc, "metadata": {**doc["metadata"], "resourceVersion": current["metadata"]["resourceVersion"]}}
                self.custom.replace_namespaced_custom_object(GROUP, VERSION, namespace, plural, name, doc, field_validation="Strict")

    def get(self, namespace: str, kind: str, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURALS[kind], name)

    def delete(self, namespace: str, kind: str, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURALS[kind], name)

    def ready(self, namespace: str, kind: str, name: str) -> dict[str, Any] | None:
        obj = self.get(namespace, kind, name)
        status = obj.get("status") or {}
        if status.get("observedGeneration") != obj["metadata"]["generation"]:
            return None
        return next((c for c in status.get("conditions", []) if c["type"] == "Ready"), None)

    def wait_ready(self, namespace: str, kind: str, name: str, status: str = "True", timeout: float = 30) -> dict[str, Any]:
        """What `kubectl wait --for=condition=Ready=<status>` does."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            condition = self.ready(namespace, kind, name)
            if condition is not None and condition["status"] == status:
                return condition
            time.sleep(0.1)
        raise AssertionError(f"{kind}/{name} not Ready={status}: {self.get(namespace, kind, name).get('status')}\n"
                             + self.log.read_text()[-3000:])

    def api_key(self, namespace: str, name: str) -> str:
        secret = self.core.read_namespaced_secret(f"{name}-api-key", namespace)
        return base64.b64decode(secret.data["key"]).decode()

    def events(self, namespace: str, name: str) -> list[client.CoreV1Event]:
        return [e for e in self.core.list_namespaced_event(namespace).items if e.involved_object.name == name]


@pytest.fixture
def cluster(control_plane: controlplane.ControlPlane, nats_server: NatsServer, tmp_path: Path) -> Iterator[Cluster]:
    namespaces = [f"t-{uuid.uuid4().hex[:8]}", f"t-{uuid.uuid4().hex[:8]}"]
    for ns in namespaces:
        control_plane.tenant_namespace(ns)
    c = Cluster(control_plane, nats_server, tmp_path / "operator.log", namespaces)
    c.start_operator()
    yield c
    c.stop_operator()


@pytest.fixture
async def ingest(nats_server: NatsServer) -> AsyncIterator[tuple[httpx.AsyncClient, IngestService]]:
    async with ingest_client(nats_server.url) as pair:
        yield pair


async def eventually(check, timeout: float = 15) -> Any:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


async def post(client_: httpx.AsyncClient, key: str, body: dict[str, Any] = SEED_BODY) -> int:
    resp = await client_.post("/api/v1/webhooks/ingest", json=body, headers={"Authorization": f"Bearer {key}"})
    return resp.status_code


async def test_examples_become_a_bundle_and_keys_work_until_deleted(cluster: Cluster, ingest) -> None:  # type: ignore[no-untyped-def]
    client_, svc = ingest
    ns = cluster.namespaces[0]
    cluster.apply(ns, manifests(EXAMPLES))
    for doc in manifests(EXAMPLES):
        cluster.wait_ready(ns, doc["kind"], doc["metadata"]["name"])

    secret = cluster.core.read_namespaced_secret("clevertap-api-key", ns)
    owner = secret.metadata.owner_references[0]
    assert (owner.kind, owner.name, owner.controller) == ("ApiKey", "clevertap", True)
    assert owner.uid == cluster.get(ns, "ApiKey", "clevertap")["metadata"]["uid"]
    whsec = cluster.core.read_namespaced_secret("results-webhook-secret", ns)
    assert base64.b64decode(whsec.data["secret"]).decode().startswith("whsec_")

    key = cluster.api_key(ns, "clevertap")
    status = cluster.get(ns, "ApiKey", "clevertap")["status"]
    assert status["keyHint"] == f"as_live_…{key[-4:]}" and status["scopes"] == ["calls:create"]
    assert cluster.get(ns, "Workflow", "free-trial-followup")["status"]["slug"] == "free-trial-followup"

    assert await eventually(lambda: _status_is(client_, key, 201))
    await post(client_, key, {"phone_number": "+1"})  # a rejected request counts as a request
    await svc.usage.flush()  # ingest does this every few seconds

    async def usage_shown():  # type: ignore[no-untyped-def]
        s = cluster.get(ns, "ApiKey", "clevertap").get("status", {})
        return s if s.get("requestCount") else None

    shown = await eventually(usage_shown, timeout=20)
    assert shown["requestCount"] >= 2 and shown["acceptedCount"] >= 1 and shown["lastUsedAt"]
    braze = cluster.api_key(ns, "braze")
    assert await eventually(lambda: _status_is(client_, braze, 201))
    webengage = cluster.api_key(ns, "webengage")  # platform: webengage compiles to "answer 200"
    assert await eventually(lambda: _status_is(client_, webengage, 200))
    disabled = cluster.get(ns, "ApiKey", "braze")
    disabled["spec"]["disabled"] = True
    cluster.custom.replace_namespaced_custom_object(GROUP, VERSION, ns, "apikeys", "braze", disabled)
    assert await eventually(lambda: _status_is(client_, braze, 401), timeout=10)

    cluster.delete(ns, "ApiKey", "clevertap")
    assert await eventually(lambda: _status_is(client_, key, 401), timeout=10)


async def _status_is(client_: httpx.AsyncClient, key: str, code: int) -> bool:
    return await post(client_, key) == code


async def _posts(client_: httpx.AsyncClient, key: str, body: dict[str, Any], code: int) -> bool:
    return await post(client_, key, body) == code


async def test_prompt_change_reaches_ingest_as_a_new_version(cluster: Cluster, ingest) -> None:  # type: ignore[no-untyped-def]
    _, svc = ingest
    ns = cluster.namespaces[0]
    cluster.apply(ns, manifests(EXAMPLES))
    cluster.wait_ready(ns, "Agent", "trial-followup-agent")
    # (The tenant's empty bundle comes first: wait for the one with the examples.)
    first = await eventually(lambda: _bundle_with(svc, ns, "trial-followup-agent"))
    agent = cluster.get(ns, "Agent", "trial-followup-agent")
    # user.coupon is not in the workflow's userContextSchema: a warning, which never blocks publishing.
    prompt = "You are calling {{user.name}} about {{user.coupon}}. Be brief."
    agent["spec"]["prompt"] = prompt
    cluster.custom.replace_namespaced_custom_object(GROUP, VERSION, ns, "agents", "trial-followup-agent", agent)

    async def changed():  # type: ignore[no-untyped-def]
        b = svc.snapshot.bundles.get(ns)
        return b if b and b.version > first.version else None

    second = await eventually(changed)
    assert second.agents["trial-followup-agent"].spec.prompt == prompt
    condition = cluster.wait_ready(ns, "Agent", "trial-followup-agent")
    assert condition["reason"] == "Published"
    assert condition["message"].startswith(f"live since bundle version {second.version}; warnings: spec.prompt: user.coupon")

    async def warned():  # type: ignore[no-untyped-def]
        return [e for e in cluster.events(ns, "trial-followup-agent") if e.reason == "UndeclaredVariable"]

    events = await eventually(warned)
    await asyncio.sleep(1)
    assert len(await warned()) == 1 and events[0].type == "Warning"  # once, not on every compile
    assert "user.coupon is not declared in workflow free-trial-followup" in events[0].message


async def _bundle(svc: IngestService, ns: str):  # type: ignore[no-untyped-def]
    return svc.snapshot.bundles.get(ns)


async def _newer(svc: IngestService, ns: str, version: int) -> bool:
    bundle = svc.snapshot.bundles.get(ns)
    return bundle is not None and bundle.version > version


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ({"kind": "Agent", "metadata": {"name": "a"}, "spec": {"slug": "Bad_Slug", "prompt": "x"}}, "spec.slug"),
        ({"kind": "Workflow", "metadata": {"name": "w"}, "spec": {"entryAgent": "Bad_Slug"}},
         "must be lowercase letters, digits and dashes, starting and ending with a letter or digit"),
        ({"kind": "Agent", "metadata": {"name": "a"}, "spec": {}}, "spec.prompt"),
        ({"kind": "Agent", "metadata": {"name": "a"}, "spec": {"prompt": "x", "frstMessage": "hi"}}, "frstMessage"),
        ({"kind": "Agent", "metadata": {"name": "a"},
          "spec": {"prompt": "x", "tools": [{"name": "t", "action": {"type": "api_call"}}]}}, "api_call needs url"),
        ({"kind": "ApiKey", "metadata": {"name": "k"}, "spec": {"scopes": ["calls:delete"]}}, "spec.scopes[0]"),
        ({"kind": "ApiKey", "metadata": {"name": "k"}, "spec": {"scopes": ["calls:create"], "successStatus": 202}},
         "spec.successStatus: Unsupported value"),
        ({"kind": "WebhookSubscription", "metadata": {"name": "w"},
          "spec": {"url": "https://x.example", "events": ["call.exploded"]}}, "spec.events[0]"),
        ({"kind": "Workflow", "metadata": {"name": "w"}, "spec": {}}, "spec.entryAgent"),
        ({"kind": "WebhookSubscription", "metadata": {"name": "crm.results"},
          "spec": {"url": "https://x.example", "events": ["call.completed"]}}, "metadata.name must be lowercase"),
        ({"kind": "CallPolicy", "metadata": {"name": "p"}, "spec": {"cap": {"count": 1, "windowSeconds": 91 * 86400}}},
         "spec.cap.windowSeconds: Invalid value: 7862400: spec.cap.windowSeconds in body should be less than or equal to 7776000"),
    ],
)
def test_the_api_server_rejects_bad_manifests_naming_the_field(
    control_plane: controlplane.ControlPlane, doc: dict[str, Any], expected: str
) -> None:
    ns = f"t-{uuid.uuid4().hex[:8]}"
    control_plane.tenant_namespace(ns)
    api = client.CustomObjectsApi(control_plane.api())
    body = {"apiVersion": f"{GROUP}/{VERSION}", **doc}
    with pytest.raises(ApiException) as raised:
        api.create_namespaced_custom_object(GROUP, VERSION, ns, PLURALS[doc["kind"]], body, field_validation="Strict")
    assert raised.value.status in (400, 422)
    assert expected in raised.value.body


async def test_workflow_naming_a_missing_agent_is_not_ready_and_changes_nothing(cluster: Cluster, ingest) -> None:  # type: ignore[no-untyped-def]
    _, svc = ingest
    ns = cluster.namespaces[0]
    cluster.apply(ns, manifests(EXAMPLES))
    cluster.wait_ready(ns, "Workflow", "free-trial-followup")
    good = await eventually(lambda: _bundle_with(svc, ns, "trial-followup-agent"))
    broken = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Workflow", "metadata": {"name": "winback"},
              "spec": {"entryAgent": "winback-agent"}}
    cluster.apply(ns, [broken])
    condition = cluster.wait_ready(ns, "Workflow", "winback", status="False")
    assert condition["reason"] == "AgentNotFound" and "winback-agent" in condition["message"]
    assert condition["lastTransitionTime"]
    # kopf posts events from a queue of its own, so one may land after the condition it explains.
    async def warned():  # type: ignore[no-untyped-def]
        return [e for e in cluster.events(ns, "winback") if e.type == "Warning"]

    events = await eventually(warned)
    assert events[0].reason == "AgentNotFound"
    await asyncio.sleep(1)
    assert svc.snapshot.bundles[ns].version == good.version  # the last good bundle stays in force

    cluster.apply(ns, [{"apiVersion": f"{GROUP}/{VERSION}", "kind": "Agent", "metadata": {"name": "winback-agent"},
                        "spec": {"prompt": "Win {{user.name}} back."}}])
    cluster.wait_ready(ns, "Workflow", "winback")
    cluster.wait_ready(ns, "Agent", "winback-agent")
    assert await eventually(lambda: _newer(svc, ns, good.version))


async def test_a_call_policy_reaches_the_bundle_and_a_missing_or_broken_one_is_reported(cluster: Cluster, ingest) -> None:  # type: ignore[no-untyped-def]
    _, svc = ingest
    ns = cluster.namespaces[0]
    cluster.apply(ns, manifests(EXAMPLES))
    cluster.wait_ready(ns, "Workflow", "free-trial-followup")
    good = await eventually(lambda: _bundle_with(svc, ns, "trial-followup-agent"))
    workflow = cluster.get(ns, "Workflow", "free-trial-followup")
    workflow["spec"]["callPolicy"] = "evenings"
    cluster.apply(ns, [{k: workflow[k] for k in ("apiVersion", "kind", "metadata", "spec")}])
    condition = cluster.wait_ready(ns, "Workflow", "free-trial-followup", status="False")
    assert condition["reason"] == "CallPolicyNotFound" and "'evenings'" in condition["message"]
    await asyncio.sleep(1)
    assert svc.snapshot.bundles[ns].version == good.version  # the last good bundle stays in force

    # A preset our models do not know passes the CRD schema (it is data, not an enum) but not the compile.
    policy = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "CallPolicy", "metadata": {"name": "evenings"},
              "spec": {"preset": "narnia", "retries": {"maxAttempts": 2}}}
    cluster.apply(ns, [policy])
    condition = cluster.wait_ready(ns, "CallPolicy", "evenings", status="False")
    assert "'narnia' is not a preset" in condition["message"], condition
    policy["spec"]["preset"] = "none"
    policy["spec"]["hours"] = {"mon": ["18:00-21:00"], "defaultZone": "Asia/Kolkata"}
    cluster.apply(ns, [policy])
    cluster.wait_ready(ns, "CallPolicy", "evenings")
    cluster.wait_ready(ns, "Workflow", "free-trial-followup")
    await eventually(lambda: _newer(svc, ns, good.version))
    applied = svc.snapshot.bundles[ns].policy_for("free-trial-followup", None)
    assert applied is not None and applied.retries.max_attempts == 2 and str(applied.hours.mon[0]) == "18:00-21:00"


def test_a_workflow_naming_an_agent_our_models_refuse_says_it_is_invalid(cluster: Cluster) -> None:
    """Duplicate tool names pass the CRD schema but not the Agent model: the Workflow that names the
    agent must say the agent is invalid, not that it does not exist."""
    ns = cluster.namespaces[0]
    end = {"name": "bye", "action": {"type": "end_call"}}
    cluster.apply(ns, [
        {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Agent", "metadata": {"name": "twin-tools"},
         "spec": {"prompt": "Hello.", "tools": [end, end]}},
        {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Workflow", "metadata": {"name": "twins"},
         "spec": {"entryAgent": "twin-tools"}},
    ])
    agent = cluster.wait_ready(ns, "Agent", "twin-tools", status="False")
    assert "duplicate tool names: bye" in agent["message"], agent
    workflow = cluster.wait_ready(ns, "Workflow", "twins", status="False")
    assert workflow["reason"] == "AgentInvalid", workflow
    assert workflow["message"].startswith("spec.entryAgent: agent 'twin-tools' is invalid: "), workflow
    assert "duplicate tool names: bye" in workflow["message"], workflow


async def test_a_key_only_reaches_its_own_namespace(cluster: Cluster, ingest) -> None:  # type: ignore[no-untyped-def]
    client_, _ = ingest
    a, b = cluster.namespaces
    cluster.apply(a, manifests(EXAMPLES))
    other = [d for d in manifests(EXAMPLES) if d["kind"] in ("Agent", "ApiKey")] + [
        {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Workflow", "metadata": {"name": "b-only"},
         "spec": {"entryAgent": "trial-followup-agent"}}]
    cluster.apply(b, other)
    cluster.wait_ready(a, "ApiKey", "clevertap")
    cluster.wait_ready(b, "Workflow", "b-only")
    key_a, key_b = cluster.api_key(a, "clevertap"), cluster.api_key(b, "clevertap")
    assert key_a != key_b
    b_only = {**SEED_BODY, "workflow_slug": "b-only"}
    assert await eventually(lambda: _posts(client_, key_b, b_only, 201))
    assert await eventually(lambda: _status_is(client_, key_a, 201))
    assert await post(client_, key_a, b_only) == 404
    assert await post(client_, key_b, SEED_BODY) == 404  # free-trial-followup exists only in A


async def test_rotation_keeps_both_keys_for_the_grace_period(cluster: Cluster, ingest) -> None:  # type: ignore[no-untyped-def]
    client_, _ = ingest
    ns = cluster.namespaces[0]
    cluster.apply(ns, manifests(EXAMPLES))
    cluster.wait_ready(ns, "ApiKey", "clevertap")
    old = cluster.api_key(ns, "clevertap")
    assert await eventually(lambda: _status_is(client_, old, 201))

    apikey = cluster.get(ns, "ApiKey", "clevertap")
    apikey["spec"]["rotation"] = {"id": "2026-11", "gracePeriodSeconds": 6}
    cluster.custom.replace_namespaced_custom_object(GROUP, VERSION, ns, "apikeys", "clevertap", apikey)
    new = await eventually(lambda: _new_key(cluster, ns, old))
    cluster.wait_ready(ns, "ApiKey", "clevertap")
    assert await eventually(lambda: _status_is(client_, new, 201))
    assert await post(client_, old) == 201  # still inside the grace period
    status = cluster.get(ns, "ApiKey", "clevertap")["status"]
    assert status["keyHint"].endswith(new[-4:]) and status["previousKeyValidUntil"]
    assert await eventually(lambda: _status_is(client_, old, 401), timeout=15)
    assert await post(client_, new) == 201


async def _new_key(cluster: Cluster, ns: str, old: str) -> str | None:
    key = cluster.api_key(ns, "clevertap")
    return key if key != old else None


async def test_secret_values_never_appear_in_logs_status_or_events(cluster: Cluster, ingest) -> None:  # type: ignore[no-untyped-def]
    ns = cluster.namespaces[0]
    cluster.apply(ns, manifests(EXAMPLES))
    for doc in manifests(EXAMPLES):
        cluster.wait_ready(ns, doc["kind"], doc["metadata"]["name"])
    cluster.apply(ns, [{"apiVersion": f"{GROUP}/{VERSION}", "kind": "Workflow", "metadata": {"name": "broken"},
                        "spec": {"entryAgent": "nobody"}}])
    cluster.wait_ready(ns, "Workflow", "broken", status="False")
    values = [base64.b64decode(v).decode() for s in cluster.core.list_namespaced_secret(ns).items
              for v in (s.data or {}).values()]
    assert len(values) >= 7
    seen = cluster.log.read_text()
    seen += yaml.safe_dump([cluster.get(ns, d["kind"], d["metadata"]["name"]) for d in manifests(EXAMPLES)])
    seen += str([e.to_dict() for e in cluster.core.list_namespaced_event(ns).items])
    assert "bundle published" in seen
    for value in values:
        assert value not in seen
        assert value[-12:] not in seen


async def test_restart_regenerates_nothing(cluster: Cluster) -> None:
    ns = cluster.namespaces[0]
    cluster.apply(ns, manifests(EXAMPLES))
    for doc in manifests(EXAMPLES):
        cluster.wait_ready(ns, doc["kind"], doc["metadata"]["name"])
    before = {s.metadata.name: (s.metadata.resource_version, s.data) for s in cluster.core.list_namespaced_secret(ns).items}
    cluster.stop_operator()
    cluster.start_operator()
    await asyncio.sleep(3)  # let it resume every object
    cluster.apply(ns, [{"apiVersion": f"{GROUP}/{VERSION}", "kind": "Agent", "metadata": {"name": "after-restart"},
                        "spec": {"prompt": "hi"}}])
    cluster.wait_ready(ns, "Agent", "after-restart")
    after = {s.metadata.name: (s.metadata.resource_version, s.data) for s in cluster.core.list_namespaced_secret(ns).items}
    assert after == before


async def test_two_replicas_do_not_fight(cluster: Cluster, tmp_path: Path) -> None:
    ns = cluster.namespaces[0]
    cluster.apply(ns, manifests(EXAMPLES))
    cluster.wait_ready(ns, "Agent", "trial-followup-agent")
    second = Cluster(cluster.plane, cluster.nats, tmp_path / "second.log", cluster.namespaces)
    second.start_operator()
    try:
        logs = (cluster.log, second.log)
        peering = lambda: cluster.custom.get_namespaced_custom_object(  # noqa: E731
            "kopf.dev", "v1", ns, "kopfpeerings", "agent-studio").get("status") or {}
        deadline = time.monotonic() + 30
        while len(peering()) < 2:  # both replicas have announced themselves with their priorities
            assert time.monotonic() < deadline, peering()
            await asyncio.sleep(0.2)
        await asyncio.sleep(1)  # the lower priority one pauses on seeing the higher one
        sizes = [log.stat().st_size for log in logs]
        cluster.apply(ns, [{"apiVersion": f"{GROUP}/{VERSION}", "kind": "Agent", "metadata": {"name": "later"},
                            "spec": {"prompt": "hi"}}])
        cluster.wait_ready(ns, "Agent", "later")
        await asyncio.sleep(1)
        published = ["bundle published" in log.read_text()[size:] for log, size in zip(logs, sizes)]
        assert published.count(True) == 1, published  # one replica works, the other stands by
    finally:
        second.stop_operator()


def test_kubectl_get_agentstudio_lists_all_five_kinds(control_plane: controlplane.ControlPlane) -> None:
    """`kubectl get agentstudio` expands the category through discovery; check what it reads."""
    ca = ssl.create_default_context(cafile=str(control_plane.directory / "certs" / "ca.crt"))
    discovery = httpx.get(f"{control_plane.url}/apis/{GROUP}/{VERSION}", verify=ca,
                          headers={"Authorization": f"Bearer {control_plane.tokens['admin']}"}).json()
    in_category = {r["kind"] for r in discovery["resources"] if "agentstudio" in r.get("categories", [])}
    assert in_category == {"Agent", "Workflow", "ApiKey", "WebhookSubscription", "CallPolicy"}


async def test_a_key_from_a_gitops_managed_secret(cluster: Cluster, ingest) -> None:  # type: ignore[no-untyped-def]
    client_, _ = ingest
    ns = cluster.namespaces[0]
    cluster.apply(ns, [d for d in manifests(EXAMPLES) if d["kind"] != "ApiKey"])
    sealed = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ApiKey", "metadata": {"name": "sealed"},
              "spec": {"scopes": ["calls:create"], "secretRef": {"name": "platform-key", "key": "token"}}}
    cluster.apply(ns, [sealed])
    condition = cluster.wait_ready(ns, "ApiKey", "sealed", status="False")
    assert condition["reason"] == "SecretNotFound"

    key = "as_live_" + "Gitops" * 6
    cluster.core.create_namespaced_secret(ns, client.V1Secret(
        metadata=client.V1ObjectMeta(name="platform-key"), string_data={"token": key}))
    apikey = cluster.get(ns, "ApiKey", "sealed")
    apikey["metadata"].setdefault("labels", {})["touched"] = "yes"  # a change makes the operator look again
    apikey["spec"]["platform"] = "braze"
    cluster.custom.replace_namespaced_custom_object(GROUP, VERSION, ns, "apikeys", "sealed", apikey)
    cluster.wait_ready(ns, "ApiKey", "sealed")
    assert await eventually(lambda: _status_is(client_, key, 201))
    with pytest.raises(ApiException):  # nothing was generated for it
        cluster.core.read_namespaced_secret("sealed-api-key", ns)


async def test_a_receiver_that_answered_410_shows_on_its_subscription(cluster: Cluster, js) -> None:  # type: ignore[no-untyped-def]
    from agentstudio import bus

    ns = cluster.namespaces[0]
    cluster.apply(ns, manifests(EXAMPLES))
    cluster.wait_ready(ns, "WebhookSubscription", "results")
    _, gone = await bus.ensure_webhooks(js)
    # What a dialer records when the receiver answers 410 Gone:
    await gone.put(f"{ns}.results", orjson.dumps({"reason": "410", "url": "https://example.com/webhooks/call-results"}))
    condition = cluster.wait_ready(ns, "WebhookSubscription", "results", status="False")
    assert condition["reason"] == "ReceiverGone" and "410" in condition["message"]
    async def gone_event():  # type: ignore[no-untyped-def]
        return any(e.reason == "ReceiverGone" for e in cluster.events(ns, "results"))

    assert await eventually(gone_event)
    sub = cluster.get(ns, "WebhookSubscription", "results")
    sub["spec"]["url"] = "https://example.com/webhooks/v2"
    cluster.custom.replace_namespaced_custom_object(GROUP, VERSION, ns, "webhooksubscriptions", "results", sub)
    cluster.wait_ready(ns, "WebhookSubscription", "results")  # a new URL is the user's answer


async def test_a_template_the_sandbox_would_refuse_is_not_ready_and_never_published(cluster: Cluster, ingest) -> None:  # type: ignore[no-untyped-def]
    _, svc = ingest
    ns = cluster.namespaces[0]
    cluster.apply(ns, [{"apiVersion": f"{GROUP}/{VERSION}", "kind": "Agent", "metadata": {"name": "sneaky"},
                        "spec": {"prompt": "{% for cycler in [] %}{% endfor %}{{ cycler }} {{ ''.__class__.__mro__ }}"}}])
    condition = cluster.wait_ready(ns, "Agent", "sneaky", status="False")
    assert condition["reason"] == "InvalidTemplate"
    assert "'cycler'" in condition["message"] and "'__class__'" in condition["message"], condition["message"]
    await asyncio.sleep(1)
    bundle = svc.snapshot.bundles.get(ns)  # the tenant's empty bundle from the start, at most
    assert bundle is None or bundle.agents == {}


def test_a_new_object_reads_in_progress_until_the_operator_reports(control_plane: controlplane.ControlPlane) -> None:
    """Flux judges with kstatus, which calls an object with no status Current: a broken manifest would
    pass Flux's health check before the operator ever looked at it (and forever with no operator)."""
    ns = f"t-{uuid.uuid4().hex[:8]}"
    control_plane.tenant_namespace(ns)
    api = client.CustomObjectsApi(control_plane.api())
    docs = manifests(EXAMPLES)
    for doc in docs:  # no operator serves this namespace
        api.create_namespaced_custom_object(GROUP, VERSION, ns, PLURALS[doc["kind"]], doc)
    objects = [api.get_namespaced_custom_object(GROUP, VERSION, ns, PLURALS[d["kind"]], d["metadata"]["name"])
               for d in docs]
    assert [r["status"] for r in kstatus.compute(*objects)] == ["InProgress"] * len(docs), objects[0].get("status")
    assert {argocd_health(o)["status"] for o in objects} == {"Progressing"}


async def test_flux_and_argocd_see_a_broken_manifest_fail_at_once(cluster: Cluster) -> None:
    ns = cluster.namespaces[0]
    docs = manifests(EXAMPLES)
    cluster.apply(ns, docs)
    for doc in docs:
        cluster.wait_ready(ns, doc["kind"], doc["metadata"]["name"])
    objects = [cluster.get(ns, d["kind"], d["metadata"]["name"]) for d in docs]
    assert {r["status"] for r in kstatus.compute(*objects)} == {"Current"}
    assert {argocd_health(o)["status"] for o in objects} == {"Healthy"}

    cluster.apply(ns, [{"apiVersion": f"{GROUP}/{VERSION}", "kind": "Workflow", "metadata": {"name": "winback"},
                        "spec": {"entryAgent": "winback-agent"}}])
    cluster.wait_ready(ns, "Workflow", "winback", status="False")
    broken = cluster.get(ns, "Workflow", "winback")
    conditions = {c["type"]: c for c in broken["status"]["conditions"]}
    assert (conditions.get("Stalled") or {}).get("status") == "True", conditions
    assert conditions["Stalled"]["reason"] == "AgentNotFound"
    [verdict] = kstatus.compute(broken)
    assert verdict["status"] == "Failed" and "winback-agent" in verdict["message"]
    health = argocd_health(broken)
    assert health["status"] == "Degraded" and health["message"].startswith("AgentNotFound: ")

    cluster.apply(ns, [{"apiVersion": f"{GROUP}/{VERSION}", "kind": "Agent", "metadata": {"name": "winback-agent"},
                        "spec": {"prompt": "Win {{user.name}} back."}}])
    cluster.wait_ready(ns, "Workflow", "winback")
    fixed = cluster.get(ns, "Workflow", "winback")
    assert [c["type"] for c in fixed["status"]["conditions"]] == ["Ready"]  # Stalled is gone, not False
    assert kstatus.compute(fixed)[0]["status"] == "Current" and argocd_health(fixed)["status"] == "Healthy"


def _watch_statuses(cluster: Cluster, ns: str, name: str, since: str, generation: int) -> list[dict[str, Any]]:
    """Every version of Agent `name` after resourceVersion `since`, up to the one reporting `generation`."""
    seen = []
    stream = watch.Watch().stream(cluster.custom.list_namespaced_custom_object, GROUP, VERSION, ns, "agents",
                                  field_selector=f"metadata.name={name}", resource_version=since, timeout_seconds=30)
    for event in stream:
        obj = event["object"]
        seen.append(obj)
        if (obj.get("status") or {}).get("observedGeneration") == generation:
            break
    return seen


async def test_a_change_writes_the_status_of_the_changed_object_only(cluster: Cluster, ingest) -> None:  # type: ignore[no-untyped-def]
    _, svc = ingest
    ns = cluster.namespaces[0]
    docs = manifests(EXAMPLES) + [
        {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Agent", "metadata": {"name": f"extra-{i}"},
         "spec": {"prompt": f"Agent {i}."}} for i in range(20)]
    cluster.apply(ns, docs)
    for doc in docs:
        cluster.wait_ready(ns, doc["kind"], doc["metadata"]["name"])
    first = await eventually(lambda: _bundle_with(svc, ns, "extra-19"))
    before = {(d["kind"], d["metadata"]["name"]): cluster.get(ns, d["kind"], d["metadata"]["name"]) for d in docs}

    agent = before[("Agent", "trial-followup-agent")]
    agent["spec"]["prompt"] = "You are calling {{user.name}}. A new prompt."
    plane = cluster.plane
    status_writes = lambda: sum(plane.requests_served(p, ("PATCH", "UPDATE"), GROUP, "status")  # noqa: E731
                                for p in PLURALS.values())
    writes, secret_reads = status_writes(), plane.requests_served("secrets", ("GET",))
    changed = await asyncio.to_thread(cluster.custom.replace_namespaced_custom_object, GROUP, VERSION, ns, "agents",
                                      "trial-followup-agent", agent)
    seen = await asyncio.to_thread(_watch_statuses, cluster, ns, "trial-followup-agent",
                                   changed["metadata"]["resourceVersion"], changed["metadata"]["generation"])
    assert await eventually(lambda: _newer(svc, ns, first.version))
    marked = [o for o in seen if any(c["type"] == "Reconciling" and c["status"] == "True"
                                     for c in o["status"].get("conditions", []))]
    assert marked, [o["status"] for o in seen]  # said while compiling, then removed
    assert kstatus.compute(marked[0])[0]["status"] == "InProgress"
    assert argocd_health(marked[0])["status"] == "Progressing"
    ready = cluster.wait_ready(ns, "Agent", "trial-followup-agent")
    assert ready["message"] == f"live since bundle version {svc.snapshot.bundles[ns].version}"
    assert [c["type"] for c in cluster.get(ns, "Agent", "trial-followup-agent")["status"]["conditions"]] == ["Ready"]

    await asyncio.sleep(1)  # anything else the operator would write lands by now
    rewritten = [key for key, obj in before.items()
                 if cluster.get(ns, *key)["metadata"]["resourceVersion"] != obj["metadata"]["resourceVersion"]]
    assert rewritten == [("Agent", "trial-followup-agent")]
    assert status_writes() - writes == 2  # by the API server's count: "Reconciling", then the result
    assert plane.requests_served("secrets", ("GET",)) == secret_reads  # the keys have not changed
    summary = cluster.core.read_namespaced_config_map("agent-studio-bundle", ns).data
    assert summary["version"] == str(svc.snapshot.bundles[ns].version) and summary["agents"] == "21"


def test_the_operator_exits_soon_after_sigterm_with_the_api_server_gone(nats_server: NatsServer, tmp_path: Path) -> None:
    """The kubelet kills a pod that has not exited within its grace period (30 s by default); an
    operator that spends it retrying an API server that is gone is killed mid-shutdown."""
    plane = controlplane.start(tmp_path / "plane")
    ns = f"t-{uuid.uuid4().hex[:8]}"
    try:
        plane.tenant_namespace(ns)
        own = Cluster(plane, nats_server, tmp_path / "operator.log", [ns])
        own.start_operator()
        own.apply(ns, manifests(EXAMPLES))
        own.wait_ready(ns, "Agent", "trial-followup-agent")
    finally:
        plane.stop()
    assert own.proc is not None
    time.sleep(1)  # the operator notices: its watches fail
    own.proc.send_signal(signal.SIGTERM)
    try:
        own.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        own.proc.kill()
        own.proc.wait()
        raise AssertionError("operator still running 10 s after SIGTERM:\n" + own.log.read_text()[-3000:]) from None
    assert own.proc.returncode == 0, own.log.read_text()[-3000:]  # a finished shutdown, not a cut-short one


async def test_an_empty_tenant_has_an_empty_bundle_and_keeps_one_when_emptied(cluster: Cluster, ingest) -> None:  # type: ignore[no-untyped-def]
    client_, svc = ingest
    empty, used = cluster.namespaces
    # Before any manifest: both namespaces are tenants with nothing in them, and ingest is ready.
    for ns in (empty, used):
        bundle = await eventually(lambda ns=ns: _bundle(svc, ns))
        assert (bundle.agents, bundle.workflows, bundle.keys) == ({}, {}, {})
    assert (await client_.get("/readyz")).status_code == 200

    cluster.apply(used, manifests(EXAMPLES))
    for doc in manifests(EXAMPLES):
        cluster.wait_ready(used, doc["kind"], doc["metadata"]["name"])
    full = await eventually(lambda: _bundle_with_agents(svc, used))
    key = cluster.api_key(used, "clevertap")
    assert await eventually(lambda: _status_is(client_, key, 201))

    for doc in manifests(EXAMPLES):
        cluster.delete(used, doc["kind"], doc["metadata"]["name"])

    async def emptied():  # type: ignore[no-untyped-def]
        b = await _bundle(svc, used)
        return b if b is not None and b.version > full.version and not b.agents else None

    now = await eventually(emptied)
    assert now.keys == {}
    assert await eventually(lambda: _status_is(client_, key, 401))

    async def summarised():  # type: ignore[no-untyped-def]
        data = cluster.core.read_namespaced_config_map("agent-studio-bundle", used).data or {}
        return data.get("version") == str(now.version)

    assert await eventually(summarised)  # the summary says the bundle in force is the empty one


async def test_the_releases_concurrency_plan_and_pace_reach_its_tenants_bundle(cluster: Cluster, ingest) -> None:  # type: ignore[no-untyped-def]
    _, svc = ingest
    used = cluster.namespaces[1]
    cluster.apply(used, manifests(EXAMPLES))
    first = await eventually(lambda: _bundle_with_agents(svc, used))
    assert first.max_concurrent_calls == 10  # calls.maxConcurrentPerTenant's default
    assert first.calls_per_second == 25  # calls.callsPerSecondPerTenant's default

    # `helm upgrade --set calls.maxConcurrentPerTenant=3 --set calls.callsPerSecondPerTenant=2`
    # changes the operator's pod alone: it restarts.
    cluster.stop_operator()
    cluster.start_operator(AGENTSTUDIO_MAX_CONCURRENT_CALLS_PER_TENANT="3", AGENTSTUDIO_CALLS_PER_SECOND_PER_TENANT="2")

    async def planned():  # type: ignore[no-untyped-def]
        b = await _bundle(svc, used)
        return b if b is not None and b.max_concurrent_calls == 3 and b.calls_per_second == 2 else None

    now = await eventually(planned, timeout=60)
    assert now.version > first.version and set(now.agents) == set(first.agents)


async def _bundle_with_agents(svc: IngestService, ns: str):  # type: ignore[no-untyped-def]
    b = await _bundle(svc, ns)
    return b if b is not None and b.agents else None


async def _bundle_with(svc: IngestService, ns: str, agent: str):  # type: ignore[no-untyped-def]
    b = await _bundle(svc, ns)
    return b if b is not None and agent in b.agents else None
