"""A role that cannot listen says so and stops, and a test that starts a process shows what that
process said when it fails: the first thing a user sees when `scripts/dev` holds a port. The dialer
runs on uvloop."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentstudio.natsserver import NatsServer, free_port
from conftest import EXAMPLES
from processes import Process, ingest_ready
from twilio_mock import TwilioMock

TESTS = Path(__file__).resolve().parent


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port another program is listening on (as `scripts/dev` listens on 8080)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def role_args(role: str, port: int, tmp_path: Path) -> list[str]:
    if role == "dev":
        folder = tmp_path / "manifests"
        shutil.copytree(EXAMPLES, folder)
        return ["dev", str(folder), "--port", str(port)]
    return [role]


@pytest.mark.parametrize("role", ["ingest", "dialer", "dev"])
def test_a_role_on_a_taken_port_says_so_and_exits_1(
    role: str, taken_port: int, nats_server: NatsServer, tmp_path: Path
) -> None:
    env = {**os.environ, "AGENTSTUDIO_NATS_URL": nats_server.url, "AGENTSTUDIO_HOST": "127.0.0.1",
           "AGENTSTUDIO_PORT": str(taken_port), "AGENTSTUDIO_WEBHOOK_SECRETS": "none"}
    process = Process.agent_studio(*role_args(role, taken_port, tmp_path), log=tmp_path / f"{role}.log", env=env)
    # The helper's own failure message carries the process's words.
    with pytest.raises(AssertionError) as failure:
        process.wait_until(lambda: False, f"{role} serving", timeout=30)
    said = process.log.read_text()
    hint = ("port {} is in use (is another `agent-studio dev` running?); use --port" if role == "dev"
            else "port {} is in use; set AGENTSTUDIO_PORT to a free one").format(taken_port)
    assert said == f"agent-studio {role}: {hint}\n", said  # one line, in words; no traceback, no log noise
    assert process.proc.returncode == 1
    assert f"agent-studio {role}: {hint}" in str(failure.value)
    assert "exited with 1" in str(failure.value)


def test_the_dialer_runs_its_event_loop_on_uvloop(nats_server: NatsServer, tmp_path: Path) -> None:
    # The dialer's one event loop schedules every relay frame and model chunk of its live conversations;
    # asyncio.run gave it the pure-Python selector loop (bench/conversations.py says what uvloop saves).
    port = free_port()
    env = {**os.environ, "AGENTSTUDIO_NATS_URL": nats_server.url, "AGENTSTUDIO_HOST": "127.0.0.1",
           "AGENTSTUDIO_PORT": str(port), "AGENTSTUDIO_WEBHOOK_SECRETS": "none"}
    dialer = Process.agent_studio("dialer", log=tmp_path / "dialer.log", env=env)
    try:
        dialer.wait_until(lambda: ingest_ready(f"http://127.0.0.1:{port}"), "dialer ready", timeout=60)
        uvloop = "/uvloop/loop." in Path(f"/proc/{dialer.proc.pid}/maps").read_text()
        assert uvloop, "the dialer's process has not loaded uvloop"
    finally:
        assert dialer.stop() == 0, dialer.output()


INNER_TEST = '''
import os, socket, time
from pathlib import Path
from processes import Process
from twilio_mock import TwilioMock

def test_calls_are_placed(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = {**os.environ, "AGENTSTUDIO_HOST": "127.0.0.1", "AGENTSTUDIO_PORT": str(port),
               "AGENTSTUDIO_NATS_URL": "nats://127.0.0.1:1", "AGENTSTUDIO_WEBHOOK_SECRETS": "none"}
        dialer = Process.agent_studio("dialer", log=tmp_path / "dialer.log", env=env)
        dialer.proc.wait(timeout=60)
    assert False, "40 calls never placed"
'''


def test_a_failing_test_shows_the_output_of_the_processes_it_started(tmp_path: Path) -> None:
    """The original trap: the test asserts on its own outcome, the cause is in the process's log."""
    (tmp_path / "test_inner.py").write_text(INNER_TEST)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "processes", "-p", "no:cacheprovider", "-q", "-x",
         "--rootdir", str(tmp_path), str(tmp_path / "test_inner.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    report = run.stdout
    assert "40 calls never placed" in report, report
    assert "process agent-studio dialer" in report, report
    assert "exited with 1" in report, report
    assert "agent-studio dialer: port " in report and "is in use; set AGENTSTUDIO_PORT to a free one" in report, report


def test_a_nats_server_that_cannot_start_quotes_its_own_error(taken_port: int, tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "store", port=taken_port)
    with pytest.raises(RuntimeError, match=r"nats-server exited with 1:\n(.|\n)*address already in use"):
        server.start()


def test_prism_that_cannot_start_quotes_its_own_error(tmp_path: Path) -> None:
    spec = tmp_path / "broken.json"
    spec.write_text('{"openapi": "3.0.0", "paths": ')
    mock = TwilioMock(spec=spec, log_file=tmp_path / "prism.log")
    try:
        with pytest.raises(RuntimeError) as failure:
            mock.start()
    finally:
        mock.stop()
    assert f"Error parsing {spec}" in str(failure.value)  # Prism's own fatal line
    assert "unexpected end of the stream" in str(failure.value)
