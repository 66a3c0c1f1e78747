"""bench/voice: our own latency in a voice turn — from a final `prompt` frame to the first `text` token
the Twilio side receives — against the model call alone, both measured in this run on the same
scripted model server (tests/scripted_model.py), which answers at once with a short reply.

1. ours: the examples' agent served on the real relay WebSocket (tests/voice_stack.py); a Twilio-like
   client sends a final prompt and times until the first text frame with a non-empty token, then reads
   the rest of the utterance up to last=true before the next prompt. Turns follow each other at once,
   so the silence timer (15 s) never fires. A new call starts every --turns-per-call turns, because the
   history the model is sent grows by two messages a turn; the first --warmup turns are not counted.
2. baseline, ChatModel: the same request body as the conversation sent (one captured from the middle
   of a call, so of typical size) streamed through agentstudio.conversation.llm.ChatModel, timed to its
   first TextDelta — what the conversation itself waits for, so ours minus this is the relay and the
   conversation (WebSocket in and out, turns, the call record's writes).
3. baseline, raw: the same body POSTed with httpx, timed to the first SSE chunk with non-empty content.

Ours spans every history length of a call (3 to 2 * turns-per-call + 3 messages) while the baselines
send one mid-call body, so the p50s compare like with like and the p99 of ours also holds the longest
histories; the p50 of the first and last tenth of each call's turns shows what history costs.

    .venv/bin/python bench/voice.py [--turns 300] [--turns-per-call 50] [--warmup 20]

Prints JSON and writes bench/results/voice.json. Not a test: nothing asserts on it.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from scripted_model import Reply, ScriptedModel  # noqa: E402
from voice_stack import LLM_KEY, TwilioRelay, VoiceStack, voice_stack  # noqa: E402

from latency import summary  # noqa: E402
import report  # noqa: E402

from agentstudio import bus  # noqa: E402
from agentstudio.conversation.llm import ChatModel, Endpoint, TextDelta  # noqa: E402
from agentstudio.natsserver import NatsServer  # noqa: E402

ANSWER = "Sure, happy to help with that."
SAID = "Yes, the OTP never arrived. Can you help me finish?"


async def turns(stack: VoiceStack, count: int, per_call: int) -> tuple[list[tuple[int, float]], dict[str, Any]]:
    """`count` timed turns over calls of `per_call` turns each, as (turn in its call, seconds); and a
    request body from mid-call."""
    latencies: list[tuple[int, float]] = []
    sample: dict[str, Any] | None = None
    while len(latencies) < count:
        call, sid = await stack.answered_call()
        async with TwilioRelay.connect(stack.relay, call, sid) as twilio:
            await twilio.utterance()  # the first message, spoken on answer before any prompt
            for i in range(min(per_call, count - len(latencies))):
                start = time.perf_counter()
                await twilio.prompt(SAID)
                while not ((message := await twilio.next())["type"] == "text" and message["token"]):
                    pass
                latencies.append((i, time.perf_counter() - start))
                if not message["last"]:
                    await twilio.utterance()
                if i == per_call // 2 and sample is None:
                    sample = stack.model.requests[-1]
        await stack.closed_record(call.call_id)
    return latencies, sample or {}


async def through_chat_model(model: ScriptedModel, body: dict[str, Any], count: int) -> list[float]:
    endpoint = Endpoint(base_url=model.url, model=body["model"], api_key=LLM_KEY,
                        temperature=body.get("temperature", 0.3), max_tokens=body.get("max_tokens", 512))
    chat = ChatModel(timeout_seconds=10)
    latencies = []
    try:
        for _ in range(count):
            start, first = time.perf_counter(), None
            async for event in chat.stream(endpoint, body["messages"], body.get("tools", [])):
                if first is None and isinstance(event, TextDelta):
                    first = time.perf_counter()
            assert first is not None
            latencies.append(first - start)
    finally:
        await chat.aclose()
    return latencies


async def raw_httpx(model: ScriptedModel, body: dict[str, Any], count: int) -> list[float]:
    latencies = []
    headers = {"Authorization": f"Bearer {LLM_KEY}"}
    async with httpx.AsyncClient(timeout=10) as client:
        for _ in range(count):
            start, first = time.perf_counter(), None
            async with client.stream("POST", f"{model.url}/chat/completions", json={**body, "stream": True},
                                     headers=headers) as response:
                async for line in response.aiter_lines():
                    if first is None and line.startswith("data: {"):
                        if any(c["delta"].get("content") for c in orjson.loads(line[6:])["choices"]):
                            first = time.perf_counter()
            assert first is not None
            latencies.append(first - start)
    return latencies


def versus(ours: dict[str, Any], base: dict[str, Any]) -> dict[str, float]:
    return {"overhead_p50_ms": ours["p50_ms"] - base["p50_ms"], "overhead_p99_ms": ours["p99_ms"] - base["p99_ms"],
            "ratio_p50": ours["p50_ms"] / base["p50_ms"], "ratio_p99": ours["p99_ms"] / base["p99_ms"]}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp, NatsServer(Path(tmp) / "nats") as nats:
        nc = await bus.connect(nats.url, "bench")
        js = nc.jetstream()
        await bus.ensure_calls_stream(js)
        async with voice_stack(nats.url, js) as stack:
            stack.model.script(lambda request: Reply(ANSWER))
            await turns(stack, args.warmup, args.turns_per_call)
            latencies, body = await turns(stack, args.turns, args.turns_per_call)
            if not body:
                raise SystemExit("--turns must cover at least half of --turns-per-call to capture a request")
            await through_chat_model(stack.model, body, args.warmup)
            chat = await through_chat_model(stack.model, body, args.turns)
            await raw_httpx(stack.model, body, args.warmup)
            raw = await raw_httpx(stack.model, body, args.turns)
        await nc.close()
    ours, base, floor = (summary(s, (90, 99)) for s in ([s for _, s in latencies], chat, raw))
    tenth = max(1, args.turns_per_call // 10)
    early = [s for i, s in latencies if i < tenth]
    late = [s for i, s in latencies if i >= args.turns_per_call - tenth]
    return {
        "prompt_to_first_token": {**ours, "calls": -(-args.turns // args.turns_per_call),
                                  "turns_per_call": args.turns_per_call},
        # How much a longer history costs: the first and the last tenth of each call's turns.
        f"p50_ms_first_{tenth}_turns_of_a_call": statistics.median(early) * 1000,
        f"p50_ms_last_{tenth}_turns_of_a_call": statistics.median(late) * 1000 if late else None,
        "baseline_chat_model_first_delta": base,
        "baseline_raw_httpx_first_delta": floor,
        "request_messages": len(body["messages"]), "request_bytes": len(orjson.dumps(body)),
        "vs_chat_model": versus(ours, base),
        "vs_raw_httpx": versus(ours, floor),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=300)
    parser.add_argument("--turns-per-call", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=20)
    result = asyncio.run(main(parser.parse_args()))
    report.save("voice", result)
