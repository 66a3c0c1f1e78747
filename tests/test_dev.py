"""`agent-studio dev DIR`: the local stack a new user starts first, driven as a user would."""

from __future__ import annotations

import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from agentstudio.natsserver import free_port
from conftest import EXAMPLES, SEED_BODY


class DevProcess:
    def __init__(self, directory: Path, port: int) -> None:
        cli = Path(sys.executable).parent / "agent-studio"
        self.proc = subprocess.Popen(
            [str(cli), "dev", str(directory), "--port", str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.url = f"http://127.0.0.1:{port}"
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.version = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def expect(self, pattern: str, timeout: float = 20) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                continue
            self.seen.append(line)
            match = re.search(pattern, line)
            if match:
                return match
        raise AssertionError(f"no line matching {pattern!r}; output so far:\n" + "\n".join(self.seen))

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
        wait_ready(self.url)
        return keys

    def expect_new_version(self) -> None:
        while True:
            version = int(self.expect(r"^bundle default: version (\d+)").group(1))
            if version > self.version:
                self.version = version
                return

    def interrupt(self, sig: signal.Signals = signal.SIGINT) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=20)


def wait_ready(url: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("dev ingest never became ready")


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
        assert set(keys) == {"clevertap", "moengage", "braze", "webengage", "analytics-readonly", "sandbox"}
        assert keys["sandbox"].startswith("as_test_") and keys["clevertap"].startswith("as_live_")
        assert any(line.startswith("webhook secret results: whsec_") for line in dev.seen)
        ingest = f"{dev.url}/api/v1/webhooks/ingest"

        # A campaign's request is accepted and the dialer picks the call up.
        resp = httpx.post(ingest, json=SEED_BODY, headers={"Authorization": f"Bearer {keys['clevertap']}"})
        assert resp.status_code == 201, resp.text
        dev.expect(rf"dialer \(simulated\): call {resp.json()['call_id']} to \*+3210 workflow=free-trial-followup")

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
