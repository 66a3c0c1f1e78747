"""The dialer: takes queued calls from the durable consumer and places each at most once.

Placing is claim → request → record. The claim (pending → dialing, with this dialer's name and the
time) is a compare-and-set on the call record; the provider's call id is recorded right after the
provider answers. A message is acked only once its call is placed or finished, so a dialer killed at
any point leaves the message to be redelivered; the next dialer then sees the claim without a
provider id and asks the provider whether the call went out before dialing again.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import uuid
from contextlib import aclosing
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig

from agentstudio import bus, call_windows, calls, calls_index, clock, phone, tracing
from agentstudio.calls import CallRequest
from agentstudio.callstate import CallError, CallState, CallStore, Deferral, now
from agentstudio.concurrency import Concurrency
from agentstudio.dialer.providers import Provider, ProviderError
from agentstudio.dialer.takeover import Liveness, Takeover
from agentstudio.do_not_call import DoNotCall
from agentstudio.frequency_caps import FrequencyCaps
from agentstudio.pacing import Pacing
from agentstudio.resources import CallPolicySpec, Retries, Voicemail
from agentstudio.settings import Settings
from agentstudio.tracking import CallTracker

log = logging.getLogger("agentstudio.dialer")

CONSUMER = bus.DISPATCH_CONSUMER
# A paused call is parked for pause_recheck_seconds, then for as long as it has been paused so far
# (doubling), up to this. A resume re-queues parked calls at once, so the park only bounds how late
# a resume nobody saw (a sweep cut short by an error) is noticed; 5 min keeps that short while a
# backlog of 100,000 paused calls costs ~330 dispatches/s, not one per recheck interval per call.
PAUSE_PARK_MAX_SECONDS = 300.0
RESUME_POLL_SECONDS = 0.25  # how often the bundles are looked at for a lifted pause


@dataclass(frozen=True)
class Pauses:
    """What is paused now: every call (this dialer's setting, the tenant's release) or workflows."""

    everything: bool = False
    workflows: frozenset[tuple[str, str]] = field(default_factory=frozenset)  # (tenant, workflow slug)

    def hold(self, call: CallRequest) -> bool:
        return self.everything or (call.tenant, call.workflow_slug or "") in self.workflows


@dataclass(frozen=True)
class AttemptRules:
    """What a call's CallPolicy says about its attempts, copied onto the call when it is claimed."""

    retries: Retries
    voicemail: Voicemail | None  # its message rendered for this call


