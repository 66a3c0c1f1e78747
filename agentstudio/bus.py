"""NATS names and set-up: every subject, stream and KV bucket the roles share, in one place.

Subjects:
  calls.<tenant>.dispatch.<call_id>   one message per accepted call (stream CALLS); the message is
                                      also the call's request record, read back by subject.
  calls.<tenant>.dead.<call_id>       calls that exhausted their deliveries (stream CALLS)
  calls.<tenant>.events.<call_id>     call status events for webhooks (stream CALL_EVENTS)
  webhooks.<tenant>.<subscription>    deliveries owed to one subscription (stream WEBHOOKS)
  voicemail.<tenant>.<call_id>        a machine answered the call: Twilio's verdict, checked by ingest,
                                      for a dialer to redirect the call (work-queue stream VOICEMAIL)
  transcripts.<tenant>.<call_id>.<attempt>  an attempt's transcript, in chunks of turns (stream
                                      TRANSCRIPTS); the call's record keeps only how many turns there are
KV buckets:
  as-bundles     key <tenant> → head of its config bundle: which body is current (ingest and
                 dialers watch it; its revision is the bundle's version)
  as-ratelimit   key <tenant>.<apikey>.<minute> → requests leased in that minute (expires by TTL)
  as-usage       key <tenant>.<apikey> → request counts and last use of an ApiKey
  as-calls       key <tenant>.<call_id> → the call's state, timeline and result
  as-concurrency key <tenant> → calls holding one of the tenant's concurrent-call slots
  as-webhook-dead      key <tenant>.<subscription>.<event_id> → a delivery that exhausted its retries
  as-webhook-disabled  key <tenant>.<subscription> → the receiver answered 410 Gone
  as-webhook-deliveries key <tenant>.<call_id>.<subscription>.<event_id> → that delivery's state and
                 attempts so far (the console's per-call view; kept for the call retention)
  as-console-sessions  key <sha256 of the session token> → a console session: tenant, key digest
  as-dnc         key <tenant>.<E.164 digits> → a number never to call: when, from where, why
  as-frequency   key <tenant>.<E.164 digits> → the number's recent placements, for frequency caps
                 (expires by TTL, the longest window a cap may count)
  as-dialers     key <dialer name> → its heartbeat (a counter); one left unchanged for a lease is gone
Object stores:
  as-bundle-bodies  object <tenant>/<id> → one compiled config bundle, chunked, so it may exceed
                    the 1 MiB a message may carry
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import orjson

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

log = logging.getLogger("agentstudio.bus")

CALLS_STREAM = "CALLS"
EVENTS_STREAM = "CALL_EVENTS"
CALLS_BUCKET = "as-calls"
WEBHOOKS_STREAM = "WEBHOOKS"
VOICEMAIL_STREAM = "VOICEMAIL"
TRANSCRIPTS_STREAM = "TRANSCRIPTS"
DEAD_LETTER_BUCKET = "as-webhook-dead"
DISABLED_BUCKET = "as-webhook-disabled"
CONCURRENCY_BUCKET = "as-concurrency"
BUNDLES_BUCKET = "as-bundles"
BUNDLE_BODIES_BUCKET = "as-bundle-bodies"
RATELIMIT_BUCKET = "as-ratelimit"
USAGE_BUCKET = "as-usage"
DNC_BUCKET = "as-dnc"
DELIVERIES_BUCKET = "as-webhook-deliveries"
CONSOLE_SESSIONS_BUCKET = "as-console-sessions"
FREQUENCY_BUCKET = "as-frequency"
DIALERS_BUCKET = "as-dialers"

DAY = 24 * 3600
# Idempotency-Key retries dedupe on Nats-Msg-Id inside this window; the stream keeps messages at
# least as long, so the de-duplication survives a server restart.
IDEMPOTENCY_WINDOW = DAY
CALL_RETENTION = 7 * DAY


def dispatch_subject(tenant: str, call_id: str) -> str:
    return f"calls.{tenant}.dispatch.{call_id}"


DISPATCH_ALL = "calls.*.dispatch.*"
# The durable pull consumer every dialer takes dispatches from (one for all tenants).
DISPATCH_CONSUMER = "dialer"


def schedule_subject(tenant: str, call_id: str) -> str:
    """Where a scheduled call waits; the server moves it to its dispatch subject when it is due."""
    return f"calls.{tenant}.schedule.{call_id}"


def dead_subject(tenant: str, call_id: str) -> str:
    return f"calls.{tenant}.dead.{call_id}"


def event_subject(tenant: str, call_id: str) -> str:
    return f"calls.{tenant}.events.{call_id}"


EVENTS_ALL = "calls.*.events.*"


# Replicas asked for by a connection's owner (AGENTSTUDIO_NATS_REPLICAS), by connection.
_replicas_asked: weakref.WeakKeyDictionary[NATS, int] = weakref.WeakKeyDictionary()
CLUSTER_REPLICAS = 3  # JetStream's advice: R3 survives the loss of one node, R5 of two


def replicas(js: JetStreamContext) -> int:
    """How many copies every stream and bucket we create keeps: as asked at connect, else
    CLUSTER_REPLICAS on a cluster (fewer if it has fewer nodes) and 1 on a lone server.

    The server says both in the INFO it greets a client with: `cluster` names the cluster it is in
    and `connect_urls` lists every node's client URL (a cluster that hides them, no_advertise, is
    taken to have CLUSTER_REPLICAS nodes)."""
    nc: NATS = js._nc  # nats-py keeps no public handle from a context to its connection
    if asked := _replicas_asked.get(nc):
        return asked
    info = nc._server_info  # no public accessor either; it is the server's INFO as sent
    if not info.get("cluster"):
        return 1
    return min(CLUSTER_REPLICAS, len(info.get("connect_urls") or []) or CLUSTER_REPLICAS)


async def hand_back(msg: Msg, delay: float) -> None:
    """Redeliver `msg` after `delay`; if even that cannot reach NATS (a nak sent while the client
    reconnects raises), its ack wait redelivers it."""
    try:
        await msg.nak(delay=delay)
    except nats.errors.Error:
        pass


async def connect(
    servers: str,
    name: str,
    *,
    auth: Mapping[str, str] = {},
    connect_timeout: float = 2.0,
    on_reconnect: Callable[[], Awaitable[None]] | None = None,
    replicas: int = 0,
) -> NATS:
    """Connect and keep reconnecting forever: a role outlives NATS restarts.

    `servers` is one URL or several, comma-separated (every node of a cluster, so the first
    connection does not depend on one node). `on_reconnect` runs after each reconnection: a
    restarted server has forgotten every ephemeral consumer (KV watchers among them), so their
    owners must subscribe again. `replicas`, when not 0, is what `replicas()` answers for it.
    """
    reconnected = _log_event("reconnected")

    async def reconnected_cb() -> None:
        await reconnected()
        if on_reconnect is not None:
            await on_reconnect()

    nc = await nats.connect(
        [url.strip() for url in servers.split(",") if url.strip()],
        name=name,
        connect_timeout=connect_timeout,
        reconnect_time_wait=0.25,
        max_reconnect_attempts=-1,
        allow_reconnect=True,
        # Publishes made while disconnected must fail, not wait in a buffer: ingest answers 503.
        pending_size=0,
        error_cb=_log_error,
        disconnected_cb=_log_event("disconnected"),
        reconnected_cb=reconnected_cb,
        **auth,  # type: ignore[arg-type]
    )
    if replicas:
        _replicas_asked[nc] = replicas
    return nc


async def connect_retrying(
    servers: str,
    name: str,
    attempts: int = 40,
    on_reconnect: Callable[[], Awaitable[None]] | None = None,
    auth: Mapping[str, str] = {},
    replicas: int = 0,
) -> NATS:
    """Connect, retrying while NATS starts (pods start in any order)."""
    for attempt in range(attempts):
        try:
            return await connect(servers, name, auth=auth, on_reconnect=on_reconnect, replicas=replicas)
        except (OSError, nats.errors.NoServersError, asyncio.TimeoutError):
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(min(0.25 * (attempt + 1), 2.0))
    raise AssertionError("unreachable")


async def _log_error(exc: Exception) -> None:
    log.warning("nats error: %s", exc)


def _log_event(what: str):  # noqa: ANN202 - nats callback factory
    async def callback() -> None:
        log.info("nats %s", what)

    return callback


async def fetch(sub: JetStreamContext.PullSubscription, batch: int, timeout: float) -> list[Msg]:
    """The next messages of a pull subscription; none when none came in time or NATS is away
    (the client reconnects by itself), so consumer loops need no error handling of their own."""
    try:
        return await sub.fetch(batch=batch, timeout=timeout)
    except (nats.errors.TimeoutError, asyncio.TimeoutError):  # nats-py raises either when nothing came
        return []
    except nats.errors.Error as exc:
        log.warning("fetch failed; retrying", extra={"error": type(exc).__name__})
        await asyncio.sleep(1)
        return []


async def ensure_calls_stream(js: JetStreamContext) -> None:
    await _ensure_kept_stream(js, CALLS_STREAM, ["calls.*.dispatch.*", "calls.*.dead.*", "calls.*.schedule.*"],
                              discard=DiscardPolicy.OLD, allow_direct=True, allow_msg_schedules=True)


async def ensure_events_stream(js: JetStreamContext) -> None:
    # An event id is published once however often its transition is re-driven.
    await _ensure_kept_stream(js, EVENTS_STREAM, [EVENTS_ALL])


def transcript_subject(tenant: str, call_id: str, attempt: int) -> str:
    return f"transcripts.{tenant}.{call_id}.{attempt}"


async def ensure_transcripts_stream(js: JetStreamContext) -> None:
    # Direct gets: a finished call's transcript is one message read by any replica (transcripts.filled).
    await _ensure_kept_stream(js, TRANSCRIPTS_STREAM, ["transcripts.*.*.*"], allow_direct=True)


def voicemail_subject(tenant: str, call_id: str) -> str:
    return f"voicemail.{tenant}.{call_id}"


VOICEMAIL_ALL = "voicemail.*.*"


async def ensure_voicemail_stream(js: JetStreamContext) -> None:
    """A work queue: a verdict is gone once a dialer acked it. One a dialer never got to within a day
    is past use (the longest call Twilio allows is 4 h) and expires."""
    await _add_or_update(js, StreamConfig(
        name=VOICEMAIL_STREAM,
        subjects=[VOICEMAIL_ALL],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        num_replicas=replicas(js),
        max_age=DAY,
        duplicate_window=DAY,  # a verdict Twilio sends again is queued once
    ))


def delivery_subject(tenant: str, subscription: str) -> str:
    return f"webhooks.{tenant}.{subscription}"


def dead_letter_key(tenant: str, subscription: str, event_id: str) -> str:
    return f"{tenant}.{subscription}.{event_id}"


async def ensure_webhooks(js: JetStreamContext) -> tuple[KeyValue, KeyValue]:
    """The WEBHOOKS stream, and the dead-letter and disabled-subscription buckets."""
    await _ensure_kept_stream(js, WEBHOOKS_STREAM, ["webhooks.*.*"])
    return (await _bucket(js, DEAD_LETTER_BUCKET, history=1, ttl=None),
            await _bucket(js, DISABLED_BUCKET, history=1, ttl=None))


def delivery_record_key(tenant: str, call_id: str, subscription: str, event_id: str) -> str:
    return f"{tenant}.{call_id}.{subscription}.{event_id}"


async def deliveries_bucket(js: JetStreamContext) -> KeyValue:
    return await _bucket(js, DELIVERIES_BUCKET, history=1, ttl=CALL_RETENTION)


async def console_sessions_bucket(js: JetStreamContext, ttl: float) -> KeyValue:
    """Sessions expire with the bucket's TTL (set when it is created) and by their own expiry."""
    return await _bucket(js, CONSOLE_SESSIONS_BUCKET, history=1, ttl=ttl)


