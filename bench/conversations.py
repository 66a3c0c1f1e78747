"""bench/conversations: how many live conversations one dialer process carries.

The dialer's relay and conversation runtime runs in its own process (`--role dialer`: the dialer's own
`voice` runtime and `relay_server`, on uvloop, as `agent-studio dialer` serves them, on a free
loopback port, with a real nats-server), pinned to one core (os.sched_setaffinity), so its CPU and RSS
are its own. The scripted model (tests/scripted_model.py) runs in another process (`--role model`) and
answers after a first-token delay of --model-ms jittered by ±--jitter, then streams a short reply a
token every --token-ms. This process is Twilio: N WebSockets speaking ConversationRelay
(tests/voice_stack.TwilioRelay), each callee saying something 3-6 s (uniform) after the agent's last
words. The other processes keep off the dialer's core.

Overhead of a turn = the time from its final prompt frame to the first text token at the client,
minus the model's own first-token delay for that request (measured by the model server from reading
the request to writing its first token). Per N (a fresh dialer each): p50/p99 overhead over the turns
prompted within a --seconds window once all N talk, the dialer's CPU as a fraction of one core
(/proc/<pid>/stat), how long its event loop waited for the core behind other processes
(/proc/<pid>/schedstat: the machine is shared), and RSS per conversation ((RSS at N - idle RSS after a warm-up) / N).

    .venv/bin/python bench/conversations.py [--n 50,100] [--seconds 30] [--profile 500]

--profile N records the dialer with py-spy during N's window (bench/results/conversations-<N>.txt,
collapsed stacks, and the top functions by own time in the JSON). Prints JSON and writes
bench/results/conversations.{json,png}. Not a test: nothing asserts on it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import report  # noqa: E402
from latency import summary  # noqa: E402

from agentstudio import bus, calls  # noqa: E402
from agentstudio.callstate import CallState  # noqa: E402

ANSWER = "Sure, happy to help with that."
SAID = "Yes, the OTP never arrived. Can you help me finish?"
LLM_KEY = "sk-test-" + "x" * 24
WARMUP_CALLS = 10
TICKS = os.sysconf("SC_CLK_TCK")


# --- the model's process ----------------------------------------------------------------------------

def run_model(args: argparse.Namespace) -> None:
    """The scripted model: prints its URL, then on each `dump` line on stdin prints the first-token
    delays so far as {turn: seconds} (the turn read from the last user message) and forgets them."""
    from scripted_model import Reply, ScriptedModel

    low, high = args.model_ms * (1 - args.jitter) / 1000, args.model_ms * (1 + args.jitter) / 1000
    script = lambda body: Reply(ANSWER, delay_seconds=random.uniform(low, high),  # noqa: E731
                                token_delay_seconds=args.token_ms / 1000)
    with ScriptedModel(script, api_key=LLM_KEY) as model:
        print(json.dumps({"url": model.url}), flush=True)
        for line in sys.stdin:
            if line.strip() != "dump":
                continue
            with model._lock:
                taken, model.first_tokens[:] = list(model.first_tokens), []
                model.requests.clear()
                model.headers.clear()
                model.clients.clear()
            delays = {}
            for body, seconds in taken:
                said = next((m["content"] for m in reversed(body["messages"]) if m["role"] == "user"), "")
                delays[said.split(":", 1)[0]] = seconds
            print(json.dumps(delays), flush=True)


# --- the dialer's process ---------------------------------------------------------------------------

async def run_dialer(args: argparse.Namespace) -> None:
    """The dialer's voice runtime and relay app, as `agent-studio dialer` builds and serves them."""
    import socket

    from agentstudio.bundle_store import BundleWatcher, buckets
    from agentstudio.dialer import main as dialer_main
    from agentstudio.secrets import StaticSecrets
    from agentstudio.settings import Settings

    os.sched_setaffinity(0, {args.core})
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen(2048)
    port = listening.getsockname()[1]
    settings = Settings(nats_url=args.nats, public_base_url=f"http://127.0.0.1:{port}")
    nc = await bus.connect(args.nats, "bench-dialer")
    watcher = BundleWatcher(await buckets(nc.jetstream()))
    await watcher.start()
    await asyncio.wait_for(watcher.loaded.wait(), 10)
    while args.tenant not in watcher.snapshot.bundles:
        await asyncio.sleep(0.01)
    secrets = StaticSecrets({(args.tenant, "llm-credentials", "api-key"): LLM_KEY})
    runtime = await dialer_main.voice(nc, settings, watcher, secrets)
    server = dialer_main.relay_server(runtime, listening)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    serving = asyncio.create_task(dialer_main.serve_relay(server, runtime, stop))
    while not server.started:
        await asyncio.sleep(0.01)
    print(json.dumps({"port": port}), flush=True)
    await serving
    await watcher.stop()
    await nc.close()


