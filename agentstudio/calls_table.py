"""The calls table: each ingest process's index of every tenant's calls, a SQLite file projected from
the CALLS stream (each call as accepted) and the calls bucket (each call's state), so that a
listing's page, its counts by status, an export and a bulk cancel read an index instead of walking
the tenant's week of messages.

Why SQLite in each process, not a database server: the stream and the bucket stay the only truth
(the table is derived, rebuilt from them when a process starts and thrown away when it stops), so
there is nothing new to run, back up, migrate or fail over, and a replica never waits on another.
It costs each replica disk (about 1 KiB a call) and a rebuild at start (see the README's figures);
an install that keeps calls past the stream's 7 days would project into Postgres instead.

Reads are as fresh as a scan: a query first waits until both projections have applied everything
the server held when it began (`caught_up`), so a call answered 201 is listed by any replica right
after. Writes run on one thread and queries on others (WAL lets them read while it writes), so the
event loop never waits on SQLite.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from agentstudio import bus, clock
from agentstudio.calls_index import CallFilter, metadata_text

log = logging.getLogger("agentstudio.calls_table")

_SCHEMA = """
CREATE TABLE calls(
    seq INTEGER PRIMARY KEY,        -- where the call was accepted in CALLS: its place in listings
    held INTEGER NOT NULL,          -- its newest message as accepted; the row goes when retention drops it
    tenant TEXT NOT NULL,
    call_id TEXT NOT NULL,
    created REAL NOT NULL,          -- epoch seconds
    workflow TEXT,
    agent TEXT,
    test INTEGER NOT NULL,
    scheduled REAL,                 -- the request's scheduled_for
    state TEXT NOT NULL DEFAULT 'pending',
    waits REAL,                     -- while pending: the latest deferral or retry it waits for
    body BLOB NOT NULL,             -- the message as accepted
    UNIQUE(tenant, call_id));
CREATE INDEX calls_by_tenant ON calls(tenant, seq);
CREATE INDEX calls_by_state ON calls(tenant, state, seq);
CREATE INDEX calls_by_created ON calls(tenant, created);
CREATE TABLE metadata(tenant TEXT, key TEXT, value TEXT, seq INTEGER,
                      PRIMARY KEY(tenant, key, value, seq)) WITHOUT ROWID;
CREATE INDEX metadata_by_seq ON metadata(seq);
-- A state seen before its call (two streams, two projections): applied when the call arrives.
-- One whose call never comes (its message aged out, the state stays in the bucket) goes after an hour.
CREATE TABLE early(tenant TEXT, call_id TEXT, state TEXT, waits REAL, seen REAL,
                   PRIMARY KEY(tenant, call_id)) WITHOUT ROWID;
