"""Call status webhooks: durable, at-least-once, signed, and isolated per subscription.

A fan-out consumer reads call status events (CALL_EVENTS) and files one delivery per matching
subscription in the WEBHOOKS stream (`webhooks.<tenant>.<subscription>`, de-duplicated by event and
subscription). Each subscription then has a durable consumer and a delivery loop of its own, so a
slow or dead receiver only ever holds up itself. A failed attempt is retried after the next delay of
the schedule (nak with delay: the message stays in JetStream, the same webhook-id every time); when
the schedule is used up the delivery goes to the dead-letter bucket, which the API lists and replays.
A 410 Gone disables the subscription until its spec changes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import KeyNotFoundError, NotFoundError
from nats.js.kv import KeyValue
from prometheus_client import Counter

from agentstudio import bus, signing, tracing
from agentstudio.addresses import reserved_host
from agentstudio.bundle import CompiledSubscription
from agentstudio.bundle_store import BundleWatcher
from agentstudio.http_failures import described
from agentstudio.secrets import SecretReader

log = logging.getLogger("agentstudio.webhooks")

FANOUT_CONSUMER = "webhook-fanout"
DEFAULT_SCHEDULE = (0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
# How long a delivered message's record and ack are retried: within its consumer's ack wait (the
# timeout + 20 s), so the redelivery a lost ack brings finds the record.
SETTLE_SECONDS = 15.0
# What became of a delivery attempt, as counted (DialerMetrics.webhook_deliveries).
OUTCOMES = ("delivered", "retry", "dead_lettered", "gone")


def matches(sub: CompiledSubscription, event: dict[str, Any]) -> bool:
    data = event["data"]
    f = sub.filters
    return (
        not sub.disabled
        and ("call.*" in sub.events or event["type"] in sub.events)
        and (not f.workflow_slugs or data.get("workflow_slug") in f.workflow_slugs)
        and (not f.agent_slugs or data.get("agent_slug") in f.agent_slugs)
        and all(str((data.get("metadata") or {}).get(k)) == v for k, v in f.metadata.items())
        and (f.mode == "any" or (f.mode == "test") == bool(data.get("test")))
    )


async def _retried(op: Callable[[], Awaitable[object]], retry_for: float, failed: str, said: dict[str, Any]) -> bool:
    """Whether `op` succeeded, tried again every half second for `retry_for` while NATS fails it;
    a failure past that is logged as `failed`."""
    deadline = time.monotonic() + retry_for
    while True:
        try:
            await op()
            return True
        except (NatsError, asyncio.TimeoutError) as exc:
            if time.monotonic() >= deadline:
                log.warning(failed, extra={**said, "error": type(exc).__name__})
                return False
            await asyncio.sleep(0.5)


async def _ack(msg: Msg) -> None:
    """An ack whose loss costs nothing: a delivery whose record says delivered (its redelivery finds
    the record and is acked unposted), or a filed event (filing again is de-duplicated). Lost, when
    sent as its node dies or refused while the client reconnects."""
    try:
        await msg.ack()
    except NatsError:
        pass


class _Together:
    """Calls that come while an earlier batch is being handled are handled together next, each
    caller waiting for its own batch: deliveries that finish together share NATS writes."""

    def __init__(self, handle: Callable[[list[Any]], Awaitable[None]]) -> None:
        self._handle = handle
        self._waiting: list[tuple[Any, asyncio.Future[None]]] = []
        self._draining: asyncio.Task[None] | None = None

    async def __call__(self, item: Any) -> None:
        done = asyncio.get_running_loop().create_future()
        self._waiting.append((item, done))
        if self._draining is None or self._draining.done():
            self._draining = asyncio.create_task(self._drain())
        await done

    async def _drain(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting, []
            try:
                await self._handle([item for item, _ in batch])
            except Exception as exc:  # noqa: BLE001 - raised in each caller of the batch
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
            else:
                for _, done in batch:
                    if not done.done():
                        done.set_result(None)


@dataclass
class _Loop:
    task: asyncio.Task[None]
    sub: CompiledSubscription
    gone: bool = False  # a 410 came: nothing more is posted by this loop


class WebhookDispatcher:
    def __init__(
        self,
        js: JetStreamContext,
        bundles: BundleWatcher,
        secrets: SecretReader,
        schedule: tuple[float, ...] = DEFAULT_SCHEDULE,
        timeout_seconds: float = 10.0,
        concurrency_per_subscription: int = 4,
        outcomes: Counter | None = None,
    ) -> None:
        self.js = js
        self._outcomes = outcomes  # DialerMetrics.webhook_deliveries, by tenant and outcome
        self.bundles = bundles
        self.secrets = secrets
        self.schedule = schedule
        self.timeout = timeout_seconds
        self.per_subscription = concurrency_per_subscription
        self._loops: dict[tuple[str, str], _Loop] = {}
        self._placeholders: set[tuple[str, str, str]] = set()  # (tenant, subscription, URL) already said
        self._tls = httpx.create_ssl_context()  # made once: each subscription's client shares it
        self.dead: KeyValue | None = None
        self.disabled: KeyValue | None = None
        self.deliveries: KeyValue | None = None

    async def run(self, stop: asyncio.Event) -> None:
        await bus.ensure_events_stream(self.js)
        self.dead, self.disabled = await bus.ensure_webhooks(self.js)
        self.deliveries = await bus.deliveries_bucket(self.js)
        fanout = asyncio.create_task(self._fanout_until(stop), name="webhook-fanout")
        try:
            while not stop.is_set():
                await self._reconcile_loops(stop)
                try:
                    await asyncio.wait_for(stop.wait(), timeout=0.5)
                except asyncio.TimeoutError:
                    pass
        finally:
            fanout.cancel()
            for loop in self._loops.values():
                loop.task.cancel()
            await asyncio.gather(fanout, *(loop.task for loop in self._loops.values()), return_exceptions=True)

    # --- fan-out ------------------------------------------------------------------------------

    async def _fanout_until(self, stop: asyncio.Event) -> None:
        """The fan-out, started again whenever NATS cuts it short: nothing else would, and every
        later event would wait unfiled."""
        while not stop.is_set():
            try:
                await self._fanout(stop)
            except Exception as exc:  # noqa: BLE001 - e.g. the consumer's stream electing a leader
                log.warning("webhook fan-out interrupted; starting again", extra={"error": type(exc).__name__})
                await asyncio.sleep(1)

    async def _fanout(self, stop: asyncio.Event) -> None:
        sub = await self.js.pull_subscribe(
            "calls.*.events.*", durable=FANOUT_CONSUMER, stream=bus.EVENTS_STREAM,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=30, max_deliver=-1),
        )
        await self.bundles.loaded.wait()
        while not stop.is_set():
            messages = await bus.fetch(sub, 64, 0.5)
            # A batch's deliveries are published together, then its events acked together: NATS
            # gets them in a few writes, not two round trips an event one after the other.
            filed = await asyncio.gather(*(self._file(msg) for msg in messages), return_exceptions=True)
            for msg, result in zip(messages, filed):
                if isinstance(result, Exception):  # redelivered; filing is idempotent
                    log.warning("could not file webhook deliveries; will be redelivered",
                                extra={"error": type(result).__name__})
                    await bus.hand_back(msg, 1)
            await asyncio.gather(*(_ack(msg) for msg, result in zip(messages, filed) if result is None))

    async def _file(self, msg: Msg) -> None:
        tenant = msg.subject.split(".")[1]
        event = orjson.loads(msg.data)
        bundle = self.bundles.snapshot.bundles.get(tenant)
        traced = {"traceparent": msg.headers["traceparent"]} if msg.headers and "traceparent" in msg.headers else {}
        await asyncio.gather(*(
            self.js.publish(bus.delivery_subject(tenant, sub.name), msg.data,
                            headers={"Nats-Msg-Id": f"{event['id']}.{sub.name}", **traced})
            for sub in (bundle.subscriptions if bundle else [])
            if matches(sub, event) and not reserved_host(sub.url)
        ))

    # --- one loop per subscription --------------------------------------------------------------

    async def _reconcile_loops(self, stop: asyncio.Event) -> None:
        bundles = self.bundles.snapshot.bundles
        subs = [(tenant, sub) for tenant, bundle in bundles.items() for sub in bundle.subscriptions]
        # A placeholder URL (the examples' own) is a choice, not a failure: said once as it loads, not per event.
        placeholders = {(tenant, sub.name, sub.url) for tenant, sub in subs if reserved_host(sub.url)}
        for tenant, name, url in placeholders - self._placeholders:
            log.warning("webhook subscription sends nothing: its URL is a reserved example domain", extra={
                "tenant": tenant, "subscription": name, "host": httpx.URL(url).host})
        self._placeholders = placeholders
        wanted: dict[tuple[str, str], CompiledSubscription] = {
            (tenant, sub.name): sub for tenant, sub in subs if not sub.disabled and not reserved_host(sub.url)
        }
        for key in [k for k in self._loops if k not in wanted]:
            self._loops.pop(key).task.cancel()
        for key, sub in wanted.items():
            loop = self._loops.get(key)
            if loop is not None and not loop.task.done():
                loop.sub = sub  # URL, secret or filters may change between attempts
                continue
            state = _Loop(task=None, sub=sub)  # type: ignore[arg-type]
            state.task = asyncio.create_task(self._deliver_loop(key[0], state, stop), name=f"webhooks-{key}")
            self._loops[key] = state

    async def _deliver_loop(self, tenant: str, loop: _Loop, stop: asyncio.Event) -> None:
        name = loop.sub.name
        if self._outcomes is not None:
            # Each at 0 from the start: increase() cannot see a series born at 1, so the first dead
            # letter of a dialer would never raise the alert.
            for outcome in OUTCOMES:
                self._outcomes.labels(tenant, outcome)
        if await self._is_disabled(tenant, loop.sub):
            await asyncio.sleep(1)  # looked at again by the next reconcile
            return
        sub = await self.js.pull_subscribe(
            bus.delivery_subject(tenant, name), durable=f"wh-{tenant}-{name}", stream=bus.WEBHOOKS_STREAM,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=self.timeout + 20, max_deliver=-1),
        )
        # Up to per_subscription posts in flight, each slot refilled as it frees: one slow post
        # holds its own slot, not the others' next deliveries. A slot is the post alone; the record
        # and the ack that follow it run beside the posts, batched with those that finish together,
        # and the next messages are fetched per_subscription or more at a time, not one per freed
        # slot: up to 3 * per_subscription deliveries are posting, settling or waiting for a slot.
        # Its own client, whose pool is its slots: receivers that hang hold this pool, not another
        # subscription's (one shared pool of 100 was full with 25 hanging subscriptions).
        posting = asyncio.Semaphore(self.per_subscription)
        settle = _Together(lambda delivered: self._settle(tenant, loop.sub, delivered))
        in_flight: set[asyncio.Task[str]] = set()
        limits = httpx.Limits(max_connections=self.per_subscription, max_keepalive_connections=self.per_subscription)
        async with httpx.AsyncClient(timeout=self.timeout, follow_redirects=False, limits=limits,
                                     verify=self._tls) as http:
            try:
                while not stop.is_set() and not loop.gone:
                    room = 3 * self.per_subscription - len(in_flight)
                    if room >= self.per_subscription:
                        for msg in await bus.fetch(sub, room, 0.5):
                            in_flight.add(asyncio.create_task(self._deliver(tenant, loop, msg, posting, http, settle)))
                    else:
                        await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                    done = {task for task in in_flight if task.done()}
                    in_flight -= done
                    for task in done:
                        outcome = task.result()  # an error ends the loop, and the next reconcile starts it again
                        if self._outcomes is not None and outcome != "held":
                            self._outcomes.labels(tenant, outcome).inc()
                await asyncio.gather(*in_flight)  # what was started is settled, as a stop finds it
            finally:
                for task in in_flight:
                    task.cancel()

    async def _deliver(self, tenant: str, loop: _Loop, msg: Msg, posting: asyncio.Semaphore,
                       http: httpx.AsyncClient, settle: _Together) -> str:
        sub = loop.sub
        event = orjson.loads(msg.data)
        attempt = msg.metadata.num_delivered
        if attempt > 1 and await self._delivered_before(tenant, sub, event):
            # A 2xx whose ack was lost (its node died as it was sent): the receiver has it already.
            await _ack(msg)
            return "delivered"
        async with posting:
            if loop.gone:  # a 410 came while this one waited for its slot: kept for a new loop
                await bus.hand_back(msg, 0)
                return "held"  # not posted: no outcome to count
            secret = await self.secrets.get(tenant, sub.secret_ref)
            if secret is None:
                error = f"signing secret {sub.secret_ref.name} not readable"
                status = None
            else:
                body = msg.data.decode()
                data = event.get("data") or {}
                with tracing.span("webhook deliver", kind=tracing.SpanKind.CLIENT, context=tracing.extract(msg.headers),
                                  attributes={"call_id": str(data.get("call_id", "")), "tenant": tenant,
                                              "subscription": sub.name, "event_type": str(event.get("type", "")),
                                              "attempt": attempt, "server.address": httpx.URL(sub.url).host}) as span:
                    try:
                        # The traceparent beside the signature, not in it: Standard Webhooks signs
                        # the id, the timestamp and the body only.
                        headers = tracing.outgoing(signing.headers(secret, event["id"], body))
                        resp = await http.post(sub.url, content=body, headers=headers)
                        status, error = resp.status_code, f"HTTP {resp.status_code}"
                        span.set_attribute("http.response.status_code", status)
                    except httpx.HTTPError as exc:
                        status, error = None, described(exc, httpx.URL(sub.url).host)  # its text may quote our headers
                    if status is None or not 200 <= status < 300:
                        tracing.failed(span, error)
        if status is not None and 200 <= status < 300:
            await settle((msg, event, attempt))
            return "delivered"
        if status == 410:
            loop.gone = True
            await self._disable(tenant, sub, "receiver answered 410 Gone")
            await bus.hand_back(msg, 3600)  # kept for when the subscription is re-enabled
            await self._record(tenant, sub, event, "held", attempt, error)
            return "gone"
        if attempt > len(self.schedule):
            await self._dead_letter(tenant, sub, event, attempt, error)
            await msg.ack()
            await self._record(tenant, sub, event, "dead_lettered", attempt, error)
            return "dead_lettered"
        await bus.hand_back(msg, self.schedule[attempt - 1])
        await self._record(tenant, sub, event, "retrying", attempt, error)
        log.info("webhook delivery failed; will retry", extra={
            "tenant": tenant, "subscription": sub.name, "event_id": event["id"], "attempt": attempt,
            "error": error, "retry_in": self.schedule[attempt - 1]})
        return "retry"

    async def _settle(self, tenant: str, sub: CompiledSubscription, delivered: list[tuple[Msg, dict[str, Any], int]]) -> None:
        """Deliveries that got their 2xx: each recorded before its ack, and the record waited for
        (retried), so a redelivery after a lost ack finds it and posts nothing. A confirmed record
        is all that needs, so the ack is a plain one; only where the record could not be written is
        the ack's own confirmation waited for (retried), a lost ack then being a second post."""
        recorded = await asyncio.gather(*(
            self._record(tenant, sub, event, "delivered", attempt, None, retry_for=SETTLE_SECONDS)
            for _, event, attempt in delivered))
        await asyncio.gather(*(
            _ack(msg) if ok else _retried(
                lambda msg=msg: msg.ack_sync(timeout=2), SETTLE_SECONDS,
                "webhook ack not confirmed; a redelivery is posted again",
                {"tenant": tenant, "subscription": sub.name, "event_id": event["id"]})
            for (msg, event, _), ok in zip(delivered, recorded)))

    async def _record(self, tenant: str, sub: CompiledSubscription, event: dict[str, Any], state: str, attempts: int,
                      error: str | None, retry_for: float = 0.0) -> bool:
        """What became of this delivery so far, for the console's view of the call and, once
        delivered, for a redelivery to skip; whether it was written (a failure is only logged)."""
        assert self.deliveries is not None
        record = {"subscription": sub.name, "event_id": event["id"], "event_type": event["type"], "state": state,
                  "attempts": attempts, "last_error": error, "at": time.time()}
        key = bus.delivery_record_key(tenant, event["data"]["call_id"], sub.name, event["id"])
        return await _retried(lambda: self.deliveries.put(key, orjson.dumps(record)), retry_for,  # type: ignore[union-attr]
                              "webhook delivery not recorded",
                              {"tenant": tenant, "subscription": sub.name, "event_id": event["id"]})

    async def _delivered_before(self, tenant: str, sub: CompiledSubscription, event: dict[str, Any]) -> bool:
        """Whether an earlier attempt got a 2xx; unknown (the bucket out of reach) counts as not:
        at least once, and receivers dedupe by webhook-id."""
        assert self.deliveries is not None
        try:
            entry = await self.deliveries.get(
                bus.delivery_record_key(tenant, event["data"]["call_id"], sub.name, event["id"]))
        except (NatsError, asyncio.TimeoutError):
            return False
        return bool(entry.value) and orjson.loads(entry.value).get("state") == "delivered"

    async def _dead_letter(self, tenant: str, sub: CompiledSubscription, event: dict[str, Any], attempts: int,
                           error: str) -> None:
        assert self.dead is not None
        record = {"subscription": sub.name, "event": event, "attempts": attempts, "last_error": error,
                  "failed_at": time.time()}
        await self.dead.put(bus.dead_letter_key(tenant, sub.name, event["id"]), orjson.dumps(record))
        log.warning("webhook delivery dead-lettered", extra={
            "tenant": tenant, "subscription": sub.name, "event_id": event["id"], "error": error})

    async def _disable(self, tenant: str, sub: CompiledSubscription, reason: str) -> None:
        assert self.disabled is not None
        await self.disabled.put(f"{tenant}.{sub.name}", orjson.dumps({"reason": reason, "at": time.time(),
                                                                        "url": sub.url}))
        log.warning("webhook subscription disabled", extra={"tenant": tenant, "subscription": sub.name})

    async def _is_disabled(self, tenant: str, sub: CompiledSubscription) -> bool:
        assert self.disabled is not None
        try:
            entry = await self.disabled.get(f"{tenant}.{sub.name}")
        except (KeyNotFoundError, NotFoundError):
            return False
        # A change of URL is the user's answer to a 410: deliver again.
        return bool(entry.value) and orjson.loads(entry.value).get("url") == sub.url
