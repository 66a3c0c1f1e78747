"""Agent Studio installed on the real node (tests/node.py) the way a platform team installs it, shared
by the node tests that install it (tests/test_install.py, tests/test_autoscale.py): our images
imported, the CRD chart once, a release per tenant, and what those tests read back (calls, pods, the
dialers' logs)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from conftest import EXAMPLES
from images import Images, built_images
from node import Node

ROOT = Path(__file__).resolve().parent.parent
CHARTS = ROOT / "charts"
CLIENT = Path(__file__).resolve().parent / "cluster_client.py"
TERMINAL = {"completed", "failed", "no_answer", "busy", "canceled"}


def locked_down(container: dict[str, Any]) -> dict[str, Any]:
    return {
        "automountServiceAccountToken": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{**container, "securityContext": {
            "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}},
            "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}}}],
    }


@dataclass
class Installed:
    node: Node
    images: Images
    volumes: Path
    test_values: list[str] = field(default_factory=list)  # every release of this installation gets them
    tenants: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def values(self) -> list[str]:
        image, nats = self.images.image.rpartition(":"), self.images.nats_image.rpartition(":")
        return ["--set", f"image.repository={image[0]}", "--set", f"image.tag={image[2]}",
                "--set", "image.pullPolicy=Never", "--set", f"nats.image.repository={nats[0]}",
                "--set", f"nats.image.tag={nats[2]}", "--set", "nats.image.pullPolicy=Never", *self.test_values]

    def install(self, ns: str, *values: str) -> None:
        """A tenant: its namespace (restricted), a static volume for its NATS (the node has no
        provisioner), and `helm install --wait` (with `values` after the installation's)."""
        self.node.kubectl("apply", "-f", "-", input=yaml.safe_dump({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": ns, "labels": {"pod-security.kubernetes.io/enforce": "restricted"}}}))
        folder = self.volumes / ns
        folder.mkdir(parents=True)
        os.chown(folder, 10002, 10002)  # the NATS image's user: the kubelet applies no fsGroup to hostPath
        self.node.kubectl("apply", "-f", "-", input=yaml.safe_dump({
            "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": f"nats-{ns}"},
            "spec": {"capacity": {"storage": "10Gi"}, "accessModes": ["ReadWriteOnce"],
                     "storageClassName": "node-local", "persistentVolumeReclaimPolicy": "Retain",
                     "hostPath": {"path": str(folder), "type": "Directory"},
                     # Bound ahead to this tenant's claim: each tenant keeps its own volume.
                     "claimRef": {"namespace": ns, "name": f"data-{ns}-agent-studio-nats-0"}}}))
        began = time.monotonic()
        self.node.helm("install", ns, str(CHARTS / "agent-studio"), "-n", ns, *self.values(), *values,
                       "--wait", "--timeout", "5m")
        self.seconds[f"install {ns}"] = time.monotonic() - began
        self.tenants.append(ns)

    def ingest(self, ns: str) -> str:
        return f"http://{ns}-agent-studio-ingest.{ns}.svc.cluster.local"

    def secret(self, ns: str, name: str, key: str) -> str:
        data = json.loads(self.node.kubectl("get", "secret", name, "-n", ns, "-o", "json"))["data"]
        return base64.b64decode(data[key]).decode()

    def client(self, *args: str) -> dict[str, Any]:
        done = self.node.python(CLIENT, *args, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout)

    def stream(self, ns: str, key: str, body: dict[str, Any], *args: str) -> subprocess.Popen[str]:
        """The client posting calls in the background (`post` arguments after the body)."""
        return self.node.popen([sys.executable, str(CLIENT), "post", self.ingest(ns), key, json.dumps(body),
                                "--prefix", uuid.uuid4().hex, *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)

    @staticmethod
    def finished(stream: subprocess.Popen[str]) -> dict[str, Any]:
        out, err = stream.communicate(timeout=300)
        assert stream.returncode == 0, err[-3000:]
        result: dict[str, Any] = json.loads(out)
        assert not result["refused"], result
        return result

    def pods(self, ns: str, component: str) -> list[dict[str, Any]]:
        return json.loads(self.node.kubectl("get", "pods", "-n", ns, "-l", f"app.kubernetes.io/component={component}",
                                            "-o", "json"))["items"]

    def wait_calls(self, ns: str, key: str, ids: list[str], timeout: float = 180) -> dict[str, Any]:
        """The calls' records once every one is in a final state."""
        deadline = time.monotonic() + timeout
        while True:
            records = self.client("calls", self.ingest(ns), key, *ids)
            pending = {i: r.get("status") for i, r in records.items() if r.get("status") not in TERMINAL}
            if not pending:
                return records
            assert time.monotonic() < deadline, f"calls not final after {timeout} s: {pending}"
            time.sleep(1)

    def run_pod(self, ns: str, name: str, code: str, *args: str, env: list[dict[str, Any]] = []) -> str:
        """A pod of our image running `python3 -c code args` to its end: what it printed."""
        spec = locked_down({"name": "main", "image": self.images.image, "imagePullPolicy": "Never",
                            "command": ["python3", "-c", code, *args], "env": env})
        self.node.kubectl("apply", "-f", "-", input=yaml.safe_dump({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns},
            "spec": {**spec, "restartPolicy": "Never"}}))
        deadline = time.monotonic() + 120
        while (phase := (self.node.get("pod", name, ns) or {}).get("status", {}).get("phase")) not in ("Succeeded", "Failed"):
            assert time.monotonic() < deadline, f"pod {name} still {phase}"
            time.sleep(0.5)
        return self.node.kubectl("logs", name, "-n", ns)

def prepare(node: Node, volumes: Path, test_values: list[str]) -> Installed:
    """Our images in the node's containerd, the CRD chart (once per node: every installation shares
    it) and a default StorageClass whose volumes install() makes by hand (the node has no provisioner)."""
    images = built_images()
    began = time.monotonic()
    node.import_image(images.archive, images.repository(images.image))
    node.import_image(images.nats_archive, images.repository(images.nats_image))
    installed = Installed(node, images, volumes, test_values)
    installed.seconds["import images"] = time.monotonic() - began
    node.helm("upgrade", "--install", "agent-studio-crds", str(CHARTS / "agent-studio-crds"), "--wait")
    node.kubectl("apply", "-f", "-", input=yaml.safe_dump({
        "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
        "metadata": {"name": "node-local", "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
        "provisioner": "kubernetes.io/no-provisioner", "volumeBindingMode": "WaitForFirstConsumer"}))
    return installed


def apply_examples(installed: Installed, ns: str) -> tuple[str, str]:
    """examples/'s agents, workflows and keys in the tenant: the clevertap key (calls:create) and the
    analytics-readonly one (calls:read), read from the Secrets the operator generated."""
    for name in ("agents.yaml", "workflows.yaml", "apikeys.yaml"):
        installed.node.kubectl("apply", "-n", ns, "-f", str(EXAMPLES / name))
    for kind, name in (("apikey", "clevertap"), ("apikey", "analytics-readonly"), ("workflow", "free-trial-followup")):
        installed.node.wait_ready(kind, name, ns)
    return (installed.secret(ns, "clevertap-api-key", "key"), installed.secret(ns, "analytics-readonly-api-key", "key"))


def timestamp(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def placed(log: str) -> list[str]:
    """The call ids a dialer's log says it placed, once per placement."""
    said = (json.loads(line) for line in log.splitlines() if line.startswith("{"))
    return [line["call_id"] for line in said if line.get("msg") == "call placed"]