# --- Twilio's side ----------------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def runqueue_seconds(pid: int) -> float:
    """How long the dialer's event loop (its main thread) was runnable but waiting for the core: what
    other processes on the machine took from it."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def started(command: list[str], log: Path, cpus: set[int] | None = None) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """A child process and the JSON line it prints once ready; if it dies first, its stderr."""
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log.open("w"),
                               text=True, cwd=ROOT)
    if cpus:
        os.sched_setaffinity(process.pid, cpus)
    line = process.stdout.readline() if process.stdout else ""
    if not line:
        process.wait(10)
        raise RuntimeError(f"{command[2:4]} exited {process.returncode}: {log.read_text()[-3000:]}")
    return process, json.loads(line)


def stopped(process: subprocess.Popen[str]) -> None:
    process.terminate()
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class Callers:
    """N simulated callees on one dialer, as Twilio would connect them."""

    def __init__(self, js: Any, tracker: Any, tenant: str, relay: str) -> None:
        self.js, self.tracker, self.tenant, self.relay = js, tracker, tenant, relay
        self.stop = asyncio.Event()
        self.window: tuple[float, float] = (float("inf"), float("inf"))
        self.turns: list[tuple[str, float]] = []  # (turn, seconds to the first token), prompted in the window
        self.failures: collections.Counter[str] = collections.Counter()

    async def answered_call(self) -> tuple[calls.CallRequest, str]:
        """A queued call, placed and answered: the record in_progress with its call sid (as
        tests/voice_stack.VoiceStack.answered_call)."""
        from conftest import SEED_BODY

        request = calls.CallRequest(
            call_id=str(uuid.uuid4()), tenant=self.tenant, api_key="bench", workflow_slug=SEED_BODY["workflow_slug"],
            agent_slug=None, phone_number=SEED_BODY["phone_number"], user_id=SEED_BODY["user_id"],
            user_context=SEED_BODY["user_context"], metadata=SEED_BODY["metadata"], test=False,
            created_at=datetime.now(timezone.utc), bundle_version=1,
        )
        await calls.enqueue(self.js, request, timeout=10)
        sid = "CA" + uuid.uuid4().hex
        state = CallState.new(request)
        for status in ("dialing", "ringing", "in_progress"):
            state = state.advanced(status) or state  # type: ignore[arg-type]
        state = state.model_copy(update={"provider": "twilio", "provider_call_id": sid})
        await self.tracker.store.change(self.tenant, request.call_id, lambda _: state)
        return request, sid

    async def callee(self, call: calls.CallRequest, sid: str, connected: asyncio.Event, turns: int | None) -> None:
        from voice_stack import TwilioRelay

        try:
            async with TwilioRelay.connect(self.relay, call, sid) as twilio:
                await twilio.utterance(30)  # the agent's first message
                connected.set()
                said = 0
                while not self.stop.is_set() and (turns is None or said < turns):
                    try:
                        await asyncio.wait_for(self.stop.wait(), random.uniform(3, 6))
                        break
                    except TimeoutError:
                        pass
                    name = f"turn-{uuid.uuid4().hex[:12]}"
                    start = time.perf_counter()
                    await twilio.prompt(f"{name}: {SAID}")
                    while not ((message := await twilio.next(30))["type"] == "text" and message["token"]):
                        pass
                    if self.window[0] <= start < self.window[1]:
                        self.turns.append((name, time.perf_counter() - start))
                    if not message["last"]:
                        await twilio.utterance(30)
                    said += 1
        except Exception as exc:  # noqa: BLE001 - counted and reported: a bench goes on
            self.failures[type(exc).__name__] += 1
            connected.set()


async def active(client: httpx.AsyncClient) -> float:
    text = (await client.get("/metrics")).text
    return next(float(line.split()[1]) for line in text.splitlines()
                if line.startswith("agentstudio_conversations_active "))


async def until_idle(client: httpx.AsyncClient, timeout: float = 120) -> None:
    async with asyncio.timeout(timeout):
        while await active(client):
            await asyncio.sleep(0.2)


async def one_n(args: argparse.Namespace, n: int, nats_url: str, js: Any, tracker: Any, tenant: str,
                model: subprocess.Popen[str], logs: Path) -> dict[str, Any]:
    dialer, ready = started([sys.executable, __file__, "--role", "dialer", "--nats", nats_url, "--tenant", tenant,
                             "--core", str(args.core)], logs / f"dialer-{n}.log")
    pid = dialer.pid
    base = f"http://127.0.0.1:{ready['port']}"
    try:
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            callers = Callers(js, tracker, tenant, base.replace("http://", "ws://") + "/api/v1/relay")
            # Warm up: imports, the model's connection pool, the first template renders.
            warm = [await callers.answered_call() for _ in range(WARMUP_CALLS)]
            await asyncio.gather(*(callers.callee(c, s, asyncio.Event(), turns=1) for c, s in warm))
            await until_idle(http)
            await asyncio.sleep(1)
            idle_rss = rss_mib(pid)
            answered = [await callers.answered_call() for _ in range(n)]
            connected = [asyncio.Event() for _ in answered]
            tasks = []
            for i, ((call, sid), event) in enumerate(zip(answered, connected)):
                tasks.append(asyncio.create_task(callers.callee(call, sid, event, turns=None)))
                if i % args.ramp == args.ramp - 1:
                    await asyncio.sleep(1)
            await asyncio.gather(*(e.wait() for e in connected))
            await asyncio.sleep(6)  # every callee has had its first turn: steady state
            with report.py_spy(pid, report.RESULTS / f"conversations-{n}.txt" if args.profile == n else None, rate=100):
                cpu0, wall0, mine0, wait0 = cpu_seconds(pid), time.monotonic(), time.process_time(), runqueue_seconds(pid)
                callers.window = (time.perf_counter(), time.perf_counter() + args.seconds)
                rss_samples = []
                while time.perf_counter() < callers.window[1]:
                    await asyncio.sleep(1)
                    rss_samples.append(rss_mib(pid))
                cpu1, wall1, mine1, wait1 = cpu_seconds(pid), time.monotonic(), time.process_time(), runqueue_seconds(pid)
            await asyncio.sleep(8)  # the window's last turns get their answers
            callers.stop.set()
            await asyncio.gather(*tasks)
            live_at_end = n - sum(callers.failures.values())
            await until_idle(http)
    finally:
        stopped(dialer)
    assert model.stdin and model.stdout
    model.stdin.write("dump\n")
    model.stdin.flush()
    delays = json.loads(model.stdout.readline())
    overheads = [seconds - delays[name] for name, seconds in callers.turns if name in delays]
    rss = max(rss_samples)
    result: dict[str, Any] = {
        "n": n, "turns": len(overheads), "failed_conversations": dict(callers.failures), "live": live_at_end,
        "overhead": summary(overheads, (90, 99)),
        "prompt_to_first_token": summary([s for _, s in callers.turns], (99,)),
        "model_first_token": summary([delays[name] for name, _ in callers.turns if name in delays], (99,)),
        "dialer_cpu_cores": (cpu1 - cpu0) / (wall1 - wall0),
        "dialer_cpu_ms_per_turn": (cpu1 - cpu0) * 1000 / max(1, len(overheads)),
        "dialer_runqueue_wait_fraction": (wait1 - wait0) / (wall1 - wall0),
        "twilio_side_cpu_cores": (mine1 - mine0) / (wall1 - wall0),
        "idle_rss_mib": idle_rss, "rss_mib": rss, "rss_per_conversation_mib": (rss - idle_rss) / n,
    }
    if args.profile == n:
        result["profile"] = hottest(report.RESULTS / f"conversations-{n}.txt")
    return result


def hottest(collapsed: Path, top: int = 25) -> dict[str, Any]:
    """Share of samples per function, by own time (the stack's leaf) and by inclusive time."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        total += int(count)
        own[frames[-1]] += int(count)
        for frame in set(frames):
            inclusive[frame] += int(count)
    share = lambda c: {f: round(k / total, 4) for f, k in c.most_common(top)}  # noqa: E731
    return {"samples": total, "own": share(own), "inclusive": share(inclusive)}


def plot(result: dict[str, Any]) -> Any:
    plt = report.pyplot()

    curve = result["curve"]
    ns = [r["n"] for r in curve]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.plot(ns, [r["overhead"]["p50_ms"] for r in curve], "o-", label="p50")
    left.plot(ns, [r["overhead"]["p99_ms"] for r in curve], "s-", label="p99")
    left.axhline(20, color="grey", linestyle="--", label="20 ms")
    left.set_xlabel("live conversations on one dialer process (one core)")
    left.set_ylabel("overhead over the model's first-token delay (ms)")
    left.set_yscale("log")
    left.legend()
    right.plot(ns, [r["dialer_cpu_cores"] for r in curve], "o-", color="tab:red", label="CPU (cores)")
    right.plot(ns, [r["dialer_runqueue_wait_fraction"] for r in curve], "o--", color="tab:orange",
               label="waiting for the core")
    right.set_xlabel("live conversations")
    right.set_ylabel("dialer CPU (fraction of one core)")
    right.set_ylim(0, 1)
    other = right.twinx()
    other.plot(ns, [r["rss_per_conversation_mib"] for r in curve], "s-", color="tab:green", label="RSS/conversation")
    other.set_ylabel("RSS per conversation (MiB)")
    other.set_ylim(0, 0.5)
    right.legend(loc="upper left")
    other.legend(loc="lower right")
    fig.suptitle(f"One dialer process: turns every 3-6 s, model first token {result['config']['model_ms']} ms "
                 f"±{result['config']['jitter']:.0%}")
    fig.tight_layout()
    return fig


async def main(args: argparse.Namespace) -> dict[str, Any]:
    from conftest import Tenant
    from voice_stack import HttpTarget, example_manifests, located

    from agentstudio.dialer import main as dialer_main
    from agentstudio.natsserver import NatsServer

    others = set(os.sched_getaffinity(0)) - {args.core}
    if not others:
        raise SystemExit("needs a core besides the dialer's")
    os.sched_setaffinity(0, others)  # this process, and the model and nats-server it starts, keep off it
    report.RESULTS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, NatsServer(Path(tmp) / "nats") as nats:
        logs = Path(tmp)
        model, ready = started([sys.executable, __file__, "--role", "model", "--model-ms", str(args.model_ms),
                                "--jitter", str(args.jitter), "--token-ms", str(args.token_ms)], logs / "model.log")
        nc = await bus.connect(nats.url, "bench")
        try:
            js = nc.jetstream()
            await bus.ensure_calls_stream(js)
            tracker = await dialer_main.tracker_for(nc)
            tenant = Tenant(f"t-{uuid.uuid4().hex[:10]}", js, located(example_manifests(ready["url"], HttpTarget())))
            await tenant.publish()
            curve = []
            for n in args.n:
                curve.append(await one_n(args, n, nats.url, js, tracker, tenant.name, model, logs))
                print(json.dumps(curve[-1]), file=sys.stderr, flush=True)
        finally:
            await nc.close()
            stopped(model)
    within = [r["n"] for r in curve if r["overhead"]["p99_ms"] <= 20]
    return {
        "config": {"model_ms": args.model_ms, "jitter": args.jitter, "token_ms": args.token_ms,
                   "callee_turn_every_s": [3, 6], "window_s": args.seconds, "dialer_core": args.core,
                   "cores": os.cpu_count(), "reply": ANSWER},
        "curve": curve,
        "largest_n_within_20ms_p99": max(within) if within else None,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=lambda s: [int(x) for x in s.split(",")], default=[50, 100],
                        help="conversation counts, comma-separated (the curve: 50,100,250,500,1000)")
    parser.add_argument("--seconds", type=float, default=30, help="measured window at each N")
    parser.add_argument("--model-ms", type=float, default=300)
    parser.add_argument("--jitter", type=float, default=0.2)
    parser.add_argument("--token-ms", type=float, default=20)
    parser.add_argument("--ramp", type=int, default=100, help="conversations opened a second")
    parser.add_argument("--core", type=int, default=0, help="the core the dialer is pinned to")
    parser.add_argument("--profile", type=int, default=None, help="py-spy record the dialer at this N")
    parser.add_argument("--role", choices=["bench", "model", "dialer"], default="bench", help=argparse.SUPPRESS)
    parser.add_argument("--nats", help=argparse.SUPPRESS)
    parser.add_argument("--tenant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "model":
        run_model(args)
    elif args.role == "dialer":
        import uvloop

        uvloop.run(run_dialer(args))  # as `agent-studio dialer` runs
    else:
        result = asyncio.run(main(args))
        report.save("conversations", result, plot)
