"""No call stays unfinished forever. A call whose end is overdue (its final status callback lost:
Twilio retries a failed callback `rc` times, 1 by default, for the failures its retry policy `rp`
names; https://www.twilio.com/docs/usage/webhooks/webhooks-connection-overrides) is settled by asking
the provider where it is, minutes after it must have ended; a call the provider cannot say anything
about is failed with `stale` once it is older than any real call could be (a dialer gone with its
calls is the takeover's, within a lease: takeover.py). Every dialer runs the sweep; the compare-and-set write makes a double sweep harmless."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from agentstudio.callstate import CallError, CallState, unfinished
from agentstudio.dialer.providers import Provider, ProviderError
from agentstudio.tracking import CallTracker

log = logging.getLogger("agentstudio.dialer")


@dataclass(frozen=True)
class Reconcile:
    """When to ask `provider` about a placed call it has not reported an end for."""

    provider: Provider
    ring: timedelta  # longest a placed call rings before the provider ends it (Twilio's Timeout)
    longest: timedelta  # longest an answered call lasts before the provider cuts it (Twilio's TimeLimit)
    late: timedelta  # how far past its expected end a call's final report may be before we ask

    def due(self, state: CallState, now: datetime) -> bool:
        if state.terminal or state.provider != self.provider.name or not state.provider_call_id:
            return False
        last = state.events[-1].at
        if state.status != "in_progress":
            ends = last + self.ring  # a call still queued at the provider is asked again next sweep
        elif state.conversation == "closed":
            ends = last  # the agent is done with it: the hang-up follows at once
        else:
            ends = (state.answered_at or last) + self.longest
        return now >= ends + self.late

    async def settle(self, tracker: CallTracker, state: CallState) -> CallState | None:
        """Record what the provider says about the call; the new state, None if it said nothing."""
        assert state.provider_call_id is not None
        try:
            report = await self.provider.report(state.provider_call_id)
        except ProviderError as exc:
            log.warning("could not ask the provider about an overdue call: %s", exc.error.code,
                        extra={"call_id": state.call_id, "tenant": state.tenant})
            return None
        if report is None:
            return None
        return await tracker.advance(state.tenant, state.call_id, report.status, error=report.error,
                                     duration_seconds=report.duration_seconds, provider_call_id=state.provider_call_id,
                                     detail=f"{self.provider.name} asked: its report was overdue")


async def sweep(
    tracker: CallTracker, older_than: timedelta, held_longer_than: timedelta = timedelta(minutes=2),
    reconcile: Reconcile | None = None,
) -> list[str]:
    """Settle overdue calls by asking their provider (`reconcile`), then fail the placed-but-unfinished
    calls last changed before now - older_than; their ids. Also close conversations whose dialer died
    after the call ended, so their held end event goes out."""
    cutoff = datetime.now(timezone.utc) - older_than
    held_cutoff = datetime.now(timezone.utc) - held_longer_than
    swept = []
    for state in await unfinished(tracker.js):
        if state.terminal and state.conversation == "open" and (state.ended_at or cutoff) < held_cutoff:
            closed, changed = await tracker.store.change(
                state.tenant, state.call_id,
                lambda s: s.model_copy(update={"conversation": "closed"}) if s and s.conversation == "open" else None)
            if changed and closed is not None:
                await tracker.conversation_closed(closed)
            continue
        if reconcile is not None and reconcile.due(state, datetime.now(timezone.utc)):
            settled = await reconcile.settle(tracker, state)
            if settled is not None and settled.terminal:
                continue
            state = settled or state
        # pending calls are still in the queue (and will be dispatched); the rest must end.
        if state.terminal or state.status == "pending" or state.events[-1].at > cutoff:
            continue
        ended = await tracker.advance(state.tenant, state.call_id, "failed", error=CallError(
            code="stale", message=f"no report from the provider since {state.events[-1].at.isoformat()}"))
        if ended is not None and ended.status == "failed":
            swept.append(state.call_id)
            log.warning("stale call failed", extra={"call_id": state.call_id, "tenant": state.tenant})
    return swept


async def run(tracker: CallTracker, older_than: timedelta, every: float, stop: asyncio.Event,
              reconcile: Reconcile | None = None) -> None:
    while not stop.is_set():
        try:
            await sweep(tracker, older_than, reconcile=reconcile)
        except Exception:  # noqa: BLE001 - the next sweep tries again
            log.exception("sweep failed")
        try:
            await asyncio.wait_for(stop.wait(), timeout=every)
        except asyncio.TimeoutError:
            pass