"""

# A pending call's listing status: scheduled until it is due, then pending (calls_index.status_of).
_DUE = "MAX(IFNULL(scheduled, 0), IFNULL(waits, 0))"
_STATES_KEY_PREFIX = f"$KV.{bus.CALLS_BUCKET}."
_BATCH = 2000  # messages fetched, and applied in one transaction, at a time
FETCH_SECONDS = 5.0  # an idle fetch waits this long, then checks its consumer is still there
# After a batch short of _BATCH, wait this long before fetching again: at moderate rates a fetch
# returns about one call, which then costs a fetch round trip, a hop to the writer thread and a
# transaction of its own. A reader waiting for the table (reach) ends the wait at once.
LINGER_SECONDS = 0.1
CONSUMER_IDLE_SECONDS = 60.0  # the server drops a consumer of a process that died after this
PURGE_SECONDS = 60.0
EARLY_SECONDS = 3600.0


class Behind(TimeoutError):
    """The table has not caught up with the server in time (a process just started on a big week)."""


@dataclass(frozen=True)
class Row:
    seq: int
    call_id: str
    body: bytes


class _Projection:
    """One stream read in order through a pull consumer of our own (fetching is the backpressure:
    nothing arrives faster than it is applied), applied in batches by `apply` on the writer thread.
    A consumer the server lost (a restart) is made again from the last sequence applied."""

    def __init__(self, table: CallsTable, stream: str, subject: str, apply: Any) -> None:
        self.table, self.stream, self.subject, self._apply = table, stream, subject, apply
        self.applied = 0  # the stream sequence of the last message applied
        self.changed = asyncio.Condition()
        self._busy = False  # a fetched batch is being applied
        self._wanted = asyncio.Event()  # a reader waits for what the stream holds: fetch without lingering
        self._task: asyncio.Task[None] | None = None

    def start(self, js: JetStreamContext) -> None:
        self._task = asyncio.create_task(self._follow(js), name=f"calls-table-{self.stream}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _follow(self, js: JetStreamContext) -> None:
        while True:
            name = sub = None
            try:
                info = await js.add_consumer(self.stream, ConsumerConfig(
                    filter_subject=self.subject, deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                    opt_start_seq=self.applied + 1, ack_policy=AckPolicy.NONE, mem_storage=True, num_replicas=1,
                    inactive_threshold=CONSUMER_IDLE_SECONDS))
                name = info.name
                sub = await js.pull_subscribe_bind(stream=self.stream, consumer=name)
                while True:
                    try:
                        batch = await sub.fetch(_BATCH, timeout=FETCH_SECONDS)
                    except TimeoutError:
                        # nats-py's fetch can turn a cancellation into a timeout: honour it here.
                        if (task := asyncio.current_task()) is not None and task.cancelling():
                            raise asyncio.CancelledError from None
                        await js.consumer_info(self.stream, name)  # still there? NotFoundError if not
                        continue
                    await self._applied(batch)
                    if len(batch) < _BATCH:
                        await self._linger()
            except asyncio.CancelledError:
                await asyncio.shield(_forget(js, self.stream, name, sub))
                raise
            except Exception:  # noqa: BLE001 - NATS away or the consumer lost: follow again shortly
                log.warning("calls table: following %s again from %d", self.stream, self.applied + 1, exc_info=True)
                await _forget(js, self.stream, name, sub)
                await asyncio.sleep(1.0)

    async def _applied(self, batch: list[Msg]) -> None:
        self._busy = True
        try:
            await self.table._on_writer(self._apply, batch)
        except sqlite3.Error:  # one bad batch must not stop the index; its calls show as they change
            log.exception("calls table: a batch from %s could not be applied", self.stream)
        finally:
            self._busy = False
        async with self.changed:
            self.applied = max(self.applied, batch[-1].metadata.sequence.stream)
            self.changed.notify_all()

    def hurry(self) -> None:
        """A reader is about to wait for the stream's last message: stop lingering."""
        self._wanted.set()

    async def _linger(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(LINGER_SECONDS):
                await self._wanted.wait()
        self._wanted.clear()

    async def reach(self, js: JetStreamContext, target: int, deadline: float) -> None:
        """Wait until every message up to `target` is applied. The last ones may be gone (deleted or
        aged out), so when nothing arrives the server is asked whether any is left to come."""
        loop = asyncio.get_running_loop()
        while self.applied < target:
            self.hurry()
            left = deadline - loop.time()
            if left <= 0:
                raise Behind(f"the calls index has read {self.stream} up to {self.applied} of {target}")
            before = self.applied
            async with self.changed:
                try:
                    await asyncio.wait_for(self.changed.wait(), timeout=min(left, 0.05))
                except TimeoutError:
                    pass
            if self.applied == before and not self._busy and not await self._more(js, target):
                return

    async def _more(self, js: JetStreamContext, target: int) -> bool:
        try:
            msg = await js.get_msg(self.stream, seq=self.applied + 1, next=True, subject=self.subject, direct=True)
        except NotFoundError:
            return False
        return int(msg.seq or 0) <= target


async def _forget(js: JetStreamContext, stream: str, name: str | None, sub: Any) -> None:
    """Unsubscribe (a draining connection waits for its subscriptions) and delete the consumer."""
    try:
        if sub is not None:
            await sub.unsubscribe()
        if name is not None:
            await js.delete_consumer(stream, name)
    except Exception:  # noqa: BLE001 - the consumer goes by itself after CONSUMER_IDLE_SECONDS
        pass


class CallsTable:
    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        _remove_orphans(folder)
        self.path = folder / f"calls-{os.getpid()}-{id(self):x}.sqlite"
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="calls-table-writer")
        self._readers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="calls-table-reader")
        self._local = threading.local()
        self._write_db: sqlite3.Connection | None = None
        self._calls = _Projection(self, bus.CALLS_STREAM, "calls.>", _apply_calls)
        self._states = _Projection(self, f"KV_{bus.CALLS_BUCKET}", _STATES_KEY_PREFIX + ">", _apply_states)
        self._purger: asyncio.Task[None] | None = None
        self._js: JetStreamContext | None = None
        self._opened: list[sqlite3.Connection] = []

    async def start(self, js: JetStreamContext) -> None:
        self._js = js
        await self._on_writer(_create, [])
        self._calls.start(js)
        self._states.start(js)
        self._purger = asyncio.create_task(self._purge_aged(), name="calls-table-purge")

    async def stop(self) -> None:
        if self._purger is not None:
            self._purger.cancel()
        await self._calls.stop()
        await self._states.stop()
        self._writer.submit(self._close_writer).result()
        self._writer.shutdown()
        self._readers.shutdown()
        for db in self._opened:
            db.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)

    # --- writing ----------------------------------------------------------------------------

    async def _on_writer(self, fn: Any, batch: list[Msg]) -> None:
        await asyncio.get_running_loop().run_in_executor(self._writer, self._run_write, fn, batch)

    def _run_write(self, fn: Any, batch: list[Msg]) -> None:
        if self._write_db is None:
            self._write_db = _connect(self.path)
        with self._write_db:  # one transaction per batch
            fn(self._write_db, batch)

    def _close_writer(self) -> None:
        if self._write_db is not None:
            self._write_db.close()

    async def _purge_aged(self) -> None:
        """Rows whose message retention removed go too: the listing holds what the stream holds."""
        while True:
            await asyncio.sleep(PURGE_SECONDS)
            try:
                assert self._js is not None
                first = int((await self._js.stream_info(bus.CALLS_STREAM)).state.first_seq)
                await self._on_writer(_purge_below, [first])  # type: ignore[list-item]
            except Exception:  # noqa: BLE001 - tried again in a minute
                log.warning("calls table: could not purge aged calls", exc_info=True)

    # --- reading ----------------------------------------------------------------------------

    async def caught_up(self, js: JetStreamContext, timeout: float = 10.0) -> int:
        """Wait until the table holds everything the server held when this was called; returns the
        CALLS sequence just above it (a snapshot bound for reads that take a while)."""
        calls, states = await asyncio.gather(js.stream_info(bus.CALLS_STREAM),
                                             js.stream_info(f"KV_{bus.CALLS_BUCKET}"))
        deadline = asyncio.get_running_loop().time() + timeout
        self._calls.hurry()
        self._states.hurry()  # while the calls are reached, not after
        await self._calls.reach(js, int(calls.state.last_seq), deadline)
        await self._states.reach(js, int(states.state.last_seq), deadline)
        return int(calls.state.last_seq) + 1

    async def rows(self, tenant: str, which: CallFilter, below: int | None, limit: int) -> list[Row]:
        """Up to `limit` of the tenant's calls passing `which` (statuses as the table has them)
        below sequence `below`, newest first."""
        where, args = _where(tenant, which, below)
        sql = f"SELECT seq, call_id, body FROM calls WHERE {where} ORDER BY seq DESC LIMIT ?"
        return [Row(*row) for row in await self._query(sql, [*args, limit])]

    async def counts(self, tenant: str, which: CallFilter) -> dict[str, int]:
        """The tenant's calls passing `which` apart from its statuses, by listing status."""
        where, args = _where(tenant, replace(which, statuses=frozenset()), None)
        by_state = await self._query(f"SELECT state, COUNT(*) FROM calls WHERE {where} GROUP BY state", args)
        counts = dict(by_state)
        if counts.get("pending"):
            (waiting,), = await self._query(
                f"SELECT COUNT(*) FROM calls WHERE {where} AND state = 'pending' AND {_DUE} > ?",
                [*args, clock.now().timestamp()])
            if waiting:
                counts["scheduled"] = waiting
                counts["pending"] -= waiting
                if not counts["pending"]:
                    del counts["pending"]
        return counts

    async def metadata_keys(self, tenant: str, which: CallFilter, below: int) -> list[str]:
        """Every metadata key of the calls below `below` passing `which`, sorted."""
        where, args = _where(tenant, which, below)
        sql = (f"SELECT DISTINCT key FROM metadata WHERE tenant = ? AND seq IN"
               f" (SELECT seq FROM calls WHERE {where}) ORDER BY key")
        return [key for key, in await self._query(sql, [tenant, *args])]

    async def _query(self, sql: str, args: list[Any]) -> list[tuple[Any, ...]]:
        return await asyncio.get_running_loop().run_in_executor(self._readers, self._read, sql, args)

    def _read(self, sql: str, args: list[Any]) -> list[tuple[Any, ...]]:
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = _connect(self.path)
            self._opened.append(db)
        return db.execute(sql, args).fetchall()


