"""The real single-node cluster the install tests run on (tests/node.py): it comes up inside a network
namespace of the run's own, runs a locked-down pod under the restricted Pod Security profile, serves
Services and cluster DNS, has no way out, and leaves nothing behind when stopped."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from node import DNS_SERVICE_IP, KUBELET_SYSCTLS, KUBERNETES_SERVICE_IP, NODE_IP, NODE_NAME, Node, _sysctl


def pause_pod(image: str, name: str, namespace: str, locked_down: bool = True) -> str:
    """A pod of the pause image; locked down as the restricted profile asks, or not at all."""
    container: dict[str, object] = {"name": "pause", "image": image, "imagePullPolicy": "Never",
                                    "resources": {"limits": {"cpu": "10m", "memory": "16Mi"}}}
    spec: dict[str, object] = {"automountServiceAccountToken": False, "containers": [container]}
    if locked_down:
        spec["securityContext"] = {"runAsNonRoot": True, "runAsUser": 65535, "seccompProfile": {"type": "RuntimeDefault"}}
        container["securityContext"] = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                        "capabilities": {"drop": ["ALL"]}}
    return yaml.safe_dump({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace},
                           "spec": spec})


def pod_netns(node: Node, namespace: str, name: str) -> str:
    """The network namespace of a running pod (its processes found by the pod's UID in the node's cgroups)."""
    uid = node.get("pod", name, namespace)["metadata"]["uid"]  # type: ignore[index]
    pid = next(p for p in node.pids() if f"pod{uid}" in Path(f"/proc/{p}/cgroup").read_text())
    return f"/proc/{pid}/ns/net"


def in_pod_netns(node: Node, namespace: str, name: str, argv: list[str]) -> str:
    """argv in a pod's network namespace (the pause image has no tools of its own)."""
    return subprocess.run(["nsenter", f"--net={pod_netns(node, namespace, name)}", "--", *argv],
                          capture_output=True, text=True, check=True, timeout=30).stdout


def host_links() -> list[str]:
    return sorted(os.listdir("/sys/class/net"))


# Where the node's parts write by default (the node must keep them inside its mount namespace).
# Names, not whole folders: other work on the machine may run its own containerd meanwhile.
HOST_DEFAULTS = ("/run/containerd", "/run/mount", "/run/netns", "/run/xtables.lock", "/var/lib/kubelet",
                 "/var/lib/cni", "/var/lib/containerd", "/var/log/pods", "/var/log/containers", "/etc/cni")


def host_defaults_absent() -> list[str]:
    return [p for p in HOST_DEFAULTS if not os.path.lexists(p)]


def host_mounts_under(folder: Path) -> list[str]:
    mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    return [m for m in mounts if str(folder) in m]


def kubelets_sysctls_in_force() -> bool:
    """The values the kubelet writes (pkg/kubelet/cm: overcommit 1, panic 10 s, panic on oops)."""
    return (_sysctl("vm/overcommit_memory"), _sysctl("kernel/panic"), _sysctl("kernel/panic_on_oops")) == ("1", "10", "1")


def test_a_stopped_node_leaves_no_process_mount_cgroup_sysctl_or_file(tmp_path: Path) -> None:
    """Two nodes overlap, as two test runs on one machine may: stopping the first takes all of its
    own and leaves the second working with the kubelet's sysctls; stopping the second leaves nothing."""
    sysctls = {name: _sysctl(name) for name in KUBELET_SYSCTLS}
    links, absent = host_links(), host_defaults_absent()
    first, second = Node(tmp_path / "first"), Node(tmp_path / "second")
    try:
        first.start()
        first.kubectl("apply", "-f", "-", input=pause_pod(first.pause_image, "sleeper", "default"))
        first.wait_ready("pod", "sleeper", "default", timeout=90)
        pids = first.pids()
        in_pods = [p for p in pids if os.stat(f"/proc/{p}/ns/net").st_ino != first.netns]
        assert in_pods, "the pod's processes (own network namespace) must be among the node's"
        cgroups = [h / first.cgroup_root for h in first._hierarchies()]
        assert all(c.is_dir() for c in cgroups)
        assert kubelets_sysctls_in_force()  # so the restore below is tested
        print(f"\nnode bring-up {first.timings['start']:.1f} s, processes {len(pids)}")
        second.start()
    finally:
        first.stop()
    try:
        print(f"teardown {first.timings['stop']:.2f} s")
        assert first.pids() == []  # nothing in its namespaces, nothing in its cgroups (containers)
        assert host_mounts_under(first.directory) == []
        assert not any(c.exists() for c in cgroups)
        assert not first.directory.exists()
        assert kubelets_sysctls_in_force(), "restored under the second node's kubelet"
        second.wait_ready("node", NODE_NAME, timeout=30)
    finally:
        second.stop()
    assert second.pids() == []
    assert {name: _sysctl(name) for name in KUBELET_SYSCTLS} == sysctls
    assert host_links() == links
    assert [p for p in absent if os.path.lexists(p)] == []
    assert not second.directory.exists() and host_mounts_under(tmp_path) == []


