"""KEDA on the real node (tests/node.py): its operator and metrics adapter from the image
scripts/build-keda packs, installed from the manifests that KEDA version ships (its module's config/:
CRDs, RBAC, the Deployments and the external.metrics.k8s.io APIService), changed only where this node
needs it: our image, never pulled, small requests, and no admission webhooks (KEDA's third binary,
not built; the operator then has nothing to patch for them)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from node import Node

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = "keda"
# What the operator needs of config/ (kustomize's resource lists there say the same; webhooks/ left out).
MANIFESTS = ("general/namespace.yaml", "service_account/service_account.yaml", "rbac/role.yaml",
             "rbac/role_binding.yaml", "manager/manager.yaml", "manager/service.yaml",
             "metrics-server/role.yaml", "metrics-server/role_binding.yaml", "metrics-server/deployment.yaml",
             "metrics-server/service.yaml", "metrics-server/api_service.yaml")
CLUSTER_KINDS = {"Namespace", "ClusterRole", "ClusterRoleBinding", "APIService", "CustomResourceDefinition"}
APISERVICE = "v1beta1.external.metrics.k8s.io"


def keda_build() -> dict[str, str]:
    """Paths printed by scripts/build-keda (cached; built on the first run, before anything enters the
    node's namespace: the build needs the Go module proxy). A failed build fails with its stderr."""
    built = subprocess.run(["bash", str(ROOT / "scripts" / "build-keda")], capture_output=True, text=True)
    if built.returncode != 0:
        raise RuntimeError(f"scripts/build-keda failed:\n{built.stderr[-3000:]}")
    paths = dict(line.split("=", 1) for line in built.stdout.splitlines() if "=" in line)
    for key in ("KEDA_OPERATOR", "KEDA_ADAPTER", "KEDA_CONFIG", "KEDA_IMAGE_ARCHIVE"):
        if not Path(paths[key]).exists():
            raise RuntimeError(f"{paths[key]} is missing: scripts/build-keda builds it")
    return paths


def manifests(config: Path, image: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(KEDA's CRDs, everything else) from its config/ folder, fitted to the node."""
    crds = [d for p in sorted((config / "crd" / "bases").glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]
    objects = [d for name in MANIFESTS for d in yaml.safe_load_all((config / name).read_text()) if d]
    for obj in objects:
        if obj["kind"] not in CLUSTER_KINDS:
            obj["metadata"].setdefault("namespace", NAMESPACE)
        if obj["kind"] != "Deployment":
            continue
        [container] = obj["spec"]["template"]["spec"]["containers"]
        container["image"], container["imagePullPolicy"] = image, "Never"
        # Two cores shared by the node, a tenant and its scaled-out dialers: requests to match.
        container["resources"]["requests"] = {"cpu": "20m", "memory": "64Mi"}
        if obj["metadata"]["name"] == "keda-operator":
            container["args"].append("--enable-webhook-patching=false")
    return crds, objects


def install(node: Node, timeout: float = 180) -> dict[str, float]:
    """KEDA installed and serving external metrics through the API server's aggregation layer: the
    operator up, its certificates made (it writes the Secret both mount and the APIService's caBundle),
    the adapter up and the APIService Available. Returns how long each step took."""
    paths = keda_build()
    seconds: dict[str, float] = {}
    began = time.monotonic()
    node.import_image(paths["KEDA_IMAGE_ARCHIVE"], paths["KEDA_IMAGE"].rpartition(":")[0])
    crds, objects = manifests(Path(paths["KEDA_CONFIG"]), paths["KEDA_IMAGE"])
    # Server-side: the ScaledJob CRD is larger than client-side apply's last-applied annotation allows.
    node.kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump_all(crds))
    for crd in crds:
        _wait(lambda: _condition(node.get("crd", crd["metadata"]["name"]), "Established"),
              f"CRD {crd['metadata']['name']} established", 60)
    node.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(objects))
    seconds["apply"] = time.monotonic() - began
    node.wait_ready("deployment", "keda-operator", NAMESPACE, timeout=timeout)
    node.wait_ready("deployment", "keda-metrics-apiserver", NAMESPACE, timeout=timeout)
    seconds["deployments ready"] = time.monotonic() - began
    try:
        _wait(lambda: _condition(node.get("apiservice", APISERVICE), "Available"), f"APIService {APISERVICE}", timeout)
    except TimeoutError as exc:
        logs = "".join(node.kubectl("logs", f"deployment/{d}", "-n", NAMESPACE, "--tail=40")
                       for d in ("keda-operator", "keda-metrics-apiserver"))
        raise TimeoutError(f"{exc}: {(node.get('apiservice', APISERVICE) or {}).get('status')}\n{logs}") from None
    seconds["external metrics served"] = time.monotonic() - began
    return seconds


def uninstall(node: Node) -> None:
    """KEDA gone again, its APIService first: an aggregated API nobody serves fails discovery, and
    with it every later `helm install` on the node. The namespace takes the rest of what it holds."""
    paths = keda_build()
    crds, objects = manifests(Path(paths["KEDA_CONFIG"]), paths["KEDA_IMAGE"])
    node.kubectl("delete", "apiservice", APISERVICE, "--ignore-not-found")
    cluster_wide = [o for o in objects if o["kind"] in CLUSTER_KINDS - {"APIService"}]
    node.kubectl("delete", "--ignore-not-found", "--wait=false", "-f", "-", input=yaml.safe_dump_all(cluster_wide + crds))
    node.kubectl("delete", "rolebinding", "keda-auth-reader", "-n", "kube-system", "--ignore-not-found")


def _wait(check: Callable[[], bool], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready within {timeout} s")
        time.sleep(0.5)


def _condition(obj: dict[str, Any] | None, kind: str) -> bool:
    return any(c.get("type") == kind and c.get("status") == "True"
               for c in ((obj or {}).get("status") or {}).get("conditions", []))