async def kv_keys(js: JetStreamContext, bucket: str, prefix: str) -> list[str]:
    """Keys of `bucket` under `prefix` (tokens, e.g. "<tenant>."), read from the stream's subject
    index: exact at the moment asked, unlike a watch that races with writers. Deleted keys may be
    included; their get raises KeyNotFoundError. At most 100,000 (the server's limit for one answer):
    for small buckets and narrow prefixes; `kv_values` reads a whole big one."""
    base = f"$KV.{bucket}."
    info = await js.stream_info(f"KV_{bucket}", subjects_filter=f"{base}{prefix}>")
    return sorted(subject[len(base):] for subject in (info.state.subjects or {}))


async def kv_values(js: JetStreamContext, bucket: str, batch: int = 512) -> AsyncIterator[tuple[str, bytes]]:
    """Every key of `bucket` with its value, in one pass over the bucket's stream: a consumer of our own
    delivering the last message of each key, fetched in batches, where a get per key costs a round trip
    each and `kv_keys` lists at most the server's 100,000 subjects. Deleted keys are left out; a key
    written while the pass runs may come twice, with its value before that write and then after it
    (the last one counts)."""
    last = _kv_pass(js, bucket, "", batch, deliver_policy=DeliverPolicy.LAST_PER_SUBJECT)
    async with contextlib.aclosing(last) as found:
        async for key, value, _ in found:
            yield key, value


