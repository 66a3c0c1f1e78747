"""A four-hour conversation: its transcript is bigger than a NATS message may be, and the call is still
recorded, read back whole through the API and its export, and reported to a webhook receiver."""

from __future__ import annotations

import asyncio
import random
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson
from nats.js import JetStreamContext

from agentstudio import bus, signing, transcripts
from agentstudio.callstate import CallEvent, CallState
from agentstudio.conversation.record import CallRecorder
from agentstudio.conversation.transcript import Turn
from agentstudio.dialer import main as dialer_main
from agentstudio.natsserver import NatsServer
from test_dialer import queue_call
from test_webhooks import Receiver, serving, stack, until

HOURS = 4
TURN_EVERY_SECONDS = 5
WORDS = ("the plan covers your first month and then renews at the usual price unless you cancel before "
         "the date on your email I can send the link again or book a call with our coach tomorrow").split()


def say(rng: random.Random, low: int, high: int) -> str:
    """Speech of about low..high characters."""
    size, words = rng.randint(low, high), []
    while sum(len(w) + 1 for w in words) < size:
        words.append(rng.choice(WORDS))
    return " ".join(words).capitalize() + "."


def four_hours_of_turns(start: datetime) -> list[Turn]:
    """A turn every 5 s: the agent (a few sentences) and the callee take turns, and every tenth turn
    the agent calls an api_call tool whose result the transcript keeps (status and up to 500 chars)."""
    rng = random.Random(15)
    turns = []
    for i in range(HOURS * 3600 // TURN_EVERY_SECONDS):
        at = start + timedelta(seconds=i * TURN_EVERY_SECONDS)
        if i % 10 == 9:
            turns.append(Turn(kind="tool", at=at, agent="support", tool="crm_lookup",
                              arguments={"user_id": "user-123", "question": say(rng, 20, 80)},
                              result={"status": 200, "body": say(rng, 300, 500)}, elapsed_ms=rng.randint(80, 900)))
        elif i % 2 == 0:
            turns.append(Turn(kind="message", at=at, agent="support", speaker="agent", text=say(rng, 100, 600)))
        else:
            turns.append(Turn(kind="message", at=at, agent="support", speaker="callee", text=say(rng, 20, 240)))
    return turns


async def test_a_four_hour_call_is_recorded_read_back_whole_and_reported(nats_server: NatsServer, js: JetStreamContext) -> None:  # type: ignore[no-untyped-def]
    receiver = Receiver(signing.new_secret())
    async with serving(receiver), stack(nats_server, js, {"results": receiver}, dialing=False) as (client, t):
        call_id = await queue_call(client, t)
        tracker = await dialer_main.tracker_for(js._nc)  # noqa: SLF001 - the voice runtime's own
        started = datetime.now(timezone.utc) - timedelta(hours=HOURS)
        await tracker.store.change(t.name, call_id, lambda s: CallState(
            call_id=call_id, tenant=t.name, test=True, status="in_progress", provider="simulated",
            provider_call_id="sim-long", answered_at=started, events=[CallEvent(status="in_progress", at=started)]))

        recorder = CallRecorder(tracker, t.name, call_id)
        assert await recorder.open() is not None
        said: list[Turn] = []
        for i, turn in enumerate(four_hours_of_turns(started)):
            said.append(turn)
            recorder.update(said, {}, None)
            await asyncio.sleep(0.002)  # the writer runs between turns (5 s apart on a call)
            if i == 1500:  # barge-in: the agent's last message, already written, was cut short
                last = next(x for x in reversed(said) if x.speaker == "agent")
                last.text, last.interrupted = last.text[:40], True
                recorder.update(said, {}, None)
            if i == 1600:  # read mid-call: the chunks so far, laid over each other, the cut one rewritten
                async with asyncio.timeout(10):  # a write waits a second for the rest of its turn
                    while len(midway := (await client.get(f"/api/v1/calls/{call_id}",
                                                          headers=t.auth("test"))).json()["transcript"]) <= 1500:
                        await asyncio.sleep(0.2)
                assert midway == [x.record() for x in said[:len(midway)]]
                assert sum(1 for x in midway if x.get("interrupted")) == 1
        said.append(Turn(kind="end", at=started + timedelta(hours=HOURS), agent="support", reason="callee_hangup"))
        recorder.update(said, {"crm_lookup": {"done": True}}, "callee_hangup")
        # The provider's end comes while the agent still talks: the event waits for the transcript.
        await tracker.advance(t.name, call_id, "completed", duration_seconds=HOURS * 3600)
        assert await recorder.close() is not None

        whole = [x.record() for x in said]
        size = len(orjson.dumps(whole))
        assert size > 1024 * 1024, size  # more than one NATS message may carry (max_payload 1 MiB)
        stored = await (await bus.calls_bucket(js)).get(f"{t.name}.{call_id}")
        assert len(stored.value or b"") < 64 * 1024  # the record counts the turns; they are elsewhere
        assert CallState.model_validate_json(stored.value).transcript_turns == len(whole)
        chunks = await js.stream_info(bus.TRANSCRIPTS_STREAM, subjects_filter=bus.transcript_subject(t.name, call_id, 1))
        print(f"transcript {size} bytes in {len(whole)} turns, {sum(chunks.state.subjects.values())} chunks; "
              f"record {len(stored.value)} bytes")

        began = asyncio.get_running_loop().time()
        record = (await client.get(f"/api/v1/calls/{call_id}", headers=t.auth("test"))).json()
        print(f"read back through the API in {asyncio.get_running_loop().time() - began:.2f} s")  # a figure, not a check
        assert record["status"] == "completed" and record["end_reason"] == "callee_hangup"
        assert record["transcript"] == whole  # every turn, the cut-short one as the callee heard it
        assert sum(1 for x in record["transcript"] if x.get("interrupted")) == 1
        export = await client.get("/api/v1/calls/export", params={"format": "jsonl"}, headers=t.auth("test"))
        [exported] = [orjson.loads(line) for line in export.text.splitlines() if call_id in line]
        assert exported["transcript"] == whole

        await until(lambda: any(r["type"] == "call.completed" for r in receiver.received), timeout=30)
    [completed] = [r["event"] for r in receiver.received if r["type"] == "call.completed"]
    data: dict[str, Any] = completed["data"]
    assert data["transcript_truncated"] is True
    sent = data["transcript"]
    assert data["transcript_omitted_turns"] + len(sent) == len(whole)
    assert sent == whole[-len(sent):] and sent[-1]["kind"] == "end"  # how the call ended is always there
    assert len(orjson.dumps(sent)) <= transcripts.EVENT_TRANSCRIPT_BYTES
    assert data["captured"] == {"crm_lookup": {"done": True}} and data["duration_seconds"] == HOURS * 3600