def _where(tenant: str, which: CallFilter, below: int | None) -> tuple[str, list[Any]]:
    """SQL conditions (and their arguments) for the tenant's calls passing `which` below `below`."""
    parts, args = ["tenant = ?"], [tenant]
    if below is not None:
        parts.append("seq < ?")
        args.append(below)
    if which.workflow_slug is not None:
        parts.append("workflow = ?")
        args.append(which.workflow_slug)
    if which.agent_slug is not None:
        parts.append("agent = ?")
        args.append(which.agent_slug)
    if which.test is not None:
        parts.append("test = ?")
        args.append(int(which.test))
    if which.created_after is not None:
        parts.append("created >= ?")
        args.append(which.created_after.timestamp())
    if which.created_before is not None:
        parts.append("created < ?")
        args.append(which.created_before.timestamp())
    for key, values in sorted(which.metadata.items()):
        marks = ", ".join("?" * len(values))
        parts.append(f"seq IN (SELECT seq FROM metadata WHERE tenant = ? AND key = ? AND value IN ({marks}))")
        args += [tenant, key, *sorted(values)]
    if which.statuses:
        either, now = [], clock.now().timestamp()
        settled = sorted(which.statuses - {"pending", "scheduled"})
        if settled:
            either.append(f"state IN ({', '.join('?' * len(settled))})")
            args += settled
        if "pending" in which.statuses:
            either.append(f"(state = 'pending' AND {_DUE} <= ?)")
            args.append(now)
        if "scheduled" in which.statuses:
            either.append(f"(state = 'pending' AND {_DUE} > ?)")
            args.append(now)
        parts.append("(" + " OR ".join(either) + ")")
    return " AND ".join(parts), args