async def kv_after(js: JetStreamContext, bucket: str, prefix: str, after: int = 0,
                   batch: int = 512) -> AsyncIterator[tuple[str, bytes, int]]:
    """The keys of a history-1 `bucket` under `prefix` written after stream sequence `after`, each with
    its value and revision, in the order they were last written: a consumer filtered to the prefix and
    starting past `after`, so reading a page of them costs about the page, not the whole prefix nor a
    get per key. Deleted keys are left out. Stop early with `contextlib.aclosing`, which ends the consumer."""
    start = {"deliver_policy": DeliverPolicy.BY_START_SEQUENCE, "opt_start_seq": after + 1} if after else {
        "deliver_policy": DeliverPolicy.ALL}
    async with contextlib.aclosing(_kv_pass(js, bucket, prefix, batch, **start)) as found:
        async for one in found:
            yield one


async def _kv_pass(js: JetStreamContext, bucket: str, prefix: str, batch: int,
                   **start: Any) -> AsyncIterator[tuple[str, bytes, int]]:
    """Keys under `prefix` with their values and revisions, from a consumer of our own starting at `start`
    (callers close it with aclosing, so the consumer is deleted when they stop, not when collected)."""
    stream = f"KV_{bucket}"
    info = await js.add_consumer(stream, ConsumerConfig(
        filter_subject=f"$KV.{bucket}.{prefix}>", ack_policy=AckPolicy.NONE, mem_storage=True, num_replicas=1,
        inactive_threshold=60.0, **start))
    sub = await js.pull_subscribe_bind(stream=stream, consumer=info.name)
    skip = len(f"$KV.{bucket}.")
    try:
        left = info.num_pending
        while left > 0:
            try:
                msgs = await sub.fetch(min(batch, left), timeout=5.0)
            except nats.errors.TimeoutError:
                # Nothing came: what was pending is gone (aged out, deleted), or the server is away
                # and a quiet end would pass a part for the whole. Its answer tells (or raises).
                left = (await js.consumer_info(stream, info.name)).num_pending
                continue
            for msg in msgs:
                left = msg.metadata.num_pending  # counts writes since the start too: read them as well
                if msg.data:  # a delete, purge or expiry marker has none
                    yield msg.subject[skip:], msg.data, msg.metadata.sequence.stream
    finally:
        with contextlib.suppress(nats.errors.Error):  # else gone with its inactivity threshold
            await sub.unsubscribe()
            await js.delete_consumer(stream, info.name)


