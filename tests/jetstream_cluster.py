"""What a JetStream cluster's leaders say of their streams and consumers, for the fault tests and
bench/cluster.py."""

from __future__ import annotations

import asyncio
import time

from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import ClusterInfo


async def leader_of(js: JetStreamContext, stream: str) -> str:
    """The server leading `stream`, once one is elected (asked of any node that answers)."""
    while True:
        try:
            info = await js.stream_info(stream)
            if info.cluster is not None and info.cluster.leader:
                return info.cluster.leader
        except (NatsError, asyncio.TimeoutError):
            pass
        await asyncio.sleep(0.05)


async def lagging(js: JetStreamContext) -> list[str]:
    """Streams and consumers with no leader or with a replica not current (or offline), as their
    leaders see it; a node healthy by /healthz may still be catching a consumer up."""
    try:
        found: list[str] = []
        for stream in await js.streams_info():
            infos: list[tuple[str, ClusterInfo | None]] = [(stream.config.name, stream.cluster)]
            infos += [(f"{stream.config.name} > {c.name}", c.cluster) for c in await js.consumers_info(stream.config.name)]
            found += [name for name, cluster in infos if cluster is None or not cluster.leader
                      or any(not r.current or r.offline for r in cluster.replicas or [])]
        return found
    except (NatsError, asyncio.TimeoutError) as exc:
        return [type(exc).__name__]


async def every_replica_current(js: JetStreamContext, seconds: float = 60) -> float:
    """Wait until every replica of every stream and consumer is current; the seconds it took."""
    started = time.monotonic()
    behind: list[str] = []
    try:
        async with asyncio.timeout(seconds):
            while behind := await lagging(js):
                await asyncio.sleep(0.2)
    except TimeoutError:
        raise AssertionError(f"replicas not current within {seconds} s: {behind}") from None
    return time.monotonic() - started