# --- the writer thread's work --------------------------------------------------------------------


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = OFF")  # derived data: a crash rebuilds it, so no fsync is owed
    db.execute("PRAGMA temp_store = MEMORY")
    db.isolation_level = "DEFERRED"
    return db


def _create(db: sqlite3.Connection, _: list[Msg]) -> None:
    db.executescript(_SCHEMA)


def _each(apply: Callable[[sqlite3.Connection, Msg], None]) -> Callable[[sqlite3.Connection, list[Msg]], None]:
    """A batch applied a message at a time. One that cannot be read (not JSON, or JSON without a
    call's fields) is skipped and said: raised, it would stop the table on that message for good,
    the projection starting again from it every second, and every listing answer 503."""
    def each(db: sqlite3.Connection, batch: list[Msg]) -> None:
        for msg in batch:
            try:
                apply(db, msg)
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                log.warning("calls table: skipped a message it cannot read",
                            extra={"subject": msg.subject, "error": type(exc).__name__})
    return each


@_each
def _apply_calls(db: sqlite3.Connection, msg: Msg) -> None:
    _, tenant, kind, _call_id = msg.subject.split(".", 3)
    if kind not in ("dispatch", "schedule") or not msg.data:
        return
    call = orjson.loads(msg.data)
    if call.get("requeued"):
        return  # a call is listed where it was accepted, once (calls_index.find)
    seq = msg.metadata.sequence.stream
    added = db.execute(
        "INSERT OR IGNORE INTO calls(seq, held, tenant, call_id, created, workflow, agent, test, scheduled, body)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (seq, seq, tenant, call["call_id"], _epoch(call["created_at"]), call.get("workflow_slug"),
         call.get("agent_slug"), int(bool(call.get("test"))), _epoch(call.get("scheduled_for")), msg.data),
    ).rowcount
    if not added:  # the scheduled call's move to its dispatch subject: the same call, held longer
        db.execute("UPDATE calls SET held = ? WHERE tenant = ? AND call_id = ?", (seq, tenant, call["call_id"]))
        return
    db.executemany("INSERT OR IGNORE INTO metadata VALUES (?, ?, ?, ?)",
                   [(tenant, key, metadata_text(value), seq) for key, value in call.get("metadata", {}).items()])
    early = db.execute("DELETE FROM early WHERE tenant = ? AND call_id = ? RETURNING state, waits",
                       (tenant, call["call_id"])).fetchone()
    if early is not None:
        db.execute("UPDATE calls SET state = ?, waits = ? WHERE seq = ?", (*early, seq))


