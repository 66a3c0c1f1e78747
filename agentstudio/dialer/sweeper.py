"""No call stays unfinished forever: a call whose provider never reported an end (a lost callback, a
dialer gone with a simulated call) is failed with `stale` once it is older than any real call could
be. Every dialer runs the sweep; the compare-and-set write makes a double sweep harmless."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta, timezone

from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from agentstudio import bus
from agentstudio.callstate import CallError, CallState
from agentstudio.tracking import CallTracker

log = logging.getLogger("agentstudio.dialer")


async def sweep(
    kv: KeyValue, tracker: CallTracker, older_than: timedelta, held_longer_than: timedelta = timedelta(minutes=2)
) -> list[str]:
    """Fail the placed-but-unfinished calls last changed before now - older_than; their ids. Also
    close conversations whose dialer died after the call ended, so their held end event goes out."""
    keys = await bus.kv_keys(tracker.js, bus.CALLS_BUCKET, "")
    cutoff = datetime.now(timezone.utc) - older_than
    held_cutoff = datetime.now(timezone.utc) - held_longer_than
    swept = []
    for key in keys:
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:
            continue
        if not entry.value:
            continue
        state = CallState.model_validate_json(entry.value)
        if state.terminal and state.conversation == "open" and (state.ended_at or cutoff) < held_cutoff:
            closed, changed = await tracker.store.change(
                state.tenant, state.call_id,
                lambda s: s.model_copy(update={"conversation": "closed"}) if s and s.conversation == "open" else None)
            if changed and closed is not None:
                await tracker.conversation_closed(closed)
            continue
        # pending calls are still in the queue (and will be dispatched); the rest must end.
        if state.terminal or state.status == "pending" or state.events[-1].at > cutoff:
            continue
        ended = await tracker.advance(state.tenant, state.call_id, "failed", error=CallError(
            code="stale", message=f"no report from the provider since {state.events[-1].at.isoformat()}"))
        if ended is not None and ended.status == "failed":
            swept.append(state.call_id)
            log.warning("stale call failed", extra={"call_id": state.call_id, "tenant": state.tenant})
    return swept


async def run(kv: KeyValue, tracker: CallTracker, older_than: timedelta, every: float, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            await sweep(kv, tracker, older_than)
        except Exception:  # noqa: BLE001 - the next sweep tries again
            log.exception("sweep failed")
        try:
            await asyncio.wait_for(stop.wait(), timeout=every)
        except asyncio.TimeoutError:
            pass
