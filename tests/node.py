"""A real single-node Kubernetes cluster for tests, the way ../shared/k8s-node.md describes it: etcd,
kube-apiserver, containerd (with runc and the CNI bridge), kube-controller-manager, kube-scheduler,
kubelet, kube-proxy and CoreDNS, every one a process of the test run, all inside one network and one
private mount namespace that the run creates, so the node's addresses exist only there and nothing
can leave; torn down completely (processes, containers, mounts, cgroups, sysctls, files) by stop()."""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import yaml

from controlplane import ROOT, binaries, write_certs, write_kubeconfig
from processes import Process

T = TypeVar("T")

NODE_NAME = "agent-studio-node"
NODE_BRIDGE = "agst0"  # carries the node address and nothing else (the kernel here has no `dummy`)
NODE_IP = "10.250.0.1"
POD_BRIDGE = "cni0"
POD_CIDR = "10.244.0.0/24"
POD_GATEWAY = "10.244.0.1"
SERVICE_CIDR = "10.96.0.0/24"
KUBERNETES_SERVICE_IP = "10.96.0.1"
DNS_SERVICE_IP = "10.96.0.10"
DEBIAN_TOOLS = ("containerd", "containerd-shim-runc-v2", "runc", "ctr", "iptables", "conntrack", "ip",
                "unshare", "nsenter", "mount")
CNI_PLUGINS = Path("/usr/lib/cni")
# Host-wide sysctls the kubelet sets at start (../shared/k8s-node.md): saved before, restored after.
KUBELET_SYSCTLS = ("vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
                   "kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes")
CGROUPS = Path("/sys/fs/cgroup")
# The sysctls are one set per machine while nodes may overlap (two test runs at once): the first node
# to start saves them, the last to stop restores them. A run killed before stop() leaves the record,
# and the next node restores what it says. The lock file stays (empty), as lock files do.
HOST_RECORD = Path("/run/lock/agentstudio-node.json")
HOST_LOCK = Path("/run/lock/agentstudio-node.lock")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL("libc.so.6", use_errno=True)

# The namespace holder: `unshare` makes the network and mount namespaces, this sets them up and then
# execs the pause program, which keeps them alive until stop(). Mounts are private to the namespace
# and vanish with it: /sys is remounted so it shows this netns (kubelet/cadvisor, CNI read
# /sys/class/net) with the host's cgroup hierarchies moved back under it; tmpfs over /run (containerd's
# shim sockets, runc state, the xtables lock), /var/log (the kubelet's pod log links) and /var/lib
# (the kubelet makes /var/lib/kubelet/device-plugins whatever --root-dir says; nothing of the node
# reads the host's /var/lib); the run's resolv.conf over /etc/resolv.conf, so anything run inside
# resolves Service names through the cluster DNS, as a pod does.
HOLDER = r"""
set -eu
run=$1 pause=$2
# -n everywhere: libmount would otherwise write /run/mount/utab on the host before /run is ours.
mkdir -p "$run/cgroup-keep"
mount -n --rbind /sys/fs/cgroup "$run/cgroup-keep"
mount -n -t sysfs sysfs /sys
mount -n --move "$run/cgroup-keep" /sys/fs/cgroup
mount -n -t tmpfs -o mode=0755 tmpfs /run
mount -n -t tmpfs -o mode=0755 tmpfs /var/log
mount -n -t tmpfs -o mode=0755 tmpfs /var/lib
mount -n --bind "$run/resolv.conf" /etc/resolv.conf
ip link set lo up
ip link add {bridge} type bridge
ip addr add {node_ip}/32 dev {bridge}
ip link set {bridge} up
# Local clients (kubectl, tests) reach Service IPs through kube-proxy's DNAT, which comes after
# the route lookup: give that lookup a route. There is no default route, so nothing leaves.
ip route add {service_cidr} dev {bridge} src {node_ip}
echo 1 > /proc/sys/net/ipv4/ip_forward
echo 1 > /proc/sys/net/bridge/bridge-nf-call-iptables
# Forward only between pods (pod -> Service -> pod is routed in and out of the pod bridge).
iptables -P FORWARD DROP
iptables -A FORWARD -i {pod_bridge} -o {pod_bridge} -j ACCEPT
touch "$run/holder.ready"
exec "$pause"
""".format(bridge=NODE_BRIDGE, node_ip=NODE_IP, service_cidr=SERVICE_CIDR, pod_bridge=POD_BRIDGE)


