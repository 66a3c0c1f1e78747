"""`agent-studio dev DIR`: the whole stack on one machine, configured from a folder of manifests.

It starts nats-server from the virtualenv, compiles the manifests into bundles (the operator's job in
a cluster), serves ingest and runs the interim logging dialer. Keys live in DIR/.agent-studio/ so a
restart keeps them; editing a manifest recompiles and republishes without a restart.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path

import uvicorn
import watchfiles
from nats.js.kv import KeyValue

from agentstudio import bundle_store, bus, keys
from agentstudio.bundle import KeyMaterial, compile_bundle
from agentstudio.dialer import logging_dialer
from agentstudio.ingest.app import create_app
from agentstudio.ingest.service import IngestService
from agentstudio.manifests import MANIFEST_SUFFIXES, Located, load_dir
from agentstudio.natsserver import NatsServer
from agentstudio.resources import ApiKey
from agentstudio.settings import Settings

log = logging.getLogger("agentstudio.dev")

STATE_DIR = ".agent-studio"
DEFAULT_TENANT = "default"


class KeyFile:
    """Plaintext keys of the local run, one per ApiKey name, in a file only the owner can read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.keys: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}

    def ensure(self, resources: list[Located]) -> list[tuple[str, str]]:
        """Make a key for every ApiKey that has none (or one of the wrong mode); return the new ones."""
        made = []
        for item in resources:
            if isinstance(item.resource, ApiKey):
                name, mode = item.resource.name, item.resource.spec.mode
                if not self.keys.get(name, "").startswith(f"as_{mode}_"):
                    self.keys[name] = keys.generate(mode)
                    made.append((name, self.keys[name]))
        if made:
            self.path.write_text(json.dumps(self.keys, indent=2))
            os.chmod(self.path, 0o600)
        return made

    def material(self) -> dict[str, list[KeyMaterial]]:
        return {name: [KeyMaterial(keys.digest(key))] for name, key in self.keys.items()}


def prepare_state_dir(directory: Path) -> Path:
    state = directory / STATE_DIR
    state.mkdir(parents=True, exist_ok=True)
    ignore = state / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# Local state of `agent-studio dev` (keys, NATS data): never commit it.\n*\n")
    return state


async def compile_and_publish(directory: Path, key_file: KeyFile, kv: KeyValue, announce: bool) -> bool:
    """Load, compile and publish every namespace in `directory`; print problems. True when all good."""
    resources, problems = load_dir(directory)
    new_keys = key_file.ensure(resources)
    shown = key_file.keys.items() if announce else new_keys
    for name, key in sorted(shown):
        if any(isinstance(i.resource, ApiKey) and i.resource.name == name for i in resources):
            print(f"api key {name}: {key}", flush=True)
    ok = not problems
    by_tenant: dict[str, list[Located]] = {}
    for item in resources:
        by_tenant.setdefault(item.namespace or DEFAULT_TENANT, []).append(item)
    for tenant, items in sorted(by_tenant.items()):
        result = compile_bundle(tenant, items, key_file.material())
        problems += result.errors
        if result.bundle is not None and not any(p.source in {i.source for i in items} for p in problems):
            published = await bundle_store.publish(kv, result.bundle)
            print(f"bundle {tenant}: version {published.version}", flush=True)
        else:
            ok = False
    for problem in problems:
        print(f"error: {problem}", flush=True)
    if problems:
        print("the last good configuration stays in force", flush=True)
    return ok and not problems


async def run(directory: Path, port: int, host: str = "127.0.0.1") -> None:
    directory = directory.resolve()
    state = prepare_state_dir(directory)
    nats = NatsServer(state / "nats", log_file=state / "nats.log")
    nats.start()
    print(f"nats-server: {nats.url} (JetStream data in {state / 'nats'})", flush=True)
    stop = asyncio.Event()
    settings = Settings(nats_url=nats.url, host=host, port=port)
    service = IngestService(settings)
    try:
        nc = await bus.connect_retrying(nats.url, "agentstudio-dev")
        js = nc.jetstream()
        kv = await bus.bundles_bucket(js)
        key_file = KeyFile(state / "keys.json")
        await compile_and_publish(directory, key_file, kv, announce=True)
        await service.start()
        server = uvicorn.Server(
            uvicorn.Config(create_app(settings, service), host=host, port=port, log_config=None, access_log=False)
        )
        print(f"ingest: http://{host}:{port}/api/v1/webhooks/ingest", flush=True)
        background = [
            asyncio.create_task(logging_dialer.run(js, stop), name="dialer"),
            asyncio.create_task(_watch(directory, key_file, kv, stop), name="watch"),
        ]
        await server.serve()  # returns on Ctrl-C (uvicorn handles the signal)
        stop.set()
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await service.stop()
        await nc.drain()
    finally:
        nats.stop()
        print("stopped", flush=True)


async def _watch(directory: Path, key_file: KeyFile, kv: KeyValue, stop: asyncio.Event) -> None:
    def manifest(_: watchfiles.Change, path: str) -> bool:
        return path.endswith(MANIFEST_SUFFIXES) and f"/{STATE_DIR}/" not in path

    async for _ in watchfiles.awatch(directory, watch_filter=manifest, stop_event=stop):
        print("manifests changed: recompiling", flush=True)
        await compile_and_publish(directory, key_file, kv, announce=False)
