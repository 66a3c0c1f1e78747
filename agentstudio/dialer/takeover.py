"""Dialer liveness and the takeover of a gone dialer's claims. Each dialer heartbeats under its name
in `as-dialers`; one whose heartbeat has not changed for a lease (by the observer's own clock, so no
two clocks are compared, and only while the observer's own beats were written, so a bucket out of
reach makes nobody gone) or whose name is gone from the bucket is gone. Another dialer then settles
every call it left claimed (dialing, ringing, in progress) instead of waiting for reports that will
never come: Twilio is asked for the call and its status applied; a simulated call lived in the dead
process and is failed `provider_lost`. A Twilio claim with no provider call id recorded is looked
for at Twilio (the dialer may have died between placing and recording it); one never placed is left
to its message's redelivery, which dials it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from agentstudio import bus, calls
from agentstudio.calls import CallRequest
from agentstudio.callstate import CallError, CallState, unfinished
from agentstudio.dialer.providers import Provider, ProviderError
from agentstudio.tracking import CallTracker

log = logging.getLogger("agentstudio.dialer")

PROVIDER_LOST = "provider_lost"


@dataclass
class _Seen:
    revision: int
    since: float  # our monotonic clock when this revision was first read


class Liveness:
    """This dialer's heartbeat, and what it has seen of the others'."""

    def __init__(self, js: JetStreamContext, kv: KeyValue, name: str, lease: float) -> None:
        self._js = js
        self._kv = kv
        self.name = name
        self.lease = lease
        self._seen: dict[str, _Seen] = {}
        # Since when our own beats have been written without a failure. A lease counts only from
        # then: while the bucket is out of reach (its leader being elected) nobody's beats land, and
        # right after it is back, the others' stale revisions would otherwise make live dialers gone.
        self._writable_since: float | None = None

    async def beat(self) -> None:
        try:
            await self._kv.put(self.name, b"")  # the revision is the heartbeat
        except BaseException:
            self._writable_since = None
            raise
        if self._writable_since is None:
            self._writable_since = asyncio.get_running_loop().time()

    async def leave(self) -> None:
        """A dialer stopping cleanly has finished or handed back what it held: its name goes at once."""
        await self._kv.delete(self.name)

    async def look(self) -> set[str]:
        """Read every dialer's heartbeat; the names gone now."""
        loop = asyncio.get_running_loop()
        now, present = loop.time(), {}
        for name in await bus.kv_keys(self._js, bus.DIALERS_BUCKET, ""):
            try:
                present[name] = (await self._kv.get(name)).revision or 0
            except KeyNotFoundError:
                continue
        for name, revision in present.items():
            seen = self._seen.get(name)
            if seen is None or seen.revision != revision:
                self._seen[name] = _Seen(revision, now)
        for name in set(self._seen) - set(present):
            del self._seen[name]
        if self._writable_since is None:
            return set()
        return {n for n, s in self._seen.items()
                if n != self.name and now - max(s.since, self._writable_since) > self.lease}

    def known(self, name: str) -> bool:
        return name in self._seen


class Takeover:
    """Settles the calls claimed by dialers that are gone."""

    def __init__(self, liveness: Liveness, tracker: CallTracker,
                 provider_for: Callable[[CallRequest], Provider], providers: dict[str, Provider]) -> None:
        self._liveness = liveness
        self._tracker = tracker
        self._provider_for = provider_for
        self._providers = providers

    @property
    def lease(self) -> float:
        return self._liveness.lease

    async def gone(self) -> set[str]:
        """The dialers gone now."""
        return await self._liveness.look()

    async def walk(self) -> bool:
        """Settle every claim whose dialer is gone; False when one could not be settled now."""
        settled = True
        gone = await self._liveness.look()
        absent: set[str] = set()  # names found not there in this walk, each looked for once
        for state in await unfinished(self._tracker.js):
            if state.terminal or state.status == "pending" or state.dialer in (None, self._liveness.name):
                continue
            if state.dialer not in gone | absent:
                if self._liveness.known(state.dialer):
                    continue
                # Looked at again after its claim was read: a dialer heartbeats before it claims, so a
                # name still not there is gone (stopped, or its name expired with the bucket's TTL).
                gone = await self._liveness.look()
                if self._liveness.known(state.dialer):
                    continue
                absent.add(state.dialer)
            settled = await self._settle(state) and settled
        return settled

    async def _settle(self, state: CallState) -> bool:
        dead = state.dialer
        sid = state.provider_call_id
        if sid and state.provider in self._providers:
            provider = self._providers[state.provider]
        else:
            request = await calls.fetch(self._tracker.js, state.tenant, state.call_id)
            if request is None:
                return True  # purged with its stream: nothing to settle against
            provider = self._provider_for(request)
        if provider.name == "simulated":
            if await self._take(state):
                await self._tracker.advance(
                    state.tenant, state.call_id, "failed", provider_call_id=sid, detail=f"dialer {dead} gone",
                    error=CallError(code=PROVIDER_LOST, message=f"dialer {dead} stopped without ending the call "
                                                                "(its heartbeat ran out); the simulated call ended with it"))
                log.warning("call of a gone dialer failed: provider_lost",
                            extra={"call_id": state.call_id, "tenant": state.tenant, "dialer": dead})
            return True
        placed: dict[str, str] = {}
        try:
            if not sid and state.claimed_at is not None:
                # It died between placing the call and recording it? Not found: never placed, and its
                # message's redelivery (after the ack wait) dials it.
                sid = await provider.find(request, state.claimed_at)
                if sid is None:
                    return True
                placed = {"provider": provider.name, "provider_call_id": sid}
            if not sid:
                return True
            report = await provider.report(sid)
        except ProviderError as exc:
            log.warning("could not ask the provider about a gone dialer's call: %s", exc.error.code,
                        extra={"call_id": state.call_id, "tenant": state.tenant})
            return False
        if not await self._take(state, placed):
            return True
        if report is not None:
            await self._tracker.advance(state.tenant, state.call_id, report.status, error=report.error,
                                        duration_seconds=report.duration_seconds, provider_call_id=sid,
                                        detail=f"{provider.name} asked: dialer {dead} gone")
        log.info("call of a gone dialer taken over", extra={"call_id": state.call_id, "tenant": state.tenant,
                                                            "dialer": dead, "status": report and report.status})
        return True

    async def _take(self, state: CallState, placed: dict[str, str] | None = None) -> bool:
        """Move the claim to this dialer (with the provider's call id `placed`, when it was found),
        unless the call moved on since it was read."""

        def take(s: CallState | None) -> CallState | None:
            if s is None or s.terminal or s.dialer != state.dialer or s.attempt != state.attempt \
                    or s.provider_call_id != state.provider_call_id:
                return None
            return s.model_copy(update={"dialer": self._liveness.name, **(placed or {})})

        _, taken = await self._tracker.store.change(state.tenant, state.call_id, take)
        return taken