def node_binaries() -> dict[str, str]:
    """Paths printed by scripts/build-node and scripts/build-control-plane (cached; built on the
    first run, before anything enters the namespace, since the build needs the Go module proxy)."""
    missing = [t for t in DEBIAN_TOOLS if shutil.which(t) is None]
    missing += [str(CNI_PLUGINS / p) for p in ("bridge", "host-local", "loopback") if not (CNI_PLUGINS / p).exists()]
    if missing:
        raise RuntimeError(
            f"the node needs {', '.join(missing)}: scripts/setup-node-packages installs them (Debian "
            "packages containerd, runc, containernetworking-plugins, iptables, conntrack; as root)")
    built = subprocess.run(["bash", str(ROOT / "scripts" / "build-node")], capture_output=True, text=True)
    if built.returncode != 0:
        raise RuntimeError(f"scripts/build-node failed:\n{built.stderr[-3000:]}")
    paths = dict(line.split("=", 1) for line in built.stdout.splitlines() if "=" in line)
    paths.update(binaries())
    kube = Path(paths["KUBE_BIN_DIR"])
    for tool in ("kubelet", "kube-proxy", "kube-scheduler", "kube-controller-manager", "kubectl"):
        paths[tool.upper().replace("-", "_")] = str(kube / tool)
    for key, path in paths.items():
        if key != "PAUSE_IMAGE" and not Path(path).exists():
            raise RuntimeError(f"{path} is missing: scripts/build-node (or scripts/build-control-plane) builds it")
    return paths


