"""Writing a conversation into its call record while it runs: the transcript, what was captured and
why it ended, by compare-and-set like every other write to the record. Writes coalesce (the latest
state wins) so a burst of turns costs one write, and the talking never waits for NATS.

The turns go to the call's transcript stream first (only those new or changed since the last write),
then the record counts them: a reader never counts a turn that is not there, and a call of hours
writes a few hundred bytes a turn instead of its whole transcript each time.

A change waits WRITE_DELAY_SECONDS for the rest of its turn before it is written, so a turn (the
callee's words, the reply starting, its last words) is one write, not three: what a dialer's crash
loses of a conversation is at most that last second of it, besides the write in flight."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from nats.errors import Error as NatsError

from agentstudio import transcripts
from agentstudio.callstate import CallState
from agentstudio.conversation.transcript import Turn
from agentstudio.tracking import CallTracker

log = logging.getLogger("agentstudio.conversation")

# Turns already written that each write looks at again: barge-in changes the agent message said last.
REWRITE_TAIL = 16
# Longer than a reply takes to start and stream after the callee's words, shorter than the callee's
# next words take to come (3-6 s).
WRITE_DELAY_SECONDS = 1.0


class CallRecorder:
    def __init__(self, tracker: CallTracker, tenant: str, call_id: str) -> None:
        self.tracker = tracker
        self.tenant = tenant
        self.call_id = call_id
        self._latest: tuple[list[Turn], dict[str, Any], str | None] | None = None
        self._dirty = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self._close = asyncio.Event()  # wakes the writer from its delay to leave the last write to close()
        self._attempt = 1  # the attempt this conversation is on: a retried call's next one is not its
        self._written: list[dict[str, Any]] = []  # the turns as the transcript stream has them

    async def open(self) -> CallState | None:
        """Take the call for this conversation: None when it has ended or already has one (a replayed
        or second connection must not talk over the first)."""
        state, changed = await self.tracker.store.change(
            self.tenant, self.call_id,
            lambda s: s.model_copy(update={"conversation": "open"}) if s and s.conversation is None and not s.terminal else None,
        )
        if not changed or state is None:
            return None
        self._attempt = state.attempt
        self._writer = asyncio.create_task(self._write_loop(), name=f"record-{self.call_id}")
        return state

    def update(self, transcript: list[Turn], captured: dict[str, Any], end_reason: str | None) -> None:
        # Only references: the serialising happens when the write does, off the path from the
        # callee's words to the model's request (and a burst of updates costs one of it).
        self._latest = (transcript, captured, end_reason)
        self._dirty.set()

    async def close(self) -> CallState | None:
        """The final write (the conversation is closed), then the end event it may have held back."""
        if self._writer is not None:
            # Let an in-flight write finish instead of cancelling it: nats-py can turn a cancel into
            # its own timeout error, which the loop would take for a failed write and go on.
            self._closing = True
            self._close.set()
            self._dirty.set()
            await self._writer
        for attempt in range(20):
            try:
                await self._write_turns()
                if self._written:
                    await transcripts.compact(self.tracker.js, self.tenant, self.call_id, self._attempt, self._written)
                state, _ = await self.tracker.store.change(self.tenant, self.call_id, lambda s: self._apply(s, close=True))
                if state is not None:
                    await self.tracker.conversation_closed(state)
                return state
            except (NatsError, TimeoutError) as exc:
                log.warning("could not close the conversation's record; retrying",
                            extra={"call_id": self.call_id, "error": type(exc).__name__})
                await asyncio.sleep(min(5.0, 0.1 * 2**attempt))
        log.error("conversation record not closed; the sweeper will", extra={"call_id": self.call_id})
        return None

    def _apply(self, state: CallState | None, close: bool = False) -> CallState | None:
        if state is None or state.attempt != self._attempt:
            return None
        update: dict[str, Any] = {"conversation": "closed"} if close else {}
        if self._latest is not None:
            _, captured, end_reason = self._latest
            # A machine's greeting cut off by the voicemail policy is not the callee hanging up.
            update.update(transcript_turns=len(self._written), captured=dict(captured),
                          end_reason="voicemail" if state.machine else end_reason)
        return state.model_copy(update=update) if update else None

    async def _write_loop(self) -> None:
        while True:
            await self._dirty.wait()
            with contextlib.suppress(TimeoutError):  # the rest of the turn joins this write
                await asyncio.wait_for(self._close.wait(), WRITE_DELAY_SECONDS)
            if self._closing:
                return  # close() writes the last state
            self._dirty.clear()
            try:
                await self._write_turns()
                await self.tracker.store.change(self.tenant, self.call_id, self._apply)
            except (NatsError, TimeoutError):
                log.warning("transcript write failed; the next one carries it", extra={"call_id": self.call_id})
                await asyncio.sleep(0.5)
                self._dirty.set()
            # (a failure after close() began is fine: close() writes the last state itself)

    async def _write_turns(self) -> None:
        """Write the turns that are new, or changed since written, to the transcript stream."""
        if self._latest is None:
            return
        transcript = self._latest[0]
        count = len(transcript)  # the list grows while we write: this write takes what is there now
        lo = max(0, min(len(self._written), count) - REWRITE_TAIL)
        fresh = [t.record() for t in transcript[lo:count]]
        written = self._written
        first = next((lo + i for i, r in enumerate(fresh) if lo + i >= len(written) or written[lo + i] != r), count)
        if first < count:
            await transcripts.append(self.tracker.js, self.tenant, self.call_id, self._attempt, first,
                                     fresh[first - lo:])
        self._written[first:] = fresh[first - lo:]
