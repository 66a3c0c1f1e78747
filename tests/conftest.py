"""Real servers for the tests: a nats-server with JetStream on a free loopback port, and ingest apps
wired to it. Each test gets its own tenant (namespace) so tests never see each other's calls."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from agentstudio import bundle_store, bus, keys
from agentstudio.bundle import Bundle, KeyMaterial, compile_bundle
from agentstudio.ingest.app import create_app
from agentstudio.ingest.service import IngestService
from agentstudio.manifests import Located, load_dir, parse
from agentstudio.natsserver import NatsServer
from agentstudio.settings import Settings
from node_fixtures import node  # noqa: F401 - the session's real single-node cluster
from processes import pytest_runtest_makereport, pytest_runtest_setup  # noqa: F401 - hooks: failures show process output
from twilio_mock import TwilioMock

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path_factory.mktemp("nats"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def twilio_mock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwilioMock]:
    """Prism serving Twilio's own spec behind a recording shim (started on first use)."""
    with TwilioMock(log_file=tmp_path_factory.mktemp("twilio") / "prism.log") as mock:
        yield mock


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[NATS]:
    conn = await bus.connect(nats_server.url, "tests")
    yield conn
    await conn.close()


@pytest.fixture
async def js(nc: NATS) -> JetStreamContext:
    jsc = nc.jetstream()
    await bus.ensure_calls_stream(jsc)
    return jsc


@dataclass
class Tenant:
    """One namespace's manifests, its plaintext keys, and a way to (re)publish its bundle."""

    name: str
    js: JetStreamContext = field(repr=False)
    resources: list[Located] = field(repr=False)
    keys: dict[str, str] = field(default_factory=dict, repr=False)
    bundle: Bundle | None = field(default=None, repr=False)

    async def publish(self, resources: list[Located] | None = None) -> Bundle:
        if resources is not None:
            self.resources = resources
        for item in self.resources:
            if item.resource.kind == "ApiKey" and item.resource.name not in self.keys:
                self.keys[item.resource.name] = keys.generate(item.resource.spec.mode)  # type: ignore[union-attr]
        names = {i.resource.name for i in self.resources if i.resource.kind == "ApiKey"}
        material = {n: [KeyMaterial(keys.digest(k))] for n, k in self.keys.items() if n in names}
        result = compile_bundle(self.name, self.resources, material)
        assert result.bundle is not None, [str(e) for e in result.errors]
        self.bundle = await bundle_store.publish(await bundle_store.buckets(self.js), result.bundle)
        return self.bundle

    def auth(self, key_name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[key_name]}"}


def docs(text: str) -> list[Located]:
    """Parse YAML manifests given inline in a test."""
    out = []
    for i, doc in enumerate(yaml.safe_load_all(text)):
        located, problems = parse(doc, "<test>", i)
        assert located is not None, [str(p) for p in problems]
        out.append(located)
    return out


def published_tenant(nats_url: str, resources: list[Located]) -> Tenant:
    """A new tenant with `resources`, its bundle published (for fixtures outside an event loop)."""

    async def publish() -> Tenant:
        nc = await bus.connect(nats_url, "tests")
        try:
            tenant = Tenant(f"t-{uuid.uuid4().hex[:10]}", nc.jetstream(), resources)
            await tenant.publish()
            return tenant
        finally:
            await nc.close()

    return asyncio.run(publish())


def example_resources() -> list[Located]:
    resources, problems = load_dir(EXAMPLES)
    assert not problems, [str(p) for p in problems]
    return resources


@pytest.fixture
async def tenant(js: JetStreamContext) -> Tenant:
    """The examples/ folder published as a fresh tenant."""
    t = Tenant(f"t-{uuid.uuid4().hex[:10]}", js, example_resources())
    await t.publish()
    return t


@asynccontextmanager
async def ingest_client(nats_url: str, **settings: object) -> AsyncIterator[tuple[httpx.AsyncClient, IngestService]]:
    """An ingest app with its own NATS connection (like one ingest process), and a client for it."""
    svc = IngestService(Settings(nats_url=nats_url, **settings))  # type: ignore[arg-type]
    await svc.start()
    app = create_app(svc.settings, svc)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingest") as client:
            yield client, svc
    finally:
        await svc.stop()


async def wait_for_bundle(svc: IngestService, tenant: str, version: int, timeout: float = 5.0) -> None:
    import asyncio

    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        current = svc.snapshot.bundles.get(tenant)
        if current is not None and current.version >= version:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"ingest did not load bundle {tenant} v{version}")


@pytest.fixture
async def client(nats_server: NatsServer, tenant: Tenant) -> AsyncIterator[httpx.AsyncClient]:
    async with ingest_client(nats_server.url) as (c, svc):
        assert tenant.bundle is not None
        await wait_for_bundle(svc, tenant.name, tenant.bundle.version)
        yield c


SEED_BODY = {
    "workflow_slug": "free-trial-followup",
    "phone_number": "+919876543210",
    "user_id": "user-123",
    "user_context": {"name": "John", "trial_started_at": "2026-02-01", "plan_type": "premium"},
    "metadata": {"campaign_id": "trial_recovery_jan", "source": "clevertap"},
}