async def kv_remove(js: JetStreamContext, bucket: str, key: str, revision: int) -> None:
    """Remove `key` of a history-1 `bucket` as of `revision`, leaving no delete marker (markers would
    pile up in a bucket without a TTL and be read past by every `kv_after`). A value written after
    `revision` stays."""
    await js.purge_stream(f"KV_{bucket}", seq=revision + 1, subject=f"$KV.{bucket}.{key}")


async def calls_bucket(js: JetStreamContext) -> KeyValue:
    # Kept as long as the calls' requests (the CALLS stream): a record outlives its call's last change
    # by the retention, and no call waits longer than that between changes (MAX_SCHEDULE_AHEAD).
    return await _bucket(js, CALLS_BUCKET, history=1, ttl=CALL_RETENTION)


async def concurrency_bucket(js: JetStreamContext) -> KeyValue:
    return await _bucket(js, CONCURRENCY_BUCKET, history=1, ttl=None)


async def _ensure_kept_stream(js: JetStreamContext, name: str, subjects: list[str], **extra: object) -> None:
    """A file-stored stream that keeps messages for the call retention and de-duplicates message
    ids for the idempotency window: what every stream of calls, events and deliveries needs."""
    await _add_or_update(js, StreamConfig(
        name=name,
        subjects=subjects,
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        num_replicas=replicas(js),
        max_age=CALL_RETENTION,
        duplicate_window=IDEMPOTENCY_WINDOW,
        **extra,  # type: ignore[arg-type]
    ))


