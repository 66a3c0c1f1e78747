"""The whole local stack (`agent-studio dev` and its nats-server) SIGKILLed in the middle of a burst,
then started again on the same folder: every 201 is still there, a retry with the same
Idempotency-Key makes no second call, and every call reaches a final status (the calls the dead
dialer had under way are failed provider_lost once its lease runs out)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import threading
import uuid
from collections import Counter
from pathlib import Path

import httpx
import nats

from agentstudio import bus
from agentstudio.callstate import CallState, CallStore
from agentstudio.natsserver import free_port
from conftest import EXAMPLES, SEED_BODY
from test_dev import DevProcess, nats_port

CALLS = 100
SETTLED = 180.0  # bounded polling: the lease, the ack wait and a call's length, with room


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def burst(ingest: str, key: str, keys: list[str], answers: dict[str, tuple[int, str | None]]) -> None:
    """One request per Idempotency-Key, a few at a time; a request the kill cuts off has no answer."""

    def send(i: int) -> None:
        body = {**SEED_BODY, "phone_number": f"+9198765{i:05d}",
                "metadata": {**SEED_BODY["metadata"], "simulate_duration_seconds": "8"}}
        try:
            resp = httpx.post(ingest, json=body, timeout=10,
                              headers={"Authorization": f"Bearer {key}", "Idempotency-Key": keys[i]})
        except httpx.TransportError:
            return
        answers[keys[i]] = (resp.status_code, resp.json().get("call_id") if resp.status_code == 201 else None)

    threads = [threading.Thread(target=lambda j=j: [send(i) for i in range(j, len(keys), 4)]) for j in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


async def test_the_whole_stack_killed_mid_burst_leaves_no_call_unfinished(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / "manifests"
    shutil.copytree(EXAMPLES, folder)
    # Inherited by both dev processes: a short lease and ack wait keep the test short.
    for name, value in {"AGENTSTUDIO_DIALER_LEASE_SECONDS": "2", "AGENTSTUDIO_DISPATCH_ACK_WAIT_SECONDS": "10",
                        "AGENTSTUDIO_MAX_CONCURRENT_CALLS_PER_TENANT": str(CALLS)}.items():
        monkeypatch.setenv(name, value)
    first = DevProcess(folder, free_port())
    keys = [f"burst-{uuid.uuid4().hex}" for _ in range(CALLS)]
    before: dict[str, tuple[int, str | None]] = {}
    try:
        api_keys = first.start()
        ingest = f"{first.url}/api/v1/webhooks/ingest"
        sender = threading.Thread(target=burst, args=(ingest, api_keys["clevertap"], keys, before))
        sender.start()
        first.process.wait_until(lambda: len(before) >= CALLS // 3, "a third of the burst answered", timeout=60)
        # The whole stack at once: its nats-server, then dev itself, with no chance to flush or hand back.
        for pid in children(first.proc.pid):
            os.kill(pid, signal.SIGKILL)
        os.kill(first.proc.pid, signal.SIGKILL)
        sender.join()
        first.proc.wait()
    finally:
        if first.proc.poll() is None:
            first.proc.kill()
    accepted = {k: call for k, (code, call) in before.items() if code == 201}
    assert accepted and len(accepted) < CALLS, f"{len(accepted)} of {CALLS} accepted: the kill was not mid-burst"

    again = DevProcess(folder, free_port())
    try:
        api_keys = again.start()
        restarted = asyncio.get_running_loop().time()
        after: dict[str, tuple[int, str | None]] = {}
        burst(f"{again.url}/api/v1/webhooks/ingest", api_keys["clevertap"], keys, after)
        assert {code for code, _ in after.values()} == {201} and len(after) == CALLS, Counter(c for c, _ in after.values())
        # Every 201 still there, under the same call: a retry made no second call.
        assert {k: after[k][1] for k in accepted} == accepted
        ids = [call for _, call in after.values() if call is not None]
        nc = await nats.connect(f"nats://127.0.0.1:{nats_port(folder, again)}")
        try:
            store = CallStore(await bus.calls_bucket(nc.jetstream()))
            deadline = asyncio.get_running_loop().time() + SETTLED
            while True:
                states: list[CallState | None] = [await store.get("default", c) for c in ids]
                open_calls = [s for s in states if s is None or not s.terminal]
                if not open_calls:
                    settled_in = asyncio.get_running_loop().time() - restarted
                    break
                again.process.alive()
                assert asyncio.get_running_loop().time() < deadline, \
                    f"{len(open_calls)} calls not final: " + ", ".join(
                        f"{s.call_id} {s.status} ({s.dialer})" if s else "missing" for s in open_calls[:10])
                await asyncio.sleep(1)
        finally:
            await nc.close()
        assert again.interrupt() == 0
    finally:
        if again.proc.poll() is None:
            again.proc.kill()
    outcomes = Counter(s.error.code if s and s.error else s and s.status for s in states)
    assert set(outcomes) <= {"completed", "provider_lost"}, outcomes
    # Each call placed at most once, across both runs (dev prints a line per placed call).
    placed = Counter(line.split()[3] for line in first.process.stdout + again.process.stdout
                     if line.startswith("dialer (simulated): call "))
    assert placed and max(placed.values()) == 1, [c for c, n in placed.items() if n > 1]
    print(f"before the kill: {len(accepted)} of {CALLS} accepted; after the restart every call final in "
          f"{settled_in:.1f} s; outcomes {dict(outcomes)}")