def test_the_node_is_ready_inside_its_own_namespace(node: Node) -> None:
    status = json.loads(node.kubectl("get", "node", NODE_NAME, "-o", "json"))["status"]
    assert {c["type"]: c["status"] for c in status["conditions"]}["Ready"] == "True"
    assert status["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://")
    links = node.exec(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    assert "eth0" not in links and "agst0" in links  # the host's links are not there; ours are
    assert "NAME" in node.helm("list", "--all-namespaces")  # helm talks to it


def test_a_locked_down_pod_runs_in_a_restricted_namespace(node: Node) -> None:
    node.kubectl("create", "namespace", "locked")
    node.kubectl("label", "namespace", "locked", "pod-security.kubernetes.io/enforce=restricted")
    node.wait_ready("serviceaccount", "default", "locked", timeout=60)

    refused = node.exec([node.bins["KUBECTL"], f"--kubeconfig={node.kubeconfig}", "apply", "-f", "-"],
                        input=pause_pod(node.pause_image, "loose", "locked", locked_down=False),
                        capture_output=True, text=True)
    assert refused.returncode != 0 and "violates PodSecurity" in refused.stderr, refused.stderr

    node.kubectl("apply", "-f", "-", input=pause_pod(node.pause_image, "pause", "locked"))
    pod = node.wait_ready("pod", "pause", "locked", timeout=90)
    assert pod["status"]["phase"] == "Running"
    assert pod["status"]["podIP"].startswith("10.244.0.")
    assert node.kubectl("logs", "pause", "-n", "locked") == ""  # the API server reaches the kubelet


def test_a_pod_reaches_services_and_the_node_and_nothing_else(node: Node) -> None:
    node.kubectl("apply", "-f", "-", input=pause_pod(node.pause_image, "routes", "default"))
    node.wait_ready("pod", "routes", "default", timeout=90)
    routes = in_pod_netns(node, "default", "routes", ["ip", "-4", "route", "show", "table", "all"])
    assert "default" not in routes, routes
    assert f"{NODE_IP} via" in routes and "10.96.0.0/24 via" in routes, routes
    tried = in_pod_netns(node, "default", "routes", [sys.executable, "-c", (
        "import errno, socket, sys\n"
        "for host, port in [(sys.argv[1], 443), (sys.argv[2], 53), ('1.1.1.1', 443)]:\n"
        "    try:\n"
        "        socket.create_connection((host, port), timeout=5).close()\n"
        "        print('connected')\n"
        "    except OSError as exc:\n"
        "        print(errno.errorcode.get(exc.errno, exc))\n"), KUBERNETES_SERVICE_IP, DNS_SERVICE_IP])
    # the API server and CoreDNS (TCP) through their Service IPs; a public address is unroutable
    assert tried.split() == ["connected", "connected", "ENETUNREACH"], tried


def test_a_pod_reaches_another_pod_and_itself_through_a_service(node: Node) -> None:
    """Pod -> ClusterIP -> pod on the one bridge: what ingest -> NATS needs (bridge netfilter, forwarding)."""
    node.kubectl("create", "namespace", "svc")
    node.wait_ready("serviceaccount", "default", "svc", timeout=60)
    for name in ("server", "client"):
        node.kubectl("apply", "-f", "-", input=pause_pod(node.pause_image, name, "svc"))
    server_ip = node.wait_ready("pod", "server", "svc", timeout=90)["status"]["podIP"]
    node.wait_ready("pod", "client", "svc", timeout=90)
    listener = subprocess.Popen(["nsenter", f"--net={pod_netns(node, 'svc', 'server')}", "--", sys.executable, "-c", (
        "import socket\n"
        "s = socket.create_server(('0.0.0.0', 0))\n"
        "print(s.getsockname()[1], flush=True)\n"
        "while True:\n"
        "    c, _ = s.accept(); c.sendall(b'hello'); c.close()\n")], stdout=subprocess.PIPE, text=True)
    try:
        port = int(listener.stdout.readline())  # type: ignore[union-attr]
        node.kubectl("apply", "-f", "-", input=yaml.safe_dump_all([
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo", "namespace": "svc"},
             "spec": {"ports": [{"port": 80, "targetPort": port}]}},
            {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
             "metadata": {"name": "echo-1", "namespace": "svc", "labels": {"kubernetes.io/service-name": "echo"}},
             "addressType": "IPv4", "endpoints": [{"addresses": [server_ip]}], "ports": [{"port": port}]},
        ]))
        cluster_ip = node.get("service", "echo", "svc")["spec"]["clusterIP"]  # type: ignore[index]
        fetch = [sys.executable, "-c", (
            "import socket, sys, time\n"
            "deadline = time.monotonic() + 20\n"
            "while True:\n"
            "    try:\n"
            "        with socket.create_connection((sys.argv[1], 80), timeout=2) as c:\n"
            "            print(c.recv(5).decode()); break\n"
            "    except OSError:\n"
            "        if time.monotonic() > deadline: raise\n"
            "        time.sleep(0.2)\n"), cluster_ip]
        assert in_pod_netns(node, "svc", "client", fetch).strip() == "hello"
        assert in_pod_netns(node, "svc", "server", fetch).strip() == "hello"  # hairpin
    finally:
        listener.kill()
        listener.wait()


