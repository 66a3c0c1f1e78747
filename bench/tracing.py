"""bench/tracing: what tracing costs, on against off in the same run, with the spans exported over
OTLP/HTTP to a real Jaeger (scripts/build-jaeger, in-memory storage) on this machine.

1. ingest: the maximum rate of POST /api/v1/webhooks/ingest (bench/ingest.py's load generator,
   bodies and tenant) of two `agent-studio ingest` processes, one worker each, on the same NATS: one
   without OTEL_* variables (tracing off: no SDK loaded, no middleware) and one exporting to Jaeger
   (a server span and a publish span a request), and a third exporting one request in ten
   (OTEL_TRACES_SAMPLER=parentbased_traceidratio, 0.1). Measured off, on, sampled, off again, so a
   machine whose load drifts shows it as a difference between the two offs.
2. voice: bench/voice.py's turns (a final prompt to the first text token, on the real relay with the
   scripted model), off then on then off in one process (on: a turn span and a model request span
   a turn, each exported).
3. outbound: what the traceparent costs a request to another system (a webhook's, a tool's, a
   model's headers): `tracing.outgoing` on a request's headers inside a span, with tracing off, on
   with AGENTSTUDIO_TRACE_OUTBOUND=false and on, in µs a request; the off run is the baseline.

    .venv/bin/python bench/tracing.py [--seconds 5] [--connections 32] [--turns 200]

Prints JSON with the ratios (on / mean of the two offs) and writes bench/results/tracing.json.
Not a test: nothing asserts on it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

import report  # noqa: E402
from ingest import measure, publish_tenant, serve  # noqa: E402
from jaeger import Jaeger, running  # noqa: E402
from latency import summary  # noqa: E402
from scripted_model import Reply  # noqa: E402
from voice import ANSWER, turns  # noqa: E402
from voice_stack import voice_stack  # noqa: E402

from agentstudio import bus, keys, tracing  # noqa: E402
from agentstudio.natsserver import NatsServer, free_port  # noqa: E402

def ingest_rates(args: argparse.Namespace, nats: NatsServer, jaeger: Jaeger, tmp: Path) -> dict[str, Any]:
    key = keys.generate("live")
    headers = {"Authorization": f"Bearer {key}"}
    asyncio.run(publish_tenant(nats.url, key))
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    servers: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
    on = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": jaeger.traces_endpoint, "OTEL_SERVICE_NAME": "bench-ingest"}
    tenth = {**on, "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"}
    for name, otel in (("off", {}), ("on", on), ("on_sampled_10pct", tenth)):
        port = free_port()
        env = {**clean, **otel, "AGENTSTUDIO_NATS_URL": nats.url, "AGENTSTUDIO_HOST": "127.0.0.1",
               "AGENTSTUDIO_PORT": str(port), "AGENTSTUDIO_LOG_LEVEL": "WARNING"}
        proc = serve([str(Path(sys.executable).parent / "agent-studio"), "ingest", "--workers", "1"], env,
                     f"http://127.0.0.1:{port}/readyz", tmp / f"ingest-{name}.log")
        servers[name] = proc, f"http://127.0.0.1:{port}/api/v1/webhooks/ingest"
    assert nats.proc is not None
    try:
        rates = {}
        for run in ("off", "on", "on_sampled_10pct", "off_again"):
            proc, url = servers[run.removesuffix("_again")]
            rates[run] = measure(f"ingest tracing {run}", url, headers, args.seconds, args.connections, proc.pid,
                                 nats.proc.pid, None)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=30)
    exported = len(jaeger.traces("bench-ingest"))  # the query answers 100 at most: proof, not a count
    off = (rates["off"]["max"].rate + rates["off_again"]["max"].rate) / 2
    return {
        "requests_per_second": {run: round(r["max"].rate, 1) for run, r in rates.items()},
        "p99_ms": {run: round(r["max"].p99_ms, 2) for run, r in rates.items()},
        "server_us_per_request": {run: r["cores"]["server_us_per_request"] for run, r in rates.items()},
        "ratio_on_vs_off": rates["on"]["max"].rate / off,
        "ratio_on_sampled_10pct_vs_off": rates["on_sampled_10pct"]["max"].rate / off,
        "traces_seen_in_jaeger": exported,
    }


async def voice_turns(args: argparse.Namespace, nats: NatsServer, jaeger: Jaeger) -> dict[str, Any]:
    nc = await bus.connect(nats.url, "bench")
    js = nc.jetstream()
    await bus.ensure_calls_stream(js)
    runs: dict[str, dict[str, float]] = {}
    try:
        async with voice_stack(nats.url, js) as stack:
            stack.model.script(lambda request: Reply(ANSWER))
            await turns(stack, args.warmup, args.turns_per_call)
            for run in ("off", "on", "off_again"):
                if run == "on":  # the SDK reads its settings from the environment
                    os.environ |= {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": jaeger.traces_endpoint,
                                   "OTEL_SERVICE_NAME": "bench-voice"}
                    assert tracing.setup("voice")
                    await turns(stack, args.warmup, args.turns_per_call)
                latencies, _ = await turns(stack, args.turns, args.turns_per_call)
                runs[run] = summary([s for _, s in latencies], (90, 99))
                if run == "on":
                    tracing.shutdown()  # exports what is left
    finally:
        tracing.shutdown()
        await nc.close()
    off = {p: (runs["off"][p] + runs["off_again"][p]) / 2 for p in runs["off"]}
    return {
        "prompt_to_first_token": runs,
        "overhead_p50_ms": runs["on"]["p50_ms"] - off["p50_ms"],
        "overhead_p99_ms": runs["on"]["p99_ms"] - off["p99_ms"],
        "ratio_p50": runs["on"]["p50_ms"] / off["p50_ms"],
        "ratio_p99": runs["on"]["p99_ms"] / off["p99_ms"],
        "traces_seen_in_jaeger": len(jaeger.traces("bench-voice")),
    }


def outbound_headers(requests: int = 200_000) -> dict[str, Any]:
    """µs that `tracing.outgoing` adds to one request's headers (the webhook's own, as signed)."""
    signed = {"webhook-id": "msg_1", "webhook-timestamp": "1764547200", "webhook-signature": "v1," + "A" * 44,
              "content-type": "application/json"}
    # Not sampled, so nothing is exported: the traceparent is written the same (its flags say so).
    otel = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:9/v1/traces",
            "OTEL_SERVICE_NAME": "bench-outbound", "OTEL_TRACES_SAMPLER": "always_off"}
    os.environ |= otel
    us: dict[str, float] = {}
    try:
        for run, outbound in (("off", None), ("on_outbound_off", False), ("on", True), ("off_again", None)):
            if outbound is not None:
                assert tracing.setup("bench", outbound=outbound)
            with tracing.span("webhook deliver"):
                started = time.perf_counter()
                for _ in range(requests):
                    tracing.outgoing(dict(signed))
                us[run] = (time.perf_counter() - started) / requests * 1e6
            tracing.shutdown()
    finally:
        for name in otel:
            os.environ.pop(name)
    off = (us["off"] + us["off_again"]) / 2
    return {"requests": requests, "us_per_request": {run: round(v, 3) for run, v in us.items()},
            "added_us_on_vs_off": round(us["on"] - off, 3),
            "added_us_outbound_off_vs_off": round(us["on_outbound_off"] - off, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--turns", type=int, default=200)
    parser.add_argument("--turns-per-call", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, NatsServer(Path(tmp) / "nats") as nats, \
            running(Path(tmp) / "jaeger") as jaeger:
        out = {
            "seconds": args.seconds, "connections": args.connections, "turns": args.turns,
            "ingest": ingest_rates(args, nats, jaeger, Path(tmp)),
            "voice": asyncio.run(voice_turns(args, nats, jaeger)),
            "outbound": outbound_headers(),
        }
    report.save("tracing", out)


if __name__ == "__main__":
    main()
