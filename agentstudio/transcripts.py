"""A call's transcript in its own stream (TRANSCRIPTS, a subject per attempt of the call), so a call of
hours never makes its record pass the 1 MiB a NATS message may carry: the record keeps only the
number of turns (`CallState.transcript_turns`), and every write of it stays small.

A message is a chunk: turns from position `start` on. Turns are written as they come;
one changed after it was written (an agent message cut short by barge-in) is written again in a later
chunk from its position, so the reader lays the chunks over each other in stream order. Once the
conversation has closed, its whole transcript is written again from position 0 and the chunks before
it are purged: a call of hours is read back from a few messages instead of one per turn.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from agentstudio import bus
from agentstudio.callstate import CallState

# A chunk stays well under the server's 1 MiB max_payload however many turns a write carries (many
# pile up while NATS is away).
CHUNK_BYTES = 256 * 1024
# What a status event carries of a transcript: the event and each subscription's delivery are
# messages too. Past it, the last turns that fit are sent, marked truncated; the API has the whole.
EVENT_TRANSCRIPT_BYTES = 256 * 1024
_FETCH_BATCH = 512
_FETCH_TIMEOUT = 5.0


async def append(js: JetStreamContext, tenant: str, call_id: str, attempt: int, start: int,
                 turns: list[dict[str, Any]]) -> int:
    """Write `turns` as positions start, start + 1, … of the attempt's transcript, in chunks under
    CHUNK_BYTES; returns how many. A chunk's id is its content: written again after a failed ack, it
    is stored once."""
    pieces: list[tuple[int, list[bytes]]] = [(start, [])]
    size = 0
    for i, turn in enumerate(turns):
        encoded = orjson.dumps(turn)
        if pieces[-1][1] and size + len(encoded) > CHUNK_BYTES:
            pieces.append((start + i, []))
            size = 0
        pieces[-1][1].append(encoded)
        size += len(encoded) + 1
    for first, encoded_turns in pieces:
        body = b'{"attempt":%d,"start":%d,"turns":[%s]}' % (attempt, first, b",".join(encoded_turns))
        msg_id = f"{call_id}.{attempt}.{first}.{hashlib.sha256(body).hexdigest()[:24]}"
        await js.publish(bus.transcript_subject(tenant, call_id, attempt), body, headers={"Nats-Msg-Id": msg_id})
    return len(pieces)


async def compact(js: JetStreamContext, tenant: str, call_id: str, attempt: int, turns: list[dict[str, Any]]) -> None:
    """The attempt's conversation has closed with `turns`: write them whole, then purge every chunk
    before (a reader meanwhile still ends on the whole)."""
    kept = await append(js, tenant, call_id, attempt, 0, turns)
    await js.purge_stream(bus.TRANSCRIPTS_STREAM, subject=bus.transcript_subject(tenant, call_id, attempt), keep=kept)


async def read(js: JetStreamContext, tenant: str, call_id: str, attempt: int) -> list[dict[str, Any]]:
    """The attempt's transcript as its chunks left it: one ephemeral consumer on its subject."""
    try:
        info = await js.add_consumer(bus.TRANSCRIPTS_STREAM, ConsumerConfig(
            filter_subject=bus.transcript_subject(tenant, call_id, attempt),
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.NONE,
            mem_storage=True,
            num_replicas=1,
            inactive_threshold=30.0,
        ))
    except NotFoundError:
        return []  # no call has had a conversation yet
    turns: list[dict[str, Any]] = []
    try:
        pending = int(info.num_pending or 0)
        if pending == 0:
            return turns
        sub = await js.pull_subscribe_bind(stream=bus.TRANSCRIPTS_STREAM, consumer=info.name)
        try:
            while pending > 0:
                # No more than is pending: a fetch for more would wait out its timeout.
                for msg in await sub.fetch(min(pending, _FETCH_BATCH), timeout=_FETCH_TIMEOUT):
                    pending = msg.metadata.num_pending
                    chunk = orjson.loads(msg.data)
                    start = chunk["start"]
                    if start > len(turns):
                        raise ValueError(f"transcript of {call_id}: a chunk at {start} after {len(turns)} turns")
                    turns[start:start + len(chunk["turns"])] = chunk["turns"]
        finally:
            await sub.unsubscribe()
    finally:
        await js.delete_consumer(bus.TRANSCRIPTS_STREAM, info.name)
    return turns


async def filled(js: JetStreamContext, state: CallState | None) -> CallState | None:
    """The record with its transcript read in, as far as the record counts it (a chunk written after
    the record's last write is not yet part of it). A record written before transcripts had their
    own stream carries its transcript itself."""
    if state is None or state.transcript_turns == 0:
        return state
    turns = await _whole_in_last(js, state) or await read(js, state.tenant, state.call_id, state.attempt)
    return state.model_copy(update={"transcript": turns[:state.transcript_turns]})


async def _whole_in_last(js: JetStreamContext, state: CallState) -> list[dict[str, Any]] | None:
    """The transcript from one direct get when its last chunk holds all of it, as a closed call's
    compaction leaves it (unless it passed CHUNK_BYTES): a listing page of finished calls reads one
    message per call instead of opening a consumer per call."""
    try:
        msg = await js.get_last_msg(bus.TRANSCRIPTS_STREAM, bus.transcript_subject(state.tenant, state.call_id,
                                                                                   state.attempt), direct=True)
    except NotFoundError:
        return None
    chunk = orjson.loads(msg.data)
    if chunk["start"] != 0 or len(chunk["turns"]) < state.transcript_turns:
        return None
    return chunk["turns"]


def for_event(turns: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """What a status event carries of `turns`, and how many of the first turns it leaves out: all of
    them while they fit EVENT_TRANSCRIPT_BYTES, else the last that fit (how the call ended)."""
    size = len(orjson.dumps(turns))
    if size <= EVENT_TRANSCRIPT_BYTES:
        return turns, 0
    kept, size = 0, 2
    for turn in reversed(turns):
        size += len(orjson.dumps(turn)) + 1
        if size > EVENT_TRANSCRIPT_BYTES:
            break
        kept += 1
    return turns[len(turns) - kept:], len(turns) - kept