@_each
def _apply_states(db: sqlite3.Connection, msg: Msg) -> None:
    tenant, call_id = msg.subject[len(_STATES_KEY_PREFIX):].split(".", 1)
    operation = (msg.headers or {}).get("KV-Operation")
    state, waits = ("pending", None) if operation in ("DEL", "PURGE") or not msg.data else _state(msg.data)
    if not db.execute("UPDATE calls SET state = ?, waits = ? WHERE tenant = ? AND call_id = ?",
                      (state, waits, tenant, call_id)).rowcount:
        db.execute("INSERT OR REPLACE INTO early VALUES (?, ?, ?, ?, ?)",
                   (tenant, call_id, state, waits, time.time()))


def _state(data: bytes) -> tuple[str, float | None]:
    """A state's status and, while pending, the latest deferral or retry it waits for."""
    state = orjson.loads(data)
    status = state.get("status", "pending")
    if status != "pending":
        return status, None
    waits = [_epoch(d["until"]) for d in state.get("deferrals") or ()]
    if state.get("next_attempt_at"):
        waits.append(_epoch(state["next_attempt_at"]))
    return status, max(waits, default=None)


def _purge_below(db: sqlite3.Connection, first: list[int]) -> None:
    # held >= seq, so the primary key bounds the search to the rows older than the stream's first.
    gone = [seq for seq, in db.execute("SELECT seq FROM calls WHERE seq < ? AND held < ?", first * 2)]
    db.execute("DELETE FROM early WHERE seen < ?", (time.time() - EARLY_SECONDS,))
    for chunk in _chunks(gone, 500):
        marks = ", ".join("?" * len(chunk))
        db.execute(f"DELETE FROM metadata WHERE seq IN ({marks})", chunk)
        db.execute(f"DELETE FROM calls WHERE seq IN ({marks})", chunk)


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _epoch(text: str | None) -> float | None:
    return None if text is None else datetime.fromisoformat(text).timestamp()


def _remove_orphans(folder: Path) -> None:
    """Tables of processes that died without stopping (calls-<pid>-…): nothing reads them again."""
    for path in folder.glob("calls-*.sqlite*"):
        pid = path.name.split("-")[1]
        if pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists():
            path.unlink(missing_ok=True)
