"""Child processes of the tests, and what they said when a test fails.

Every process a test starts goes through `Process`: its stderr (and its stdout, unless the test reads
that line by line) is kept in a log file, and the report of a test that fails carries a section per
process that was running or started during it, with its exit status and the end of what it said. So a
process's own error — a port in use, a traceback — is in the failure, never only in a file nobody
opens. The hooks at the end do that; conftest.py imports them.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import httpx
import pytest

from agentstudio.natsserver import die_with_parent, free_port

if TYPE_CHECKING:
    from conftest import Tenant

CLI = Path(sys.executable).parent / "agent-studio"
TAIL_LINES = 60


class Process:
    """A child process whose output is kept for the failure report."""

    started: ClassVar[list[Process]] = []  # the current test's, and any still running from earlier

    def __init__(
        self,
        args: Sequence[str],
        log: Path,
        env: dict[str, str] | None = None,
        read_stdout: bool = False,
        stdin: bool = False,
        name: str | None = None,
    ) -> None:
        self.args = [str(a) for a in args]
        # e.g. "agent-studio dialer"; a wrapped command (nsenter ... kubelet) names itself
        self.name = name or " ".join([Path(self.args[0]).name, *self.args[1:2]])
        self.log = log
        self.stdout: list[str] = []  # every stdout line read so far (read_stdout)
        self.lines: queue.Queue[str | None] = queue.Queue()  # the same lines, for the test to take
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                self.args, env=env, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE if read_stdout else out, stderr=out, text=True,
                preexec_fn=die_with_parent,  # a killed test run leaks no process
            )
        Process.started.append(self)
        if read_stdout:
            threading.Thread(target=self._read, name=f"stdout of {self.name}", daemon=True).start()

    @classmethod
    def agent_studio(cls, *args: str, log: Path, env: dict[str, str] | None = None, read_stdout: bool = False,
                     stdin: bool = False) -> Process:
        """`agent-studio <args>` from this virtualenv."""
        return cls([str(CLI), *args], log, env=env, read_stdout=read_stdout, stdin=stdin)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.stdout.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def output(self) -> str:
        """Its exit status and the end of what it said, for a person reading a failure."""
        code = self.proc.poll()
        status = f"pid {self.proc.pid}, " + ("still running" if code is None else f"exited with {code}")
        parts = [f"$ {' '.join(self.args)}\n({status})"]
        if self.proc.stdout is not None:
            parts.append("--- stdout (end):\n" + "\n".join(self.stdout[-TAIL_LINES:]))
        try:
            said = self.log.read_text(errors="replace").splitlines()[-TAIL_LINES:]
        except OSError as exc:
            said = [f"(log unreadable: {exc})"]
        parts.append(f"--- {'stderr' if self.proc.stdout is not None else 'output'} (end of {self.log}):\n"
                     + "\n".join(said))
        return "\n".join(parts)

    def alive(self) -> None:
        """Fail, with what it said, if the process has exited."""
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.output()}")

    def wait_until(self, check: Callable[[], bool], what: str, timeout: float = 20) -> None:
        """Poll `check` while the process runs; fail with its output if it exits or time runs out."""
        deadline = time.monotonic() + timeout
        while not check():
            self.alive()
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not after {timeout} s\n{self.output()}")
            time.sleep(0.1)

    def next_line(self, timeout: float = 15) -> str | None:
        """The next stdout line (read_stdout), None once the process closed its output."""
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"{self.name}: no output for {timeout} s\n{self.output()}") from None
        if line is None:
            self.lines.put(None)  # and again for the next caller
        return line

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 20) -> int:
        """Ask it to stop (SIGTERM unless told) and wait; killed when it does not stop in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"{self.name} did not stop within {timeout} s\n{self.output()}") from None
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# --- pytest hooks (imported by conftest.py) ----------------------------------------------------


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """A new test: forget the processes that ended before it (a module's long-lived ones stay)."""
    Process.started[:] = [p for p in Process.started if p.proc.poll() is None]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for process in Process.started:
            report.sections.append((f"process {process.name}", process.output()))


def start_ingest(nats_url: str, log: Path, **env: str) -> tuple[Process, str]:
    """`agent-studio ingest` on a free loopback port, not waited for (see `ingest_ready`); returns it and
    its base URL. `env`: more AGENTSTUDIO_* settings."""
    port = free_port()
    process = Process.agent_studio("ingest", log=log, env={
        **os.environ, "AGENTSTUDIO_NATS_URL": nats_url, "AGENTSTUDIO_HOST": "127.0.0.1",
        "AGENTSTUDIO_PORT": str(port), **env})
    return process, f"http://127.0.0.1:{port}"


def ingest_ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz").status_code == 200
    except httpx.TransportError:
        return False


@contextmanager
def running_ingest(nats_url: str, tenant: Tenant, log: Path, **env: str) -> Iterator[str]:
    """`agent-studio ingest` on a free loopback port for `tenant` (its bundle published), until it is
    ready; yields its base URL. `env`: more AGENTSTUDIO_* settings."""
    process, url = start_ingest(nats_url, log, **env)
    try:
        process.wait_until(lambda: ingest_ready(url), "ingest ready")
        yield url
    finally:
        process.stop(timeout=10)
