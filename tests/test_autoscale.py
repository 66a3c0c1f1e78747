"""Dialers scaled on their queue by KEDA, on the real node (tests/node.py): KEDA's operator and metrics
adapter built from the Go module proxy (scripts/build-keda) and installed from that version's own
manifests (tests/keda.py), our chart for one tenant with the dialers' ScaledObject on, a backlog of
calls queued through ingest, and then what the issue asks: the dialers scale out (at most to the
ceiling), the backlog drains, they scale back in to the floor, and no call is placed twice or cut
mid-conversation while dialers are removed. The seconds from the backlog queued to more dialers ready
is the figure (printed, and written to bench/results/autoscale.json)."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

import keda
from conftest import SEED_BODY
from installation import Installed, apply_examples, placed, prepare, timestamp
from node import Node

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "autoscale.json"
NS = "tenant-scale"
DIALER = f"{NS}-agent-studio-dialer"
BACKLOG = 60  # calls queued at once
CALL_SECONDS = 12  # each one's simulated conversation
CAP = 10  # the tenant's concurrent calls (the chart's default plan): the backlog drains in ~75 s
# Waiting calls per dialer KEDA aims for: 60 waiting ask for 4 (the ceiling is 3), and fewer are asked
# for from 30 waiting on, so scale-in comes while every dialer is busy (with 10, 1 to 3 calls were live
# on the removed dialers; with 15, 4).
PER_DIALER = 15
FLOOR, CEILING = 1, 3
PRESTOP_SECONDS = 5  # the chart's default dialer.preStopSleepSeconds
# Each dialer holds at most 5 calls waiting for a slot under the cap (the rest stay queued for any
# dialer), so calls spread over the dialers there are and a removed one is likely to hold live calls.
TEST_VALUES = ["--set-json", 'extraEnv=[{"name":"AGENTSTUDIO_DIALER_MAX_PARKED","value":"5"}]']
VALUES = ["--set", "dialer.autoscaling.enabled=true",
          "--set", f"dialer.autoscaling.minReplicas={FLOOR}", "--set", f"dialer.autoscaling.maxReplicas={CEILING}",
          "--set", f"dialer.autoscaling.pendingCallsPerDialer={PER_DIALER}",
          # Short, for the test: KEDA reads the queue every 5 s; scale-in waits 20 s of a smaller
          # recommendation, then removes a dialer at most every 10 s.
          "--set", "dialer.autoscaling.pollingInterval=5", "--set", "dialer.autoscaling.cooldownSeconds=20",
          "--set", "dialer.autoscaling.scaleDownPeriodSeconds=10",
          # The grace period must cover preStop + ringing + the longest call (the chart refuses less).
          "--set", "calls.maxCallSeconds=120", "--set", "dialer.terminationGracePeriodSeconds=160"]


@pytest.fixture(scope="module")
def keda_installed(node: Node) -> Iterator[dict[str, float]]:
    seconds = keda.install(node)
    yield seconds
    keda.uninstall(node)


@dataclass
class Watch:
    """The dialers, looked at every half second from a thread: the Deployment's replicas over time,
    when each pod was first seen terminating, and each pod's whole log (followed from its start, as
    a removed pod's log goes with it)."""

    node: Node
    timeline: list[tuple[float, int, int]] = field(default_factory=list)  # (time, spec replicas, ready)
    stopped: dict[str, float] = field(default_factory=dict)  # pod: when it was told to stop (deleted)
    logs: dict[str, subprocess.Popen[str]] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)
    error: list[BaseException] = field(default_factory=list)

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.look()
                time.sleep(0.5)
        except BaseException as exc:  # noqa: BLE001 - reported by the test's thread
            self.error.append(exc)

    def look(self) -> None:
        deployment = self.node.get("deployment", DIALER, NS) or {}
        status = deployment.get("status", {})
        self.timeline.append((time.time(), deployment.get("spec", {}).get("replicas", 0), status.get("readyReplicas", 0)))
        pods = json.loads(self.node.kubectl("get", "pods", "-n", NS, "-l", "app.kubernetes.io/component=dialer",
                                            "-o", "json"))["items"]
        for pod in pods:
            name = pod["metadata"]["name"]
            meta = pod["metadata"]
            if "deletionTimestamp" in meta:  # the time it will be killed: deleted a grace period before
                self.stopped[name] = timestamp(meta["deletionTimestamp"]) - meta["deletionGracePeriodSeconds"]
            started = any("running" in (s.get("state") or {}) for s in pod["status"].get("containerStatuses", []))
            if started and name not in self.logs:
                self.logs[name] = self.node.popen(
                    [self.node.bins["KUBECTL"], f"--kubeconfig={self.node.kubeconfig}", "logs", "-f", name, "-n", NS],
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def first(self, check: Any, what: str, timeout: float, since: float = 0) -> float:
        """When the timeline first satisfied check(spec, ready) at or after `since`, waiting for it."""
        deadline = time.monotonic() + timeout
        while True:
            if self.error:
                raise self.error[0]
            for at, spec, ready in list(self.timeline):
                if at >= since and check(spec, ready):
                    return at
            assert time.monotonic() < deadline, f"{what} not seen in {timeout} s: {self.timeline[-5:]}"
            time.sleep(0.5)

    def collected(self) -> dict[str, str]:
        self.stop.set()
        out = {}
        for name, follower in self.logs.items():
            if follower.poll() is None:
                follower.terminate()
            out[name] = follower.communicate(timeout=30)[0]
        return out


def test_dialers_scale_out_on_a_backlog_drain_it_and_scale_in_cutting_no_call(
    node: Node, keda_installed: dict[str, float], tmp_path_factory: pytest.TempPathFactory
) -> None:
    installed: Installed = prepare(node, tmp_path_factory.mktemp("volumes"), TEST_VALUES)
    installed.install(NS, *VALUES)
    try:
        scaled_object = _wait_scaled_object_ready(node)
        trigger = scaled_object["spec"]["triggers"][0]
        assert (trigger["type"], trigger["metadata"]["stream"], trigger["metadata"]["consumer"]) == (
            "nats-jetstream", "CALLS", "dialer")
        hpa = scaled_object["status"]["hpaName"]
        key, reader = apply_examples(installed, NS)
        watch = Watch(node)
        watcher = threading.Thread(target=watch.run, name="dialer watch", daemon=True)
        watcher.start()
        watch.first(lambda spec, ready: spec == FLOOR and ready == FLOOR, "the floor of dialers", 60)

        body = {**SEED_BODY, "metadata": {**SEED_BODY["metadata"], "simulate_duration_seconds": CALL_SECONDS}}
        posted = installed.finished(installed.stream(NS, key, body, "--rate", "50", "--count", str(BACKLOG)))
        queued = time.time()
        ids = list(posted["accepted"].values())
        assert len(ids) == BACKLOG, posted

        decided = watch.first(lambda spec, ready: spec > FLOOR, "a scale-out decision", 120, since=queued)
        scaled_out = watch.first(lambda spec, ready: ready > FLOOR, "more dialers ready", 120, since=queued)
        records = installed.wait_calls(NS, reader, ids, timeout=300)
        drained = time.time()
        scaled_in = _wait_floor(installed, timeout=240)
        logs = watch.collected()
        watcher.join(timeout=10)

        peak = max(spec for _, spec, _ in watch.timeline)
        assert FLOOR < peak <= CEILING, watch.timeline
        # Placed exactly once: every call in exactly one placement across every dialer that ran.
        placements = [call_id for log in logs.values() for call_id in placed(log)]
        twice = {i for i in ids if placements.count(i) > 1}
        never = {i for i in ids if i not in placements}
        assert not twice and not never, f"placed twice: {sorted(twice)}; never: {sorted(never)}"
        # Not cut: every call completed its whole conversation, also those a dialer was playing when
        # scale-in stopped it (placed by that dialer, answered before its SIGTERM, which follows the
        # preStop sleep, and ended after).
        statuses = {i: r["status"] for i, r in records.items()}
        assert set(statuses.values()) == {"completed"}, statuses
        assert all(r["duration_seconds"] >= CALL_SECONDS - 1 for r in records.values()), records
        removed = watch.stopped
        assert len(removed) >= peak - FLOOR, (removed, watch.timeline)
        crossing = [i for name, at in removed.items() for i in placed(logs.get(name, ""))
                    if i in records and timestamp(records[i]["answered_at"]) < at + PRESTOP_SECONDS
                    < timestamp(records[i]["ended_at"])]
        assert crossing, f"no call was live on a dialer as scale-in stopped it: {removed}"
        figures = {
            "backlog_calls": BACKLOG, "call_seconds": CALL_SECONDS, "tenant_cap": CAP,
            "pending_calls_per_dialer": PER_DIALER, "floor": FLOOR, "ceiling": CEILING, "peak_dialers": peak,
            "polling_interval_s": 5, "hpa_sync_period_s": 15,  # the controller manager's default
            "backlog_to_scale_out_decision_s": round(decided - queued, 1),
            "backlog_to_more_dialers_ready_s": round(scaled_out - queued, 1),
            "backlog_to_drained_s": round(drained - queued, 1),
            "drained_to_floor_s": round(scaled_in - drained, 1),
            "dialers_removed": len(removed), "calls_live_across_a_removal": len(crossing),
            "keda_install_s": {k: round(v, 1) for k, v in keda_installed.items()},
            "hpa": hpa,
        }
        RESULTS.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"\nautoscale: {json.dumps(figures)}")
    finally:
        node.helm("uninstall", NS, "-n", NS, "--wait")
        node.kubectl("delete", "namespace", NS, "--wait=false")