def in_netns(pid: int, fn: Callable[[], T]) -> T:
    """fn() on a fresh thread that has joined the network namespace of `pid`: the test process
    itself talks to the node's addresses without changing its own namespace."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns into the node's network namespace")
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=run, name="in node netns")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def _free_ports(count: int) -> list[int]:
    """Ports the kernel hands out, all held open at once so no two are the same."""
    held = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((NODE_IP, 0))
            held.append(s)
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


def _ns_inode(pid: int | str, kind: str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/{kind}").st_ino
    except OSError:  # gone, or a kernel thread
        return None


def _sysctl(name: str) -> str:
    return Path("/proc/sys", name).read_text().strip()


@contextmanager
def _host_record() -> Iterator[dict[str, Any]]:
    """The machine's record of running nodes and the sysctls they found, under an exclusive lock;
    nodes whose namespace holder is gone are dropped from it."""
    with open(HOST_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        record = json.loads(HOST_RECORD.read_text()) if HOST_RECORD.exists() else {"sysctls": {}, "nodes": []}
        record["nodes"] = [[pid, netns] for pid, netns in record["nodes"] if _ns_inode(pid, "net") == netns]
        yield record
        if record["nodes"]:
            HOST_RECORD.write_text(json.dumps(record))
        else:
            HOST_RECORD.unlink(missing_ok=True)


class Node:
    """One single-node cluster in its own namespaces. `with Node(dir) as node:` or start()/stop()."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = Path(directory or tempfile.mkdtemp(prefix="node-"))
        self.bins: dict[str, str] = {}
        self.holder: Process | None = None
        self.netns: int | None = None  # inodes of the namespaces: found even after the holder is gone
        self.mntns: int | None = None
        self.procs: list[Process] = []
        self.tokens: dict[str, str] = {}
        self.ports: dict[str, int] = {}
        self.cgroup_root = f"agentstudio-node-{secrets.token_hex(4)}"
        self.saved_sysctls: dict[str, str] = {}
        self.timings: dict[str, float] = {}

    # --- paths -------------------------------------------------------------------------------------

    @property
    def kubeconfig(self) -> Path:
        return self.directory / "admin.kubeconfig"

    @property
    def pause_image(self) -> str:
        """The sandbox image, imported at start: the one image every node has."""
        return self.bins["PAUSE_IMAGE"]

    @property
    def api_url(self) -> str:
        return f"https://{NODE_IP}:{self.ports['apiserver']}"

    @property
    def logs(self) -> Path:
        """Beside the run folder, not in it: stop() removes the run folder, and a failure report
        quotes these logs after that."""
        return self.directory.with_name(self.directory.name + ".logs")

    @property
    def containerd_socket(self) -> Path:
        return self.directory / "containerd" / "containerd.sock"

    # --- running things inside ----------------------------------------------------------------------

    def _enter(self) -> list[str]:
        """The nsenter prefix, after checking the holder still holds the namespace we made (a dead
        holder's pid could be reused by a process outside it)."""
        if self.holder is None or self.holder.proc.poll() is not None or _ns_inode(self.holder.proc.pid, "net") != self.netns:
            raise RuntimeError("the node's namespace holder is gone" + (f":\n{self.holder.output()}" if self.holder else ""))
        return ["nsenter", f"--target={self.holder.proc.pid}", "--net", "--mount", "--"]

    def exec(self, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        """subprocess.run inside the node's namespaces."""
        return subprocess.run([*self._enter(), *map(str, argv)], **kw)

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """subprocess.Popen inside the node's namespaces."""
        return subprocess.Popen([*self._enter(), *map(str, argv)], **kw)

    def _checked(self, argv: Sequence[str], input: str | None = None, env: dict[str, str] | None = None,
                 timeout: float = 120) -> str:
        done = self.exec(argv, input=input, capture_output=True, text=True, env=env, timeout=timeout)
        if done.returncode != 0:
            self.check_running()  # a component that died is the story, with its own output
            raise RuntimeError(f"{' '.join(map(str, argv[:4]))} ... exited with {done.returncode}:\n"
                               f"{done.stderr[-4000:]}{done.stdout[-2000:]}")
        return done.stdout

    def kubectl(self, *args: str, input: str | None = None, timeout: float = 120) -> str:
        return self._checked([self.bins["KUBECTL"], f"--kubeconfig={self.kubeconfig}", *args], input=input,
                             timeout=timeout)

    def helm(self, *args: str, timeout: float = 600) -> str:
        helm_home = self.directory / "helm"
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "HELM_CACHE_HOME": str(helm_home / "cache"),
               "HELM_CONFIG_HOME": str(helm_home / "config"), "HELM_DATA_HOME": str(helm_home / "data")}
        return self._checked([self.bins["HELM"], *args], env=env, timeout=timeout)

    def python(self, code_or_script: str | Path, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        """The project's venv python inside the namespace (a script path, or code for -c)."""
        script = Path(code_or_script)
        argv = [sys.executable, str(script)] if script.suffix == ".py" and script.exists() else \
            [sys.executable, "-c", str(code_or_script)]
        kw.setdefault("capture_output", True)
        return self.exec([*argv, *args], text=True, **kw)

    def import_image(self, archive: str | Path, repository: str) -> None:
        """An OCI archive into containerd's CRI image store, named `repository:<its ref name>`."""
        self._checked(["ctr", f"--address={self.containerd_socket}", "-n", "k8s.io", "images", "import",
                       f"--base-name={repository}", str(archive)])

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        ns = ["-n", namespace] if namespace else []
        out = self.kubectl("get", kind, name, *ns, "-o", "json", "--ignore-not-found")
        return json.loads(out) if out.strip() else None

    def wait_ready(self, kind: str, name: str, namespace: str | None = None, timeout: float = 120) -> dict[str, Any]:
        """Like `kubectl wait --for=condition=…`, but waits for the object to exist too: Deployments
        Available, Jobs Complete, StatefulSets all replicas ready, claims Bound, others with conditions Ready, and
        objects without conditions (ServiceAccounts, ...) as soon as they exist."""
        deadline = time.monotonic() + timeout
        last: dict[str, Any] | None = None
        while True:
            self.check_running()
            last = self.get(kind, name, namespace)
            if last is not None and _ready(last):
                return last
            if time.monotonic() > deadline:
                events = ""
                if namespace:
                    events = self.kubectl("get", "events", "-n", namespace, "--field-selector",
                                          f"involvedObject.name={name}", "-o", "custom-columns=REASON:.reason,MESSAGE:.message")
                raise TimeoutError(f"{kind}/{name} not ready in {timeout} s; status: "
                                   f"{json.dumps((last or {}).get('status'), indent=1)}\n{events}")
            time.sleep(0.5)

    def check_running(self) -> None:
        """Fail, with its own output, if a component of the node has exited."""
        for proc in [p for p in (self.holder, *self.procs) if p is not None]:
            proc.alive()

    # --- bring-up ----------------------------------------------------------------------------------

    def start(self) -> Node:
        began = time.monotonic()
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        self.timings["start"] = time.monotonic() - began
        return self

    def _start(self) -> None:
        self.bins = node_binaries()
        self.directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.logs, ignore_errors=True)  # a reused folder: only this run's logs
        self.logs.mkdir(parents=True)
        for sub in ("certs", "cni/net.d", "cni/ipam", "containerd", "kubelet", "pod-logs"):
            (self.directory / sub).mkdir(parents=True, exist_ok=True)
        self._host_state()
        self._start_holder()
        self.ports = dict(zip(
            ("etcd", "etcd_peer", "apiserver", "kubelet", "proxy_metrics", "proxy_healthz", "dns", "dead"),
            in_netns(self.holder.proc.pid, lambda: _free_ports(8)),  # type: ignore[union-attr]
        ))
        self._write_configs()
        self._spawn("etcd", [self.bins["ETCD"], "--data-dir", self.directory / "etcd",
                             "--listen-client-urls", f"http://127.0.0.1:{self.ports['etcd']}",
                             "--advertise-client-urls", f"http://127.0.0.1:{self.ports['etcd']}",
                             "--listen-peer-urls", f"http://127.0.0.1:{self.ports['etcd_peer']}",
                             "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.ports['etcd_peer']}",
                             "--initial-cluster", f"default=http://127.0.0.1:{self.ports['etcd_peer']}",
                             "--unsafe-no-fsync", "--log-level", "warn"])
        # containerd starts meanwhile: nothing of it depends on the API server.
        self._spawn("containerd", ["containerd", "--config", self.directory / "containerd" / "config.toml"],
                    env={**os.environ, "HTTP_PROXY": f"http://127.0.0.1:{self.ports['dead']}",
                         "HTTPS_PROXY": f"http://127.0.0.1:{self.ports['dead']}", "NO_PROXY": ""})
        self._wait_http(f"http://127.0.0.1:{self.ports['etcd']}/health", "etcd", 60)
        self._spawn("kube-apiserver", self._apiserver_args())
        self._wait_until(lambda: self.containerd_socket.exists(), "containerd's socket", 60)
        self.import_image(self.bins["PAUSE_IMAGE_ARCHIVE"], self.bins["PAUSE_IMAGE"].rsplit(":", 1)[0])
        self._wait_http(f"{self.api_url}/readyz", "kube-apiserver", 90, token=self.tokens["admin"])
        self.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(self._bootstrap_objects()))
        d = self.directory
        self._spawn("kube-controller-manager", [
            self.bins["KUBE_CONTROLLER_MANAGER"], f"--kubeconfig={d / 'controller-manager.kubeconfig'}",
            "--leader-elect=false", "--secure-port=0", "--use-service-account-credentials=true",
            f"--service-account-private-key-file={d / 'certs' / 'sa.key'}", f"--root-ca-file={d / 'certs' / 'ca.crt'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            # Only what the tests' workloads need: tokens and CA for pods, namespaces deleted, the
            # workload kinds, Service endpoints, static hostPath PVs bound, owned objects collected,
            # RBAC's aggregated roles, and the node's readiness.
            "--controllers=" + ",".join(f"{c}-controller" for c in (
                "serviceaccount-token", "serviceaccount", "root-ca-certificate-publisher", "namespace",
                "garbage-collector", "deployment", "replicaset", "statefulset", "job", "disruption",
                "horizontal-pod-autoscaler", "endpoints", "endpointslice", "endpointslice-mirroring",
                "persistentvolume-binder", "clusterrole-aggregation", "pod-garbage-collector",
                # lifts the not-ready taint the kubelet registers the node with
                "node-lifecycle")),
        ])
        self._spawn("kube-scheduler", [self.bins["KUBE_SCHEDULER"], f"--kubeconfig={d / 'scheduler.kubeconfig'}",
                                       "--leader-elect=false", "--secure-port=0"])
        self._spawn("kubelet", [self.bins["KUBELET"], f"--config={d / 'kubelet.yaml'}",
                                f"--kubeconfig={d / 'kubelet.kubeconfig'}", f"--root-dir={d / 'kubelet'}",
                                f"--node-ip={NODE_IP}", f"--hostname-override={NODE_NAME}"])
        self._spawn("kube-proxy", [self.bins["KUBE_PROXY"], f"--config={d / 'kube-proxy.yaml'}"])
        self._spawn("coredns", [self.bins["COREDNS"], "-conf", d / "Corefile"])
        self.wait_ready("node", NODE_NAME, timeout=120)
        self._wait_until(lambda: not (self.get("node", NODE_NAME) or {}).get("spec", {}).get("taints"),
                         "the node without taints (node-lifecycle-controller)", 60)
        self.wait_ready("serviceaccount", "default", "default", timeout=60)
        # kube-proxy's rules and CoreDNS answer: a Service name resolves inside the namespace.
        self._wait_until(
            lambda: self.python("import socket; socket.gethostbyname('kubernetes.default.svc.cluster.local')",
                                timeout=10).returncode == 0,
            "cluster DNS through the Service IP", 60)

    def _host_state(self) -> None:
        """Make the cgroup root the kubelet runs under."""
        # Our own cgroup root (kubelet cgroupRoot) in every hierarchy: kubepods and every container
        # land under it, so a second node (another test run) never shares cgroups with this one,
        # and stop() removes exactly this subtree.
        for hierarchy in self._hierarchies():
            path = hierarchy / self.cgroup_root
            path.mkdir()
            for name in ("cpuset.cpus", "cpuset.mems"):  # a new cpuset is empty: inherit the parent's
                if (hierarchy / name).exists():
                    (path / name).write_text((hierarchy / name).read_text())

    @staticmethod
    def _hierarchies() -> list[Path]:
        return [p for p in CGROUPS.iterdir() if p.is_dir() and (p / "cgroup.procs").exists()]

    def _start_holder(self) -> None:
        (self.directory / "resolv.conf").write_text(
            f"nameserver {DNS_SERVICE_IP}\nsearch default.svc.cluster.local svc.cluster.local cluster.local\n"
            "options ndots:5\n")
        self.holder = Process(["unshare", "--net", "--mount", "--propagation", "private", "--",
                               "bash", "-c", HOLDER, "holder", self.directory, self.bins["PAUSE"]],
                              self.logs / "holder.log", name="node namespace holder")
        Process.started.remove(self.holder)  # reported by the node itself, as its components are
        self._wait_until(lambda: (self.directory / "holder.ready").exists(), "the namespace holder", 20,
                         procs=[self.holder])
        self.netns = _ns_inode(self.holder.proc.pid, "net")
        self.mntns = _ns_inode(self.holder.proc.pid, "mnt")
        assert self.netns != _ns_inode("self", "net") and self.mntns != _ns_inode("self", "mnt")
        links = self._checked(["ip", "-o", "link", "show"])
        names = sorted(line.split(":")[1].strip().split("@")[0] for line in links.splitlines())
        if names != sorted(["lo", NODE_BRIDGE]):
            raise RuntimeError(f"the node's namespace shows links it did not make: {names}")
        with _host_record() as record:  # before the kubelet changes them
            record["sysctls"] = record["sysctls"] or {name: _sysctl(name) for name in KUBELET_SYSCTLS}
            record["nodes"].append([self.holder.proc.pid, self.netns])
            self.saved_sysctls = record["sysctls"]

    def _spawn(self, name: str, argv: Sequence[Any], env: dict[str, str] | None = None) -> None:
        proc = Process([*self._enter(), *map(str, argv)], self.logs / f"{name}.log", env=env, name=f"node {name}")
        # Not in every failing test's report for the rest of the session: the node reports a
        # component that died whenever a test waits on it or a kubectl/helm call fails.
        Process.started.remove(proc)
        self.procs.append(proc)

    def _wait_until(self, check: Callable[[], bool], what: str, timeout: float,
                    procs: Sequence[Process] | None = None) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for proc in procs if procs is not None else [self.holder, *self.procs]:
                if proc is not None:
                    proc.alive()
            try:
                if check():
                    return
            except (OSError, RuntimeError, subprocess.SubprocessError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} not ready within {timeout} s (logs in {self.logs})")
            time.sleep(0.2)

    def _wait_http(self, url: str, what: str, timeout: float, token: str | None = None) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        ca = ssl.create_default_context(cafile=str(self.directory / "certs" / "ca.crt"))

        def ok() -> bool:
            return in_netns(self.holder.proc.pid, lambda: httpx.get(  # type: ignore[union-attr]
                url, headers=headers, verify=ca, timeout=2).status_code == 200)

        self._wait_until(lambda: self._tolerant(ok), what, timeout)

    @staticmethod
    def _tolerant(check: Callable[[], bool]) -> bool:
        try:
            return check()
        except httpx.TransportError:
            return False

    # --- configuration -------------------------------------------------------------------------------

    def _write_configs(self) -> None:
        d, certs = self.directory, self.directory / "certs"
        write_certs(certs, addresses=(NODE_IP, KUBERNETES_SERVICE_IP, "127.0.0.1"),
               names=("kubernetes", "kubernetes.default", "kubernetes.default.svc",
                      "kubernetes.default.svc.cluster.local", "localhost"),
               clients=(("apiserver-kubelet-client", "kube-apiserver-kubelet-client", "system:masters"),))
        # The aggregation layer's own CA and the client certificate the API server proxies with to
        # aggregated API servers (KEDA's external.metrics.k8s.io), which trust the identity headers of
        # that CA's front-proxy-client only.
        (certs / "front-proxy").mkdir(exist_ok=True)
        write_certs(certs / "front-proxy", clients=(("front-proxy-client", "front-proxy-client", "front-proxy"),))
        identities = {  # file stem: (user, uid, groups)
            "admin": ("admin", "system:masters"),
            "controller-manager": ("system:kube-controller-manager", ""),
            "scheduler": ("system:kube-scheduler", ""),
            "kubelet": (f"system:node:{NODE_NAME}", "system:nodes"),
            "kube-proxy": ("system:kube-proxy", ""),
            "coredns": ("agent-studio:coredns", ""),
        }
        self.tokens = {stem: secrets.token_hex(16) for stem in identities}
        (d / "tokens.csv").write_text("".join(
            f'{self.tokens[stem]},{user},{stem}' + (f',"{groups}"' if groups else "") + "\n"
            for stem, (user, groups) in identities.items()))
        for stem in identities:
            write_kubeconfig(d / f"{stem}.kubeconfig", self.api_url, certs / "ca.crt", self.tokens[stem])
        (d / "cni" / "net.d" / "10-agent-studio.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": "agent-studio",
            "plugins": [{
                "type": "bridge", "bridge": POD_BRIDGE, "isGateway": True, "ipMasq": False, "hairpinMode": True,
                # No default route: a pod can address Services and the node, nothing else.
                "ipam": {"type": "host-local", "dataDir": str(d / "cni" / "ipam"),
                         "ranges": [[{"subnet": POD_CIDR, "gateway": POD_GATEWAY}]],
                         "routes": [{"dst": SERVICE_CIDR, "gw": POD_GATEWAY},
                                    {"dst": f"{NODE_IP}/32", "gw": POD_GATEWAY}]},
            }],
        }))
        c = d / "containerd"
        (c / "config.toml").write_text(f"""version = 2
root = "{c / 'root'}"
state = "{c / 'state'}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "{self.containerd_socket}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{c / 'opt'}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{self.bins['PAUSE_IMAGE']}"
  # runc cannot set the pause container's oom_score_adj without CAP_SYS_RESOURCE (k8s-node.md)
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_PLUGINS}"
    conf_dir = "{d / 'cni' / 'net.d'}"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{c / 'runc'}"
""")
        (d / "kubelet.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "failCgroupV1": False,  # 1.35+ refuses cgroup v1 otherwise; our machines mount v1
            "cgroupDriver": "cgroupfs",  # containerd 1.6 cannot tell the kubelet its driver
            "cgroupRoot": f"/{self.cgroup_root}",
            "containerRuntimeEndpoint": f"unix://{self.containerd_socket}",
            "address": NODE_IP, "port": self.ports["kubelet"], "readOnlyPort": 0, "healthzPort": 0,
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                               "x509": {"clientCAFile": str(certs / "ca.crt")}},
            "authorization": {"mode": "Webhook"},
            "clusterDNS": [DNS_SERVICE_IP], "clusterDomain": "cluster.local",
            "resolvConf": str(d / "resolv.conf"),  # pods with dnsPolicy Default: still only the cluster DNS
            "podLogsDir": str(d / "pod-logs"),
            "systemReserved": {"cpu": "50m", "memory": "64Mi"},
            "kubeReserved": {"cpu": "50m", "memory": "64Mi"},
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,  # images are imported, never pulled
            "serializeImagePulls": False, "registerNode": True, "rotateCertificates": False,
            "nodeStatusUpdateFrequency": "4s", "syncFrequency": "10s",
        }))
        # Written once: kube-proxy exits when its config file changes under it (k8s-node.md).
        (d / "kube-proxy.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
            "mode": "iptables", "hostnameOverride": NODE_NAME, "bindAddress": NODE_IP,
            "clientConnection": {"kubeconfig": str(d / "kube-proxy.kubeconfig")},
            "clusterCIDR": POD_CIDR,
            "healthzBindAddress": f"{NODE_IP}:{self.ports['proxy_healthz']}",
            "metricsBindAddress": f"127.0.0.1:{self.ports['proxy_metrics']}",
            # Leave conntrack's host-wide and netns settings alone (0: do not set).
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
            "iptables": {"localhostNodePorts": False}, "nodePortAddresses": ["primary"],
        }))
        # CoreDNS answers only cluster.local (and reverse lookups) from the API; no `forward`, so no
        # query leaves the node. It listens on a free port of the node address; the kube-dns Service
        # (10.96.0.10:53) points there through a hand-made EndpointSlice, so pods and kubelet's
        # clusterDNS use the standard address and port 53 while no fixed port is bound.
        (d / "Corefile").write_text(f""".:{self.ports['dns']} {{
    bind {NODE_IP}
    errors
    kubernetes cluster.local in-addr.arpa ip6.arpa {{
        kubeconfig {d / 'coredns.kubeconfig'}
        pods insecure
    }}
    cache 5
}}
""")

    def _apiserver_args(self) -> list[Any]:
        d, certs = self.directory, self.directory / "certs"
        return [self.bins["KUBE_APISERVER"], f"--etcd-servers=http://127.0.0.1:{self.ports['etcd']}",
                f"--cert-dir={certs}", f"--tls-cert-file={certs / 'apiserver.crt'}",
                f"--tls-private-key-file={certs / 'apiserver.key'}",
                f"--secure-port={self.ports['apiserver']}", f"--bind-address={NODE_IP}",
                f"--advertise-address={NODE_IP}", f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--authorization-mode=Node,RBAC", f"--token-auth-file={d / 'tokens.csv'}",
                f"--client-ca-file={certs / 'ca.crt'}",
                "--enable-admission-plugins=NodeRestriction",  # PodSecurity and ServiceAccount are on by default
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={certs / 'sa.pub'}",
                f"--service-account-signing-key-file={certs / 'sa.key'}",
                f"--kubelet-client-certificate={certs / 'apiserver-kubelet-client.crt'}",
                f"--kubelet-client-key={certs / 'apiserver-kubelet-client.key'}",
                "--kubelet-preferred-address-types=InternalIP",  # the node's name resolves nowhere
                # The aggregation layer: requests for an APIService's group go to its server with the
                # user in these headers, signed by the front proxy's certificate; to its endpoint's pod
                # IP (the bridge reaches it) rather than through the Service's virtual IP.
                f"--requestheader-client-ca-file={certs / 'front-proxy' / 'ca.crt'}",
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"--proxy-client-cert-file={certs / 'front-proxy' / 'front-proxy-client.crt'}",
                f"--proxy-client-key-file={certs / 'front-proxy' / 'front-proxy-client.key'}",
                "--enable-aggregator-routing=true",
                "--profiling=false"]

    def _bootstrap_objects(self) -> list[dict[str, Any]]:
        """CoreDNS's read access, and the kube-dns Service with its endpoint at CoreDNS's port."""
        labels = {"k8s-app": "kube-dns"}
        return [
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "agent-studio:coredns"},
             "rules": [{"apiGroups": [""], "resources": ["services", "pods", "namespaces"], "verbs": ["list", "watch"]},
                       {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]}]},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
             "metadata": {"name": "agent-studio:coredns"},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "agent-studio:coredns"},
             "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "agent-studio:coredns"}]},
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": labels},
             "spec": {"clusterIP": DNS_SERVICE_IP, "ports": [
                 {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": self.ports["dns"]},
                 {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": self.ports["dns"]}]}},
            {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
             "metadata": {"name": "kube-dns-node", "namespace": "kube-system",
                          "labels": {"kubernetes.io/service-name": "kube-dns",
                                     "endpointslice.kubernetes.io/managed-by": "agent-studio-tests"}},
             "addressType": "IPv4",
             "endpoints": [{"addresses": [NODE_IP], "conditions": {"ready": True}}],
             "ports": [{"name": "dns", "port": self.ports["dns"], "protocol": "UDP"},
                       {"name": "dns-tcp", "port": self.ports["dns"], "protocol": "TCP"}]},
        ]

    # --- teardown ----------------------------------------------------------------------------------

    def pids(self) -> list[int]:
        """Every process of the node: in its network or mount namespace (components, containerd's
        shims) or in its cgroup root (containers, which have namespaces of their own)."""
        found = set()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and (
                    (self.netns is not None and _ns_inode(entry.name, "net") == self.netns)
                    or (self.mntns is not None and _ns_inode(entry.name, "mnt") == self.mntns)):
                found.add(int(entry.name))
        for hierarchy in self._hierarchies():
            root = hierarchy / self.cgroup_root
            if root.exists():
                for procs in root.rglob("cgroup.procs"):
                    try:
                        found.update(int(p) for p in procs.read_text().split())
                    except OSError:
                        pass
        return sorted(found)

    def stop(self) -> None:
        """Everything the node made goes, also after a failed start: processes, containers, the
        namespaces with their mounts and links, the cgroup subtree, the host sysctls, the files."""
        began = time.monotonic()
        # SIGKILL, all at once: the node's state goes with the run folder, so an orderly exit buys
        # nothing and costs time (measured: etcd 7 s after SIGTERM, kube-apiserver over 12 s).
        for proc in [*self.procs, *([self.holder] if self.holder else [])]:
            proc.kill()
        problems: list[str] = []  # every step runs even when one fails; all are reported
        deadline = time.monotonic() + 20
        while pids := self.pids():
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                problems.append(f"node processes survive SIGKILL: {pids}")
                break
            time.sleep(0.05)
        for hierarchy in self._hierarchies():
            root = hierarchy / self.cgroup_root
            try:
                if root.exists():
                    for path in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                        path.rmdir()
                    root.rmdir()
            except OSError as exc:
                problems.append(f"cgroup {root}: {exc}")
        with _host_record() as record:  # our holder is gone, so we are no longer in it
            if not record["nodes"]:
                for name, value in record["sysctls"].items():
                    if _sysctl(name) != value:
                        Path("/proc/sys", name).write_text(value)
        # The run folder goes too (containerd's unpacked images are hundreds of MB); a failure
        # already quoted the logs it needed.
        shutil.rmtree(self.directory, ignore_errors=True)
        self.procs.clear()
        self.timings["stop"] = time.monotonic() - began
        if problems:
            raise RuntimeError("the node's teardown left: " + "; ".join(problems))

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _ready(obj: dict[str, Any]) -> bool:
    kind, status = obj.get("kind", ""), obj.get("status") or {}
    if kind == "StatefulSet":
        want = (obj.get("spec") or {}).get("replicas", 1)
        return status.get("readyReplicas", 0) == want and status.get("updateRevision") == status.get("currentRevision")
    if kind == "PersistentVolumeClaim":
        return status.get("phase") == "Bound"
    conditions = status.get("conditions")
    if conditions is None:
        return kind not in ("Pod", "Node", "Deployment", "Job")
    wanted = {"Deployment": "Available", "Job": "Complete"}.get(kind, "Ready")
    return any(c.get("type") == wanted and c.get("status") == "True" for c in conditions)