async def _add_or_update(js: JetStreamContext, config: StreamConfig) -> None:
    try:
        await js.add_stream(config)
    except nats.js.errors.BadRequestError:
        await js.update_stream(config)


async def bundles_bucket(js: JetStreamContext) -> KeyValue:
    return await _bucket(js, BUNDLES_BUCKET, history=5, ttl=None)


async def bundle_bodies_bucket(js: JetStreamContext) -> ObjectStore:
    try:
        store = await js.object_store(BUNDLE_BODIES_BUCKET)
    except BucketNotFoundError:
        try:
            return await js.create_object_store(BUNDLE_BODIES_BUCKET, replicas=replicas(js))
        except nats.js.errors.BadRequestError:
            return await js.object_store(BUNDLE_BODIES_BUCKET)  # another process created it first
    await _keep_config(js, f"OBJ_{BUNDLE_BODIES_BUCKET}")
    return store


async def ratelimit_bucket(js: JetStreamContext) -> KeyValue:
    return await _bucket(js, RATELIMIT_BUCKET, history=1, ttl=180)


async def usage_bucket(js: JetStreamContext) -> KeyValue:
    return await _bucket(js, USAGE_BUCKET, history=1, ttl=None)


async def dnc_bucket(js: JetStreamContext) -> KeyValue:
    return await _bucket(js, DNC_BUCKET, history=1, ttl=None)


async def frequency_bucket(js: JetStreamContext, ttl: float) -> KeyValue:
    """`ttl` is the longest window a cap may count over (calling_hours.MAX_CAP_WINDOW): a number's record
    is written with each placement, so it expires only once its last placement has left every window."""
    return await _bucket(js, FREQUENCY_BUCKET, history=1, ttl=ttl)


