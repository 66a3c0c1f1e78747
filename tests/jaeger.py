"""Jaeger (v2, built by scripts/build-jaeger) on free loopback ports with in-memory storage: a real
OTLP backend for the tracing tests and bench, and its query API to read the traces back."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from agentstudio.natsserver import free_port
from processes import Process

ROOT = Path(__file__).resolve().parent.parent


def binary() -> str:
    """The jaeger binary; built on the first run (cached by version)."""
    built = subprocess.run(["bash", str(ROOT / "scripts" / "build-jaeger")], capture_output=True, text=True)
    assert built.returncode == 0, f"scripts/build-jaeger exited {built.returncode}:\n{built.stderr[-4000:]}"
    return dict(line.split("=", 1) for line in built.stdout.splitlines() if "=" in line)["JAEGER"]


def config(otlp_http: int, query_http: int, query_grpc: int) -> dict[str, Any]:
    """All-in-one as upstream's default, less what would listen on a fixed port (Jaeger/Zipkin
    receivers, remote sampling, zpages, expvar, its own metrics): OTLP over HTTP in, the query API out."""
    return {
        "service": {
            "extensions": ["jaeger_storage", "jaeger_query"],
            "pipelines": {"traces": {"receivers": ["otlp"], "processors": ["batch"],
                                     "exporters": ["jaeger_storage_exporter"]}},
            "telemetry": {"metrics": {"level": "none"}, "traces": {"level": "none"}, "logs": {"level": "warn"}},
        },
        "extensions": {
            # enable_tracing (on by default) exports the query's own spans to a collector on 4317.
            "jaeger_query": {"storage": {"traces": "memstore"}, "enable_tracing": False,
                             "http": {"endpoint": f"127.0.0.1:{query_http}"},
                             "grpc": {"endpoint": f"127.0.0.1:{query_grpc}"}},
            "jaeger_storage": {"backends": {"memstore": {"memory": {"max_traces": 100_000}}}},
        },
        "receivers": {"otlp": {"protocols": {"http": {"endpoint": f"127.0.0.1:{otlp_http}"}}}},
        "processors": {"batch": {"timeout": "100ms"}},
        "exporters": {"jaeger_storage_exporter": {"trace_storage": "memstore"}},
    }


@dataclass
class Jaeger:
    process: Process
    otlp_port: int
    query_port: int

    @property
    def traces_endpoint(self) -> str:
        """For OTEL_EXPORTER_OTLP_TRACES_ENDPOINT."""
        return f"http://127.0.0.1:{self.otlp_port}/v1/traces"

    @property
    def query(self) -> str:
        return f"http://127.0.0.1:{self.query_port}"

    def services(self) -> list[str]:
        return httpx.get(f"{self.query}/api/services", timeout=5).raise_for_status().json()["data"] or []

    def traces(self, service: str) -> list[dict[str, Any]]:
        """Every trace holding a span of `service`, as the query API's JSON (Jaeger's model)."""
        answer = httpx.get(f"{self.query}/api/traces", params={"service": service, "limit": 100, "lookback": "1h"},
                           timeout=5)
        if answer.status_code == 404:  # an unknown service
            return []
        return answer.raise_for_status().json()["data"] or []

    def trace(self, trace_id: str) -> dict[str, Any]:
        [found] = httpx.get(f"{self.query}/api/traces/{trace_id}", timeout=5).raise_for_status().json()["data"]
        return found

    def wait_for_traces(self, service: str, spans: int, timeout: float = 20,
                        calls: set[str] | None = None) -> list[dict[str, Any]]:
        """The traces of `service` once they hold at least `spans` spans together (storage is fed by
        a batch, a moment after the export). With `calls`, only the traces holding a span tagged with
        one of those call ids: a dialer of a test also dispatches what earlier tests left queued."""
        deadline = time.monotonic() + timeout
        while True:
            found = [t for t in self.traces(service) if calls is None or _call_ids(t) & calls]
            if sum(len(t["spans"]) for t in found) >= spans or time.monotonic() > deadline:
                return found
            self.process.alive()
            time.sleep(0.1)


def _call_ids(trace: dict[str, Any]) -> set[str]:
    return {tag["value"] for span in trace["spans"] for tag in span["tags"] if tag["key"] == "call_id"}


def _ready(jaeger: Jaeger) -> bool:
    try:
        httpx.get(jaeger.query + "/api/services", timeout=1).raise_for_status()
        # The receiver answers an empty export once its pipeline runs.
        return httpx.post(jaeger.traces_endpoint, content=b"", headers={"Content-Type": "application/x-protobuf"},
                          timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def running(directory: Path) -> Iterator[Jaeger]:
    directory.mkdir(parents=True, exist_ok=True)
    otlp, query, grpc = free_port(), free_port(), free_port()
    path = directory / "jaeger.yaml"
    path.write_text(yaml.safe_dump(config(otlp, query, grpc)))
    process = Process([binary(), "--config", str(path)], directory / "jaeger.log", name="jaeger")
    jaeger = Jaeger(process, otlp, query)
    try:
        process.wait_until(lambda: _ready(jaeger), "jaeger ready", timeout=30)
        yield jaeger
    finally:
        process.stop(timeout=10)
