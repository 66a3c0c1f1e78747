"""Retries per the call's CallPolicy on a real nats-server with the simulated provider: each attempt
that ends unanswered is retried after its delay, and every webhook, delivered signed to a receiver,
carries the attempt number and the history of attempts."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any

from agentstudio import bus, signing
from agentstudio.concurrency import Concurrency
from test_dialer import queue_call, until_status
from test_webhooks import Receiver, serving, stack, until


def policy(retries: str, voicemail: str = "") -> str:
    return f"""
---
apiVersion: agentstudio.io/v1alpha1
kind: CallPolicy
metadata: {{name: default}}
spec:
  preset: none
  retries: {retries}
{f"  voicemail: {voicemail}" if voicemail else ""}
"""


def at(value: str) -> datetime:
    return datetime.fromisoformat(value)


def data_of(receiver: Receiver, event_type: str) -> list[dict[str, Any]]:
    return [r["event"]["data"] for r in receiver.received if r["type"] == event_type]


async def test_no_answer_then_busy_then_answered_with_the_history_in_call_completed(nats_server, js) -> None:  # type: ignore[no-untyped-def]
    receiver = Receiver(signing.new_secret())
    rules = policy("{maxAttempts: 3, outcomes: [no_answer, busy], delaysSeconds: [1, 2]}")
    async with serving(receiver), stack(nats_server, js, {"results": receiver}, extra=rules) as (client, t):
        call_id = await queue_call(client, t, simulate_outcome="no_answer,busy,completed", simulate_duration_seconds=1)
        await until(lambda: data_of(receiver, "call.completed"), timeout=30)
        record = await until_status(client, t, call_id, "completed")
    [no_answer], [busy], [done] = (data_of(receiver, e) for e in ("call.no_answer", "call.busy", "call.completed"))
    # Each attempt's end is its own event: the ones retried say when the next attempt is due.
    assert (no_answer["status"], no_answer["attempt"], no_answer["will_retry"]) == ("no_answer", 1, True)
    assert (busy["status"], busy["attempt"], busy["will_retry"]) == ("busy", 2, True)
    assert (done["status"], done["attempt"], done["will_retry"]) == ("completed", 3, False)
    assert [a["outcome"] for a in no_answer["attempts"]] == ["no_answer"]
    assert [a["outcome"] for a in busy["attempts"]] == ["no_answer", "busy"]
    history = done["attempts"]
    assert [(a["attempt"], a["outcome"]) for a in history] == [(1, "no_answer"), (2, "busy"), (3, "completed")]
    assert history[2]["duration_seconds"] == 1 == done["duration_seconds"]
    assert len({a["provider_call_id"] for a in history}) == 3  # a new provider call per attempt
    # The delays are respected: each next attempt is due its delay after the end, and began no earlier.
    for attempt, delay in ((history[0], 1), (history[1], 2)):
        due = at(attempt["next_attempt_at"])
        assert due >= at(attempt["ended_at"]) + timedelta(seconds=delay)
    assert at(history[1]["started_at"]) >= at(history[0]["next_attempt_at"])
    assert at(history[2]["started_at"]) >= at(history[1]["next_attempt_at"])
    assert at(no_answer["next_attempt_at"]) == at(history[0]["next_attempt_at"])
    # Event ids are JetStream's de-duplication ids: one per attempt and type.
    assert len({r["id"] for r in receiver.received}) == len(receiver.received)
    answered = data_of(receiver, "call.answered")
    assert [a["attempt"] for a in answered] == [3] and [a["outcome"] for a in answered[0]["attempts"]] == ["no_answer", "busy"]
    # The call record tells the same story.
    assert record["attempt"] == 3 and [a["outcome"] for a in record["attempts"]] == ["no_answer", "busy", "completed"]
    assert record["next_attempt_at"] is None


async def test_a_call_waiting_for_its_retry_is_scheduled_and_max_attempts_ends_it_with_call_failed(nats_server, js) -> None:  # type: ignore[no-untyped-def]
    receiver = Receiver(signing.new_secret())
    rules = policy("{maxAttempts: 2, outcomes: [no_answer, failed], delaysSeconds: [5]}")
    async with serving(receiver), stack(nats_server, js, {"results": receiver}, extra=rules) as (client, t):
        call_id = await queue_call(client, t, simulate_outcome="failed")
        await until(lambda: data_of(receiver, "call.failed"), timeout=20)
        waiting = (await client.get(f"/api/v1/calls/{call_id}", headers=t.auth("test"))).json()
        listed = (await client.get("/api/v1/calls?status=scheduled", headers=t.auth("test"))).json()
        holders = await Concurrency(await bus.concurrency_bucket(js)).holders(t.name)
        await until(lambda: len(data_of(receiver, "call.failed")) == 2, timeout=30)
        record = await until_status(client, t, call_id, "failed")
    # Between attempts the call waits as a scheduled call does, for the time its retry is due.
    assert waiting["status"] == "scheduled" and waiting["attempt"] == 2
    assert at(waiting["scheduled_for"]) == at(waiting["next_attempt_at"])
    assert [a["outcome"] for a in waiting["attempts"]] == ["failed"]
    assert call_id not in holders  # its tenant slot is free for other calls while it waits
    # The listing says so too (it reads the message the call was accepted with).
    assert [(c["call_id"], c["status"], c["scheduled_for"]) for c in listed["data"]] == \
        [(call_id, "scheduled", waiting["next_attempt_at"])]
    first, last = sorted(data_of(receiver, "call.failed"), key=lambda d: d["attempt"])
    assert first["will_retry"] is True and first["error"]["code"] == "simulated_failure"
    assert last["will_retry"] is False and last["attempt"] == 2  # maxAttempts: the end, though failed is retried
    assert [(a["outcome"], a["error"]["code"]) for a in last["attempts"]] == [("failed", "simulated_failure")] * 2
    assert record["attempt"] == 2 and record["error"]["code"] == "simulated_failure"
    assert [e["status"] for e in record["events"]] == ["pending", "dialing", "ringing", "failed",
                                                       "pending", "dialing", "ringing", "failed"]


async def test_an_outcome_the_policy_does_not_retry_ends_the_call_at_once(nats_server, js) -> None:  # type: ignore[no-untyped-def]
    receiver = Receiver(signing.new_secret())
    rules = policy("{maxAttempts: 3, outcomes: [no_answer], delaysSeconds: [1]}")
    async with serving(receiver), stack(nats_server, js, {"results": receiver}, extra=rules) as (client, t):
        call_id = await queue_call(client, t, simulate_outcome="busy")
        record = await until_status(client, t, call_id, "busy")
        await until(lambda: data_of(receiver, "call.busy"))
    [busy] = data_of(receiver, "call.busy")
    assert busy["will_retry"] is False and busy["attempt"] == 1 and [a["outcome"] for a in busy["attempts"]] == ["busy"]
    assert record["attempt"] == 1 and len(record["attempts"]) == 1


async def test_a_call_waiting_for_its_retry_can_be_canceled_and_is_never_dialed_again(nats_server, js) -> None:  # type: ignore[no-untyped-def]
    receiver = Receiver(signing.new_secret())
    rules = policy("{maxAttempts: 3, outcomes: [no_answer], delaysSeconds: [2]}")
    async with serving(receiver), stack(nats_server, js, {"results": receiver}, extra=rules) as (client, t):
        call_id = await queue_call(client, t, simulate_outcome="no_answer")
        await until(lambda: data_of(receiver, "call.no_answer"))
        resp = await client.post(f"/api/v1/calls/{call_id}/cancel", headers=t.auth("test"))
        await until(lambda: data_of(receiver, "call.canceled"))
        due = at(data_of(receiver, "call.no_answer")[0]["next_attempt_at"])
        # Past the time the retry was due: its message came and went, and nothing was dialed.
        while datetime.now(due.tzinfo) < due + timedelta(seconds=2):
            await asyncio.sleep(0.1)
        record = (await client.get(f"/api/v1/calls/{call_id}", headers=t.auth("test"))).json()
    assert resp.status_code == 200, resp.text
    assert record["status"] == "canceled" and record["attempt"] == 2
    assert [e["status"] for e in record["events"]] == ["pending", "dialing", "ringing", "no_answer", "pending", "canceled"]
    [canceled] = data_of(receiver, "call.canceled")
    # The waiting attempt ends canceled, never placed.
    assert canceled["attempt"] == 2 and [a["outcome"] for a in canceled["attempts"]] == ["no_answer", "canceled"]
    assert canceled["attempts"][1]["provider_call_id"] is None and canceled["will_retry"] is False
    assert len(data_of(receiver, "call.no_answer")) == 1


async def test_a_redelivered_message_of_an_earlier_attempt_does_not_dial_the_retry_early(nats_server, js) -> None:  # type: ignore[no-untyped-def]
    """A dialer that placed attempt 1 and died before its ack leaves that message to be redelivered,
    maybe after the attempt ended and was retried: the retry must still wait for its own time."""
    from agentstudio import calls

    receiver = Receiver(signing.new_secret())
    rules = policy("{maxAttempts: 2, outcomes: [no_answer], delaysSeconds: [3]}")
    async with serving(receiver), stack(nats_server, js, {"results": receiver}, extra=rules) as (client, t):
        call_id = await queue_call(client, t, simulate_outcome="no_answer,completed", simulate_duration_seconds=0.1)
        await until(lambda: data_of(receiver, "call.no_answer"))
        first = await calls.fetch(js, t.name, call_id)
        assert first is not None and first.scheduled_for is not None  # the retry, queued for its time
        await js.publish(bus.dispatch_subject(t.name, call_id), calls.encode(first.model_copy(update={"scheduled_for": None})),
                         headers={"Nats-Msg-Id": f"{call_id}-redelivered"})
        await until(lambda: data_of(receiver, "call.completed"), timeout=20)
    [done] = data_of(receiver, "call.completed")
    history = done["attempts"]
    assert [a["outcome"] for a in history] == ["no_answer", "completed"]
    assert at(history[1]["started_at"]) >= at(history[0]["next_attempt_at"])