def test_a_static_hostpath_volume_binds_to_its_claim(node: Node, tmp_path: Path) -> None:
    """The test node has no provisioner: volumes are hostPath PVs the tests make (PV binder)."""
    node.kubectl("apply", "-f", "-", input=yaml.safe_dump_all([
        {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "static-0"},
         "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"], "storageClassName": "static",
                  "hostPath": {"path": str(tmp_path), "type": "Directory"}}},
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "data", "namespace": "default"},
         "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "static",
                  "resources": {"requests": {"storage": "1Gi"}}}},
    ]))
    node.wait_ready("pvc", "data", "default", timeout=60)
    assert node.get("pvc", "data", "default")["spec"]["volumeName"] == "static-0"  # type: ignore[index]


def test_services_and_cluster_dns_answer_inside_the_namespace(node: Node) -> None:
    """kube-proxy (Service IPs) and CoreDNS (names): the kubernetes Service, by name, over HTTPS."""
    done = node.python(
        "import socket, ssl, sys, httpx\n"
        "address = socket.gethostbyname('kubernetes.default.svc.cluster.local')\n"
        "ca = ssl.create_default_context(cafile=sys.argv[1])\n"
        "reply = httpx.get(f'https://{address}/', verify=ca, timeout=5)\n"
        "print(address, reply.status_code)\n",
        str(node.directory / "certs" / "ca.crt"), timeout=30)
    assert done.returncode == 0, done.stderr
    address, code = done.stdout.split()
    assert address == KUBERNETES_SERVICE_IP
    assert code in ("401", "403")  # the API server itself answered an anonymous request
    resolv = node.exec(["cat", "/etc/resolv.conf"], capture_output=True, text=True, check=True).stdout
    assert f"nameserver {DNS_SERVICE_IP}" in resolv


def test_nothing_leaves_the_namespace(node: Node) -> None:
    """No default route: a connection to a public address fails at once, before sending anything."""
    done = node.python(
        "import socket\n"
        "try:\n"
        "    socket.create_connection(('1.1.1.1', 443), timeout=5)\n"
        "except OSError as exc:\n"
        "    print(exc.errno)\n", timeout=30)
    assert done.returncode == 0, done.stderr
    # No route: refused by the kernel before any packet is sent (a timeout would mean one was).
    assert int(done.stdout) == errno.ENETUNREACH, done.stdout
    routes = node.exec(["ip", "route", "show", "table", "all"], capture_output=True, text=True, check=True).stdout
    assert "default" not in routes, routes


def test_node_memory_with_nothing_deployed(node: Node) -> None:
    """Reports the node's resident memory (every process of it, containers included)."""
    total = 0
    for pid in node.pids():
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        total += next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    print(f"\nnode RSS {total / 1024:.0f} MiB")
    assert 0 < total < 1024 * 1024, f"{total / 1024:.0f} MiB"  # ../shared/k8s-node.md measured ~690 MB