async def dialers_bucket(js: JetStreamContext) -> KeyValue:
    """Each dialer's heartbeat under its name; a day's TTL only clears the names of dialers long gone."""
    return await _bucket(js, DIALERS_BUCKET, history=1, ttl=DAY)


async def update_json(kv: KeyValue, key: str, fn: Callable[[Any], Any]) -> None:
    """Change the JSON value at `key` by compare-and-set: `fn` gets the value ({} when absent) and
    returns the new one, or None to leave it; it is applied again to whatever a concurrent writer
    left until the write wins. An exception from `fn` ends the attempt and is raised."""
    while True:
        try:
            entry = await kv.get(key)
            value, revision = orjson.loads(entry.value or b"{}"), entry.revision
        except KeyNotFoundError:
            value, revision = {}, None
        changed = fn(value)
        if changed is None:
            return
        try:
            if revision is None:
                await kv.create(key, orjson.dumps(changed))
            else:
                await kv.update(key, orjson.dumps(changed), last=revision)
            return
        except KeyWrongLastSequenceError:
            continue


class BatchedChanges:
    """Compare-and-set changes of a KV key's JSON value made in one process go together: those that
    arrive while the key's write is under way wait for it, then are applied in order in the next
    one (update_json), each getting its own answer. A key many tasks change at once (a tenant's
    slots, its pace) costs one read and one write per batch instead of per change, and the tasks of
    one process no longer fail each other's compare-and-set."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv
        self._waiting: dict[str, list[tuple[Callable[[Any], tuple[Any, Any]], asyncio.Future[Any]]]] = {}
        self._writing: dict[str, asyncio.Task[None]] = {}

    async def change(self, key: str, fn: Callable[[Any], tuple[Any, Any]]) -> Any:
        """`fn` gets the value ({} when absent) and returns (the new value or None to leave it, its
        answer); the answer is returned once the batch's write has won."""
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, []).append((fn, done))
        if key not in self._writing:
            self._writing[key] = asyncio.create_task(self._write(key))
        return await done

    async def _write(self, key: str) -> None:
        try:
            while batch := self._waiting.pop(key, []):
                answers: list[Any] = []

                def apply(value: Any) -> Any:
                    answers.clear()  # applied again to what a concurrent writer left
                    changed = False
                    for fn, _ in batch:
                        after, answer = fn(value)
                        answers.append(answer)
                        if after is not None:
                            value, changed = after, True
                    return value if changed else None

                try:
                    await update_json(self._kv, key, apply)
                except Exception as exc:  # noqa: BLE001 - each change of the batch raises it
                    for _, done in batch:
                        if not done.done():
                            done.set_exception(exc)
                    continue
                for (_, done), answer in zip(batch, answers):
                    if not done.done():
                        done.set_result(answer)
        finally:
            del self._writing[key]


async def _bucket(js: JetStreamContext, name: str, history: int, ttl: float | None) -> KeyValue:
    try:
        kv = await js.key_value(name)
    except BucketNotFoundError:
        try:
            return await js.create_key_value(bucket=name, history=history, ttl=ttl, direct=True,
                                             replicas=replicas(js))
        except nats.js.errors.BadRequestError:
            return await js.key_value(name)  # another process created it first
    await _keep_config(js, f"KV_{name}", ttl)
    return kv


async def _keep_config(js: JetStreamContext, stream: str, ttl: float | None = None) -> None:
    """A bucket made with another replica count (the setting changed, a lone server grown into a
    cluster) or another TTL (an older version's) is moved to what is asked now, as the streams are:
    JetStream adds or drops copies in place, keeping what the bucket holds."""
    config = (await js.stream_info(stream)).config
    if config.num_replicas != replicas(js) or (config.max_age or 0) != (ttl or 0):
        config.num_replicas, config.max_age = replicas(js), ttl
        if ttl and (config.duplicate_window or 0) > ttl:  # JetStream refuses a window past the max age
            config.duplicate_window = ttl
        await js.update_stream(config)