def _wait_scaled_object_ready(node: Node, timeout: float = 120) -> dict[str, Any]:
    """The ScaledObject once KEDA has read the queue through it (Ready) and made its HPA."""
    deadline = time.monotonic() + timeout
    while True:
        obj = node.get("scaledobject", DIALER, NS) or {}
        conditions = {c["type"]: c for c in obj.get("status", {}).get("conditions", [])}
        if conditions.get("Ready", {}).get("status") == "True" and obj["status"].get("hpaName"):
            return obj
        if time.monotonic() > deadline:
            logs = node.kubectl("logs", "deployment/keda-operator", "-n", keda.NAMESPACE, "--tail=60")
            raise TimeoutError(f"ScaledObject not Ready: {yaml.safe_dump(obj.get('status'))}\n{logs}")
        time.sleep(1)


def _wait_floor(installed: Installed, timeout: float) -> float:
    """When the dialers were back at the floor: that many, ready, and none still draining."""
    deadline = time.monotonic() + timeout
    while True:
        deployment = installed.node.get("deployment", DIALER, NS) or {}
        pods = installed.pods(NS, "dialer")
        if (deployment["spec"].get("replicas") == FLOOR and deployment["status"].get("readyReplicas") == FLOOR
                and len(pods) == FLOOR):
            return time.time()
        assert time.monotonic() < deadline, f"not back at {FLOOR} dialer(s): {[p['metadata']['name'] for p in pods]}"
        time.sleep(1)