class Dialer:
    def __init__(
        self,
        js: JetStreamContext,
        settings: Settings,
        tracker: CallTracker,
        live: Provider,
        simulated: Provider,
        dnc: DoNotCall,
        name: str | None = None,
        announce: Callable[[str], None] | None = None,
        pauses: Callable[[], Pauses | None] = Pauses,  # None until the tenants' bundles are read
        rules: Callable[[CallRequest], AttemptRules | None] = lambda call: None,
        policy_of: Callable[[CallRequest], CallPolicySpec | None] = lambda call: None,
        caps: FrequencyCaps | None = None,
        cap_of: Callable[[str], int | None] = lambda tenant: None,
        pace_of: Callable[[str], float | None] = lambda tenant: None,
    ) -> None:
        self.js = js
        self.settings = settings
        self.tracker = tracker
        self.store: CallStore = tracker.store
        self.concurrency: Concurrency = tracker.concurrency
        self.live = live
        self.simulated = simulated
        self.dnc = dnc
        self.name = name or f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
        self._slots = asyncio.Semaphore(settings.dialer_max_in_flight)
        self._tasks: set[asyncio.Task[None]] = set()
        self._announce = announce  # `dev` prints a line per placed call
        self._pauses = pauses
        self._rules = rules  # the call's retries and voicemail, copied onto it at its first claim
        self._policy_of = policy_of  # the call's CallPolicy in its tenant's current bundle
        self.caps = caps
        self._cap_of = cap_of  # the tenant's concurrent-call cap in its current bundle, if it sets one
        self._pace_of = pace_of  # the tenant's calls per second in its current bundle, if it sets one
        self.pacing = Pacing(tracker.concurrency.kv)
        self._parked: set[asyncio.Task[None]] = set()  # calls waiting for a slot under their tenant's cap
        self._stopping = asyncio.Event()
        self._slot_counts: dict[str, tuple[float, int]] = {}
        self._refreshing: dict[str, asyncio.Task[set[str]]] = {}

    async def run(self, stop: asyncio.Event) -> None:
        await bus.ensure_calls_stream(self.js)
        await bus.ensure_events_stream(self.js)
        sub = await self.js.pull_subscribe(
            bus.DISPATCH_ALL,
            durable=CONSUMER,
            stream=bus.CALLS_STREAM,
            config=ConsumerConfig(
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=self.settings.dispatch_ack_wait_seconds,
                # Waiting for a free slot under the tenant's cap is redelivery too, and must not
                # exhaust a call: attempts to place are counted in the call record instead.
                max_deliver=-1,
                max_ack_pending=10_000,
            ),
        )
        liveness = Liveness(self.js, await bus.dialers_bucket(self.js), self.name, self.settings.dialer_lease_seconds)
        await liveness.beat()  # before the first claim: no claim of ours is seen before our name
        takeover = Takeover(liveness, self.tracker, self.provider_for,
                            {p.name: p for p in (self.live, self.simulated)})
        # Cancelled with run (a dialer killed), and only after the drain when it stops: the heartbeat
        # lasts as long as anything this dialer claimed may still be moving.
        keeping = [asyncio.create_task(self._heartbeat(liveness)), asyncio.create_task(self._takeovers(takeover, stop))]
        try:
            log.info("dialer started", extra={"dialer": self.name})
            resumes = asyncio.create_task(self._resumes(stop))
            while not stop.is_set():
                free = self._free_slots()
                if free == 0:
                    await asyncio.sleep(0.01)
                    continue
                messages = await bus.fetch(sub, min(free, 32), 0.5)
                for msg in messages:
                    await self._slots.acquire()
                    task = asyncio.create_task(self._handle_guarded(msg))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
            # Stopping: finish what we took (a placed call is recorded; the rest is handed back by nak).
            self._stopping.set()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            resumes.cancel()  # a resume cut short is idempotent: the next dialer's start does it again
            await asyncio.gather(*self._parked, resumes, return_exceptions=True)
            await asyncio.gather(self.live.drain(), self.simulated.drain(), return_exceptions=True)
            await sub.unsubscribe()
        finally:
            for task in keeping:
                task.cancel()
            await asyncio.gather(*keeping, return_exceptions=True)
        try:
            await liveness.leave()
        except Exception:  # noqa: BLE001 - its lease runs out instead
            log.warning("dialer name not removed; its lease runs out", extra={"dialer": self.name})
        log.info("dialer stopped", extra={"dialer": self.name})

    def provider_for(self, call: CallRequest) -> Provider:
        return self.simulated if call.test or self.settings.telephony_provider == "simulated" else self.live

    async def _heartbeat(self, liveness: Liveness) -> None:
        """Three beats a lease, so a late one or two do not make this dialer look gone."""
        while True:
            await asyncio.sleep(liveness.lease / 3)
            try:
                await liveness.beat()
            except Exception:  # noqa: BLE001 - a NATS outage: the next beat tries again
                log.warning("heartbeat not written", extra={"dialer": self.name})

    async def _takeovers(self, takeover: Takeover, stop: asyncio.Event) -> None:
        """Look every third of a lease; walk the calls when a dialer was found gone since the last
        walk (and at start, for those gone before), and again while a walk left a claim unsettled."""
        walked: set[str] = set()
        unsettled = True
        while True:
            try:
                gone = await takeover.gone()
                if unsettled or gone - walked:
                    unsettled = not await takeover.walk()
                    walked = gone
            except Exception:  # noqa: BLE001 - the next look tries again
                log.exception("takeover walk failed", extra={"dialer": self.name})
                unsettled = True
            if await _stopped(stop, takeover.lease / 3):
                return

    def _free_slots(self) -> int:
        return self._slots._value  # noqa: SLF001 - asyncio.Semaphore has no public reading

    async def _handle_guarded(self, msg: Msg) -> None:
        try:
            # A child of ingest's publish, whose traceparent the message carries.
            with tracing.span("dialer dispatch", kind=tracing.SpanKind.CONSUMER, context=tracing.extract(msg.headers),
                              attributes={"dialer": self.name, "delivery": msg.metadata.num_delivered}):
                await self.handle(msg)
        except nats.errors.Error as exc:  # NATS out of reach, e.g. a stream's leader being elected
            log.warning("dispatch interrupted; will be redelivered",
                        extra={"dialer": self.name, "error": type(exc).__name__})
            await bus.hand_back(msg, self.settings.cap_retry_seconds)
        except Exception:  # noqa: BLE001 - the message is redelivered
            log.exception("dispatch failed; will be redelivered", extra={"dialer": self.name})
            await bus.hand_back(msg, self.settings.cap_retry_seconds)
        finally:
            self._slots.release()

    async def handle(self, msg: Msg) -> None:
        call = CallRequest.read(msg.data)
        tracing.annotate(call_id=call.call_id, tenant=call.tenant, workflow=call.workflow_slug or "",
                         agent=call.agent_slug or "")
        if unread(msg, call):
            # A call's first message: ingest writes no record, so none is read; the claim creates it,
            # and a record there after all (a cancel) is left to the message's redelivery, read.
            state = CallState.new(call)
            self.store.assume_absent(call.tenant, call.call_id)
        else:
            state = await self.store.get(call.tenant, call.call_id) or CallState.new(call)
        if state.terminal or state.provider_call_id:
            await msg.ack()  # finished, or placed and now driven by the provider's callbacks
            return
        if state.next_attempt_at is not None and (call.scheduled_for is None or call.scheduled_for < state.next_attempt_at):
            await msg.ack()  # a message of an earlier attempt (redelivered): the retry's own comes at its time
            return
        pauses = self._pauses()
        if state.status == "pending" and pauses is not None and pauses.hold(call):
            await self._park_paused(msg, call, state)
            return
        provider = self.provider_for(call)
        if state.status == "dialing" and state.claimed_at is not None:
            # Claimed before but the provider's answer was never recorded: did the call go out?
            placed = await provider.find(call, state.claimed_at)
            if placed is not None:
                await self._record(call, provider, placed)
                await msg.ack()
                return
            if state.dialer != self.name and not provider.finds_every_dialers_calls:
                # Only the claimant's provider can say whether it went out: the call is the claimant's
                # to settle, or the takeover's once the claimant is gone (provider_lost). Not dialed again.
                await msg.nak(delay=self.settings.cap_retry_seconds)
                return
        delivered = msg.metadata.num_delivered
        if state.attempts >= self.settings.dispatch_max_attempts or delivered > self.settings.dispatch_max_deliver:
            await self._dead_letter(msg, call, state)
            return
        if not await self.concurrency.acquire(call.tenant, call.call_id, self.cap(call.tenant)):
            if len(self._parked) >= self.settings.dialer_max_parked:
                # Waits in the queue, not rejected; the longer it waits, the less often it asks.
                await msg.nak(delay=min(30.0, self.settings.cap_retry_seconds * max(1, delivered // 5)))
                return
            # Parked here without holding an in-flight slot, so other tenants' calls keep flowing,
            # and taken the moment the tenant has a free slot instead of after a redelivery delay.
            task = asyncio.create_task(self._park(msg, call, provider))
            self._parked.add(task)
            task.add_done_callback(self._parked.discard)
            return
        await self._place(msg, call, provider)

    def cap(self, tenant: str) -> int:
        """The tenant's concurrent-call cap now: its bundle's plan, else this dialer's setting. Read
        on every try, so a changed plan applies to calls already waiting."""
        cap = self._cap_of(tenant)
        return self.settings.max_concurrent_calls_per_tenant if cap is None else cap

    def pace(self, tenant: str) -> float:
        """The tenant's calls per second now: its bundle's, else this dialer's setting."""
        pace = self._pace_of(tenant)
        return self.settings.calls_per_second_per_tenant if pace is None else pace

    async def _paced(self, msg: Msg, call: CallRequest) -> None:
        """Wait for this call's moment under its tenant's pace, keeping the message ours meanwhile."""
        at = await self.pacing.reserve(call.tenant, self.pace(call.tenant))
        keep = self.settings.dispatch_ack_wait_seconds / 3
        while (wait := at - time.time()) > 0:
            await asyncio.sleep(min(wait, keep))
            if at - time.time() > 0:
                await msg.in_progress()  # a long wait (a slow pace, a deep backlog): not redelivered elsewhere

    async def _park(self, msg: Msg, call: CallRequest, provider: Provider) -> None:
        last_progress = asyncio.get_running_loop().time()
        try:
            while not (await self._may_be_free(call.tenant, self.cap(call.tenant))
                       and await self.concurrency.acquire(call.tenant, call.call_id, self.cap(call.tenant))):
                if self._stopping.is_set():
                    await msg.nak()  # hand it back to the queue for another dialer
                    return
                await asyncio.sleep(self.settings.cap_poll_seconds)
                if asyncio.get_running_loop().time() - last_progress > self.settings.dispatch_ack_wait_seconds / 3:
                    await msg.in_progress()  # still ours: do not redeliver it elsewhere
                    last_progress = asyncio.get_running_loop().time()
            async with self._slots:
                await self._place(msg, call, provider)
        except Exception:  # noqa: BLE001 - redelivered after ack_wait, or now
            log.exception("parked call failed; handing it back", extra={"call_id": call.call_id})
            await bus.hand_back(msg, self.settings.cap_retry_seconds)

    async def _may_be_free(self, tenant: str, cap: int) -> bool:
        """One read of the tenant's slots per poll interval, shared by all its parked calls."""
        now = asyncio.get_running_loop().time()
        seen = self._slot_counts.get(tenant)
        if seen is None or now - seen[0] >= self.settings.cap_poll_seconds:
            # Single flight: the tenant's parked calls share one read instead of each making one.
            refresh = self._refreshing.get(tenant)
            if refresh is None or refresh.done():
                refresh = self._refreshing[tenant] = asyncio.create_task(self.concurrency.holders(tenant))
            count = len(await refresh)
            seen = self._slot_counts.get(tenant)
            if seen is None or seen[0] < now:
                seen = self._slot_counts[tenant] = (asyncio.get_running_loop().time(), count)
        if seen[1] >= cap:
            return False
        # Count this attempt as taking a slot, so a thousand parked calls do not all rush one free slot.
        self._slot_counts[tenant] = (seen[0], seen[1] + 1)
        return True

    async def _place(self, msg: Msg, call: CallRequest, provider: Provider) -> None:
        await self._paced(msg, call)
        # Asked at the last moment (after any wait for a slot): a number listed since the call was
        # queued is not dialed.
        if await self.dnc.listed(call.tenant, call.phone_number):
            await self._ensure_record(call)
            await self.tracker.advance(
                call.tenant, call.call_id, "canceled", end_reason="do_not_call",
                error=CallError(code="do_not_call", message="the number is on the do-not-call list"),
            )
            await msg.ack()
            log.info("call canceled: number on the do-not-call list",
                     extra={"call_id": call.call_id, "tenant": call.tenant, "phone": phone.mask(call.phone_number)})
            return
        # Also asked at the last moment: the window may have closed while the call waited for a slot.
        # A retry is a new dispatch, so it takes a placement of the frequency cap as the law counts it.
        attempt = str(msg.metadata.sequence.stream)  # this dispatch: a redelivery is the same attempt
        if await self._held(msg, call, attempt):
            return
        claimed, written = await self._claim(call, unread(msg, call))
        if claimed is None:
            # Canceled (or finished) since it was read: never dialed, and its slots are free again.
            await self.concurrency.release(call.tenant, call.call_id)
            if self.caps is not None:
                await self.caps.release(call.tenant, call.phone_number, attempt)
            if written:  # a record this dialer did not read first: decided again on its redelivery
                await msg.nak()
            else:
                await msg.ack()
            return
        try:
            with tracing.span("provider place", kind=tracing.SpanKind.CLIENT, attributes={
                    "call_id": call.call_id, "tenant": call.tenant, "provider": provider.name,
                    "phone": phone.mask(call.phone_number)}) as span:
                try:
                    sid = await provider.place(call, voicemail=claimed.voicemail)
                except ProviderError as exc:  # the span records it as its error on the way out
                    span.set_attribute("error.type", exc.error.code)
                    raise
                span.set_attribute("provider_call_id", sid)
        except ProviderError as exc:
            await self.tracker.advance(call.tenant, call.call_id, "failed", error=exc.error, detail=provider.name)
            await msg.ack()
            return
        if not provider.records_call_id:
            await self._record(call, provider, sid)
        await msg.ack()
        if self._announce is not None:
            target = f"workflow={call.workflow_slug}" if call.workflow_slug else f"agent={call.agent_slug}"
            self._announce(f"dialer ({provider.name}): call {call.call_id} to {phone.mask(call.phone_number)} "
                           f"{target}{' [test]' if call.test else ''}")
        log.info(
            "call placed",
            extra={"call_id": call.call_id, "tenant": call.tenant, "provider": provider.name,
                   "phone": phone.mask(call.phone_number), "dialer": self.name},
        )

    async def _held(self, msg: Msg, call: CallRequest, attempt: str) -> bool:
        """Whether the call's policy holds it back now: its window is closed, or its number has had
        its placements for the cap's window (otherwise one is reserved for this attempt). A held call
        is deferred to when it may be dialed, never dropped: queued again on its schedule subject."""
        rules = call_windows.rules_for(self._policy_of(call), call.phone_number)
        if rules is None:
            return False
        at = clock.now()
        try:
            opening = call_windows.opening(rules, call.phone_number, at)
        except call_windows.NeverOpen as exc:  # the policy changed since ingest accepted the call
            await self._ensure_record(call)
            await self.tracker.advance(call.tenant, call.call_id, "canceled", end_reason="no_calling_window",
                                       error=CallError(code="no_calling_window", message=str(exc)))
            await msg.ack()
            return True
        until = opening if opening > at else None
        reason = "calling_hours"
        if until is None and rules.cap is not None and self.caps is not None:
            until = await self.caps.reserve(call.tenant, call.phone_number, attempt, rules.cap, at)
            reason = "frequency_cap"
        if until is None:
            return False
        if reason == "calling_hours" and rules.cap is not None and self.caps is not None:
            # Reserved by a dialer that died before claiming it, while the window was still open.
            await self.caps.release(call.tenant, call.phone_number, attempt)
        # Published before it is recorded and acked, with an id naming this dispatch: a dialer that dies
        # in between leaves the message to be redelivered, and deferring it again publishes nothing new.
        await calls.defer(self.js, call, call_windows.reachable(until, at), f"{call.call_id}.deferred.{attempt}",
                          reason=reason)
        deferral = Deferral(at=now(), reason=reason, until=until)  # type: ignore[arg-type]

        def note(s: CallState | None) -> CallState | None:
            s = s or CallState.new(call)
            if s.status != "pending":
                return None
            if any((d.reason, d.until) == (reason, until) for d in s.deferrals[-1:]):
                # The same deferral (redelivered, or due past the queue's reach and arrived early): written
                # all the same, as the record's TTL runs from its last write and the wait may outlast it.
                return s.model_copy()
            return s.model_copy(update={"deferrals": [*s.deferrals, deferral]})

        await self.store.change(call.tenant, call.call_id, note)
        await self.concurrency.release(call.tenant, call.call_id)
        await msg.ack()
        log.info("call deferred", extra={"call_id": call.call_id, "tenant": call.tenant, "reason": reason,
                                         "until": until.isoformat(), "phone": phone.mask(call.phone_number)})
        return True

    async def _park_paused(self, msg: Msg, call: CallRequest, state: CallState) -> None:
        """Defer a paused call on its schedule subject, acked: it holds no ack-pending slot of the
        dialers' consumer and spends no delivery (a call paused for days is never dead-lettered).
        The park doubles while the pause lasts; a resume re-queues it sooner (see `_resumes`)."""
        last = state.deferrals[-1] if state.deferrals else None
        # The same pause goes on when its deferral is the newest thing that happened to the call.
        going_on = last is not None and last.reason == "paused" and last.at >= state.events[-1].at
        since = last.at if going_on and last is not None else now()
        seconds = min(PAUSE_PARK_MAX_SECONDS, max(self.settings.pause_recheck_seconds, (now() - since).total_seconds()))
        until = clock.now() + timedelta(seconds=seconds)
        # Up to the whole second the schedule fires on, so the record says when it is looked at again.
        until = until.replace(microsecond=0) + timedelta(seconds=1) if until.microsecond else until
        # The id names this dispatch: a dialer dying before the ack leaves it redelivered, and the
        # deferral published again is a duplicate.
        await calls.defer(self.js, call, until, f"{call.call_id}.paused.{msg.metadata.sequence.stream}", reason="paused")
        deferral = Deferral(at=since, reason="paused", until=until)

        def note(s: CallState | None) -> CallState | None:
            s = s or CallState.new(call)
            if s.status != "pending":
                return None
            # One entry per pause, however many times it is parked again.
            kept = s.deferrals[:-1] if s.deferrals and s.deferrals[-1].reason == "paused" \
                and s.deferrals[-1].at == since else s.deferrals
            return s.model_copy(update={"deferrals": [*kept, deferral]})

        await self.store.change(call.tenant, call.call_id, note)
        await msg.ack()
        log.info("call parked: paused", extra={"call_id": call.call_id, "tenant": call.tenant,
                                               "until": until.isoformat(), "dialer": self.name})

    async def _resumes(self, stop: asyncio.Event) -> None:
        """Dial parked calls promptly once their pause is lifted, not at their next park's end: at
        start, every call parked as paused that nothing pauses now (the tenant-wide setting is lifted
        by restarting the dialers), then each tenant's calls of a workflow whose pause is lifted."""
        seen = self._pauses()
        while seen is None:  # the bundles are not read yet: every workflow would look unpaused
            if await _stopped(stop, RESUME_POLL_SECONDS):
                return
            seen = self._pauses()
        if not seen.everything:
            await self._resume(bus.schedule_subject("*", "*"), seen)
        while not await _stopped(stop, RESUME_POLL_SECONDS):
            current = self._pauses()
            if current is None or current == seen:
                continue
            for tenant, workflow in sorted(seen.workflows - current.workflows):
                await self._resume(bus.schedule_subject(tenant, "*"), current, workflow)
            seen = current

    async def _resume(self, subject: str, pauses: Pauses, workflow: str | None = None) -> None:
        """Re-queue, due now, the calls parked as paused on `subject` (of `workflow`, if given) that
        nothing pauses now. Each is replaced only while its parked schedule still waits, with an id
        naming that schedule: dialers resuming together queue it once, and a call that moved on
        since it was read is left as it is."""
        resumed = 0
        try:
            # The calls waiting on those schedule subjects (a fired schedule leaves the stream) as
            # they stood when the read began: our own re-queues come after it.
            top = int((await self.js.stream_info(bus.CALLS_STREAM)).state.last_seq)
            async with aclosing(calls_index.scan(self.js, [subject], 1, top + 1)) as waiting:
                async for seq, call in waiting:
                    if call.scheduled_reason != "paused" or pauses.hold(call) or (
                            workflow is not None and call.workflow_slug != workflow):
                        continue
                    try:
                        await calls.defer(self.js, call, clock.now(), f"{call.call_id}.resumed.{seq}", replacing=seq)
                    except calls.Moved:
                        continue
                    resumed += 1
                    await self.store.change(call.tenant, call.call_id, _resumed)
        except Exception:  # noqa: BLE001 - what is not resumed now is dialed when its park ends
            log.exception("resume cut short", extra={"subject": subject, "dialer": self.name})
        if resumed:
            log.info("parked calls resumed", extra={"subject": subject, "workflow": workflow, "calls": resumed,
                                                   "dialer": self.name})

    async def _claim(self, call: CallRequest, unread: bool) -> tuple[CallState | None, bool]:
        """(The call as this dialer claimed it, or None when it may not place it; whether it was
        refused because a record was there that the dialer had not read, `unread`.) The
        compare-and-set against a cancel decides. The first attempt's claim copies the policy's
        retries and voicemail onto the call; later attempts keep what the call began with."""
        written = False
        # The conversation and the status events join the trace through the record.
        traceparent = tracing.traceparent()

        def claim(s: CallState | None) -> CallState | None:
            nonlocal written
            written = unread and s is not None
            if written:
                return None
            s = s or CallState.new(call)
            if s.status not in ("pending", "dialing") or s.provider_call_id:
                return None
            moved = s.advanced("dialing", detail=f"dialer {self.name}") or s
            update = {"dialer": self.name, "claimed_at": now(), "attempts": s.attempts + 1}
            if traceparent is not None:
                update["traceparent"] = traceparent
            if s.attempt == 1:  # only then: the rules render the voicemail message
                rules = self._rules(call)
                update |= {"retries": rules.retries if rules else None, "voicemail": rules.voicemail if rules else None}
            return moved.model_copy(update=update)

        state, claimed = await self.store.change(call.tenant, call.call_id, claim)
        if claimed:
            self.tracker.remember(call)
        return (state if claimed else None), written

    async def _ensure_record(self, call: CallRequest) -> None:
        """The call's record, written pending if it has none yet, for a transition that needs one."""
        await self.store.change(call.tenant, call.call_id, lambda s: CallState.new(call) if s is None else None)

    async def _record(self, call: CallRequest, provider: Provider, sid: str) -> None:
        await self.store.change(
            call.tenant,
            call.call_id,
            # Not once the attempt has ended and the call waits for its next one.
            lambda s: None if s is None or s.provider_call_id or s.status == "pending" else s.model_copy(
                update={"provider": provider.name, "provider_call_id": sid}),
        )

    async def _dead_letter(self, msg: Msg, call: CallRequest, state: CallState) -> None:
        await self.js.publish(bus.dead_subject(call.tenant, call.call_id), msg.data,
                              headers={"Nats-Msg-Id": f"dead-{call.call_id}"})
        await self._ensure_record(call)
        await self.tracker.advance(
            call.tenant, call.call_id, "failed",
            error=CallError(code="dispatch_exhausted",
                            message=f"not placed after {state.attempts} attempts and "
                                    f"{msg.metadata.num_delivered} deliveries"),
        )
        await self.concurrency.release(call.tenant, call.call_id)
        await msg.ack()
        log.error("call dead-lettered", extra={"call_id": call.call_id, "tenant": call.tenant})


def unread(msg: Msg, call: CallRequest) -> bool:
    """Whether the dialer takes `msg` without reading its call's record: a call's first message
    (delivered once, not a deferral, retry or resume, which are scheduled), for which ingest wrote
    none."""
    return msg.metadata.num_delivered == 1 and call.scheduled_for is None


def _resumed(s: CallState | None) -> CallState | None:
    """The call's pause ends now (the listing shows it pending, not scheduled until its park's end)."""
    if s is None or s.status != "pending" or not s.deferrals or s.deferrals[-1].reason != "paused":
        return None
    last = s.deferrals[-1]
    return s.model_copy(update={"deferrals": [*s.deferrals[:-1], last.model_copy(update={"until": clock.now()})]})


async def _stopped(stop: asyncio.Event, seconds: float) -> bool:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return False
    return True
