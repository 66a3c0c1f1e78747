"""`agent-studio dev DIR`: the local stack a new user starts first, driven as a user would."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest

from agentstudio.natsserver import NatsServer, StoreInUse, free_port
from conftest import EXAMPLES, SEED_BODY
from processes import Process


class DevProcess:
    """`agent-studio dev` as a user runs it; its stdout read line by line, its stderr in a log beside
    the folder (both in the report of a failing test)."""

    def __init__(self, directory: Path, port: int, *args: str) -> None:
        log = directory.parent / f"dev-{uuid.uuid4().hex[:8]}.log"  # its own, when two share a port
        self.process = Process.agent_studio("dev", str(directory), "--port", str(port), *args, log=log,
                                            read_stdout=True)
        self.proc = self.process.proc
        self.url = f"http://127.0.0.1:{port}"
        self.seen: list[str] = []
        self.version = 0

    def expect(self, pattern: str, timeout: float = 20) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.process.next_line(timeout=left)
            except AssertionError:
                break
            if line is None:
                break
            self.seen.append(line)
            match = re.search(pattern, line)
            if match:
                return match
        raise AssertionError(f"no line matching {pattern!r}\n{self.process.output()}")

    def start(self) -> dict[str, str]:
        keys = {}
        while True:
            match = self.expect(r"^(api key (\S+): (\S+)|ingest: |bundle default: version (\d+))")
            if match.group(1) == "ingest: ":
                break
            if match.group(4):
                self.version = int(match.group(4))
            else:
                keys[match.group(2)] = match.group(3)
        self.process.wait_until(lambda: ready(self.url), "dev's ingest ready")
        return keys

    def expect_new_version(self) -> None:
        while True:
            version = int(self.expect(r"^bundle default: version (\d+)").group(1))
            if version > self.version:
                self.version = version
                return

    def interrupt(self, sig: signal.Signals = signal.SIGINT) -> int:
        return self.process.stop(sig)


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz").status_code == 200
    except httpx.TransportError:
        return False


def nats_port(directory: Path, dev: DevProcess) -> int:
    line = next(line for line in dev.seen if line.startswith("nats-server: "))
    return int(re.search(r":(\d+) ", line).group(1))  # type: ignore[union-attr]


def test_dev_runs_the_stack_from_a_folder(tmp_path: Path) -> None:
    folder = tmp_path / "manifests"
    shutil.copytree(EXAMPLES, folder)
    port = free_port()
    dev = DevProcess(folder, port)
    try:
        keys = dev.start()
        assert set(keys) == {"clevertap", "moengage", "braze", "webengage", "analytics-readonly", "sandbox",
                             "webhooks-admin"}
        assert keys["sandbox"].startswith("as_test_") and keys["clevertap"].startswith("as_live_")
        # Each key says what it may do, so the user knows which one to pick for what.
        assert f"api key clevertap: {keys['clevertap']} (live; calls:create)" in dev.seen
        assert f"api key sandbox: {keys['sandbox']} (test; calls:create, calls:read)" in dev.seen
        assert f"api key webhooks-admin: {keys['webhooks-admin']} (live; webhooks:manage)" in dev.seen
        assert any(line.startswith("webhook secret results: whsec_") for line in dev.seen)
        ingest = f"{dev.url}/api/v1/webhooks/ingest"
        dead = httpx.get(f"{dev.url}/api/v1/webhooks/dead-letters",
                         headers={"Authorization": f"Bearer {keys['webhooks-admin']}"})
        assert dead.status_code == 200, dead.text
        assert httpx.get(f"{dev.url}/docs").status_code == 200  # the API reference the README points to

        # A campaign's request is accepted, the dialer picks the call up, and its outcome is shown.
        resp = httpx.post(ingest, json=SEED_BODY, headers={"Authorization": f"Bearer {keys['clevertap']}"})
        assert resp.status_code == 201, resp.text
        call_id = resp.json()["call_id"]
        dev.expect(rf"dialer \(simulated\): call {call_id} to \*+3210 workflow=free-trial-followup")
        dev.expect(rf"^call {call_id} to \*{{9}}3210: answered$")
        dev.expect(rf"^call {call_id} to \*{{9}}3210: completed in 2 s$")
        failing = {**SEED_BODY, "metadata": {"simulate_outcome": "failed"}}
        resp = httpx.post(ingest, json=failing, headers={"Authorization": f"Bearer {keys['clevertap']}"})
        dev.expect(rf"^call {resp.json()['call_id']} to \*{{9}}3210: failed \(simulated_failure: scripted failure\)$")

        # A new manifest takes effect without a restart.
        new_agent = {"agent_slug": "reminder", "phone_number": "+14155552671"}
        auth = {"Authorization": f"Bearer {keys['sandbox']}"}
        assert httpx.post(ingest, json=new_agent, headers=auth).status_code == 404
        (folder / "reminder.yaml").write_text(
            "apiVersion: agentstudio.io/v1alpha1\nkind: Agent\nmetadata: {name: reminder}\nspec: {prompt: Hi}\n"
        )
        dev.expect_new_version()
        assert httpx.post(ingest, json=new_agent, headers=auth).status_code == 201

        # A broken edit is reported and the last good configuration stays in force.
        (folder / "reminder.yaml").write_text("apiVersion: agentstudio.io/v1alpha1\nkind: Agent\nmetadata: {name: reminder}\nspec: {}\n")
        dev.expect(r"^error: .*reminder.yaml spec.prompt: Field required")
        dev.expect(r"last good configuration stays in force")
        assert httpx.post(ingest, json=new_agent, headers=auth).status_code == 201

        port_of_nats = nats_port(folder, dev)
        assert dev.interrupt() == 0
        dev.expect(r"^stopped")
        with socket.socket() as s:  # the nats-server it started is gone too
            assert s.connect_ex(("127.0.0.1", port_of_nats)) != 0
    finally:
        if dev.proc.poll() is None:
            dev.proc.kill()

    # Keys are kept across restarts, in a folder git ignores.
    again = DevProcess(folder, free_port())
    try:
        assert again.start() == keys
        resp = httpx.post(f"{again.url}/api/v1/webhooks/ingest", json=SEED_BODY, headers={"Authorization": f"Bearer {keys['clevertap']}"})
        assert resp.status_code == 201
        port_of_nats = nats_port(folder, again)
        assert again.interrupt(signal.SIGTERM) == 0  # as Kubernetes or systemd would stop it
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port_of_nats)) != 0
    finally:
        if again.proc.poll() is None:
            again.proc.kill()
    subprocess.run(["git", "init", "-q", str(folder)], check=True)
    ignored = subprocess.run(["git", "-C", str(folder), "check-ignore", ".agent-studio/keys.json"], capture_output=True)
    assert ignored.returncode == 0
    assert (folder / ".agent-studio" / "keys.json").stat().st_mode & 0o077 == 0


def test_a_second_dev_on_the_same_folder_is_refused_before_it_starts_anything(tmp_path: Path) -> None:
    folder = tmp_path / "manifests"
    shutil.copytree(EXAMPLES, folder)
    port = free_port()
    first = DevProcess(folder, port)
    try:
        keys = first.start()
        # The README's command run twice: same folder, same port.
        again = DevProcess(folder, port)
        assert again.proc.wait(timeout=30) == 1  # it exits on its own...
        assert again.process.stdout == []  # ...before printing a key, a bundle or someone else's ingest URL
        assert again.process.log.read_text() == (
            f"agent-studio dev: port {port} is in use (is another `agent-studio dev` running?); use --port\n")

        # Another port does not make sharing the folder safe: its JetStream store is locked.
        other = DevProcess(folder, free_port())
        assert other.proc.wait(timeout=30) == 1
        assert other.process.stdout == []
        assert other.process.log.read_text() == (
            f"agent-studio dev: {folder} is in use by another `agent-studio dev` (pid {first.proc.pid}); two servers "
            "must never share its JetStream store: stop that one first\n")

        # The first one never noticed.
        resp = httpx.post(f"{first.url}/api/v1/webhooks/ingest", json=SEED_BODY,
                          headers={"Authorization": f"Bearer {keys['clevertap']}"})
        assert resp.status_code == 201, resp.text
        assert first.interrupt() == 0
    finally:
        first.process.kill()

    # Once it is gone, the folder is free again.
    after = DevProcess(folder, port)
    try:
        assert after.start() == keys
        assert after.interrupt() == 0
    finally:
        after.process.kill()


def test_two_nats_servers_never_share_a_store(tmp_path: Path) -> None:
    with NatsServer(tmp_path / "store"):
        second = NatsServer(tmp_path / "store")
        with pytest.raises(StoreInUse, match=rf"the JetStream store {tmp_path / 'store'} is in use by another "
                                             rf"process \(pid {os.getpid()}\)"):
            second.start()
        assert second.proc is None  # refused before a server was started on it
    with NatsServer(tmp_path / "store"):  # free once the first has stopped
        pass
