"""`agent-studio dev DIR`: the whole stack on one machine, configured from a folder of manifests.

It starts nats-server from the virtualenv, compiles the manifests into bundles (the operator's job in
a cluster), serves ingest and runs the interim logging dialer. Keys live in DIR/.agent-studio/ so a
restart keeps them; editing a manifest recompiles and republishes without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import uvicorn
import watchfiles
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy

from agentstudio import bundle_store, bus, clock, keys, phone, ports, signing
from agentstudio.bundle import Bundle, KeyMaterial, compile_bundle
from agentstudio.dialer import main as dialer_main
from agentstudio.ingest.app import create_app
from agentstudio.ingest.service import IngestService
from agentstudio.manifests import MANIFEST_SUFFIXES, Located, load_dir
from agentstudio.natsserver import NatsCluster, NatsServer, StoreInUse
from agentstudio.resources import WEBHOOK_SECRET_KEY, Agent, ApiKey, SecretKeyRef, WebhookSubscription, Workflow
from agentstudio.callstate import CallStore
from agentstudio.chat import HELP, ChatRequest, Terminal, body_for, outcome, place
from agentstudio.conversation import relay
from agentstudio.dialer.providers import SimulatedProvider
from agentstudio.secrets import EnvSecrets, StaticSecrets, env_name
from agentstudio.tracking import CallTracker
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
        return {name: [KeyMaterial(keys.digest(key), hint=keys.hint(key))] for name, key in self.keys.items()
                if not name.startswith("whsec:")}

    def webhook_secrets(self, resources: list[Located]) -> list[tuple[str, str]]:
        """A whsec_ signing secret per WebhookSubscription (the operator's job in a cluster); new ones."""
        made = []
        for item in resources:
            if isinstance(item.resource, WebhookSubscription):
                entry = f"whsec:{item.resource.name}"
                if entry not in self.keys:
                    self.keys[entry] = signing.new_secret()
                    made.append((item.resource.name, self.keys[entry]))
        if made:
            self.path.write_text(json.dumps(self.keys, indent=2))
            os.chmod(self.path, 0o600)
        return made

    def signing_secrets(self, tenant_of: dict[str, str]) -> dict[tuple[str, str, str], str]:
        return {(tenant_of.get(k[6:], DEFAULT_TENANT), f"{k[6:]}-webhook-secret", WEBHOOK_SECRET_KEY): v
                for k, v in self.keys.items() if k.startswith("whsec:")}


def prepare_state_dir(directory: Path) -> Path:
    state = directory / STATE_DIR
    state.mkdir(parents=True, exist_ok=True)
    ignore = state / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# Local state of `agent-studio dev` (keys, NATS data): never commit it.\n*\n")
    return state


async def compile_and_publish(
    directory: Path,
    key_file: KeyFile,
    kv: bundle_store.Buckets,
    announce: bool,
    service: IngestService | None = None,
    signing_secrets: StaticSecrets | None = None,
) -> bool:
    """Load, compile and publish every namespace in `directory`; print problems. True when all good.

    With `service`, a bundle is reported only once that ingest serves it.
    """
    resources, problems = load_dir(directory)
    new_keys = key_file.ensure(resources)
    new_secrets = key_file.webhook_secrets(resources)
    shown = key_file.keys.items() if announce else new_keys
    api_keys = {i.resource.name: i.resource.spec for i in resources if isinstance(i.resource, ApiKey)}
    for name, key in sorted(shown):
        if (spec := api_keys.get(name)) is not None:
            print(f"api key {name}: {key} ({spec.mode}; {', '.join(spec.scopes)})", flush=True)
    shown_secrets = [(k[6:], v) for k, v in key_file.keys.items() if k.startswith("whsec:")] if announce else new_secrets
    for name, secret in sorted(shown_secrets):
        if any(isinstance(i.resource, WebhookSubscription) and i.resource.name == name for i in resources):
            print(f"webhook secret {name}: {secret}", flush=True)
    if signing_secrets is not None:
        signing_secrets.secrets.update(key_file.signing_secrets(
            {i.resource.name: i.namespace or DEFAULT_TENANT for i in resources if isinstance(i.resource, WebhookSubscription)}))
    by_tenant: dict[str, list[Located]] = {}
    for item in resources:
        by_tenant.setdefault(item.namespace or DEFAULT_TENANT, []).append(item)
    results = {tenant: compile_bundle(tenant, items, key_file.material()) for tenant, items in by_tenant.items()}
    problems += [e for r in results.values() for e in r.errors]
    for problem in problems:
        print(f"error: {problem}", flush=True)
    if problems:
        # A document that did not parse may belong to any namespace: publish nothing.
        print("the last good configuration stays in force", flush=True)
        return False
    for tenant, result in sorted(results.items()):
        assert result.bundle is not None
        published = await bundle_store.publish(kv, result.bundle)
        if service is not None:
            await _until_served(service, published)
        print(f"bundle {tenant}: version {published.version}", flush=True)
    return True


def _print(line: str) -> None:
    print(line, flush=True)


class _Server(uvicorn.Server):
    """uvicorn re-raises a captured signal after shutdown, which would kill us before we stop
    nats-server; `run` handles the signals itself instead."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _request_exit(server: uvicorn.Server) -> None:
    if server.should_exit:
        server.force_exit = True  # a second Ctrl-C
    server.should_exit = True


async def _until_served(service: IngestService, bundle: Bundle, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.01)):
        current = service.snapshot.bundles.get(bundle.tenant)
        if current is not None and current.version >= bundle.version:
            return
        await asyncio.sleep(0.01)
    print(f"warning: ingest has not loaded bundle {bundle.tenant} version {bundle.version} yet", flush=True)


async def run(directory: Path, port: int, host: str = "127.0.0.1", chat: ChatRequest | None = None,
              now: datetime | None = None, cluster: bool = False) -> bool:
    """Run until stopped; with `chat`, until its call is over. False when the chat could not call.
    With `now`, calling windows and frequency caps read a clock that reads `now` at the start.
    With `cluster`, NATS is three nats-servers forming a JetStream cluster (streams and buckets R3),
    with their stores beside the single server's, so each mode keeps its own data."""
    directory = directory.resolve()
    state = prepare_state_dir(directory)
    # Both checks come before anything starts or is printed: a second `dev` must not get as far as
    # printing an ingest URL that is another's, nor open a store another server is writing.
    listening = ports.bind(host, port, "use --port", guess="is another `agent-studio dev` running?")
    nats = NatsCluster(state / "nats-cluster") if cluster else NatsServer(state / "nats", log_file=state / "nats.log")
    try:
        nats.start()
    except StoreInUse as exc:
        listening.close()
        raise StoreInUse(f"{directory} is in use by another `agent-studio dev` (pid {exc.holder}); two servers "
                         "must never share its JetStream store: stop that one first", exc.holder) from None
    except BaseException:
        listening.close()
        raise
    if isinstance(nats, NatsCluster):
        print(f"nats-server: a cluster of {len(nats.nodes)} at {nats.url} (JetStream data in "
              f"{state / 'nats-cluster'}; streams and buckets R3)", flush=True)
    else:
        print(f"nats-server: {nats.url} (JetStream data in {state / 'nats'})", flush=True)
    if now is not None:
        clock.start_at(now)
        print(f"clock: {now.isoformat()} and advancing (--now): calling windows and frequency caps read it; "
              "timestamps of calls stay real", flush=True)
    stop = asyncio.Event()
    # Locally nothing is spoken aloud, so the agent need not wait for its words to play out.
    settings = Settings(nats_url=nats.url, host=host, port=port, public_base_url=f"http://{host}:{port}",
                        speech_chars_per_second=1e6)
    service = IngestService(settings)
    terminal = Terminal()
    try:
        nc = await bus.connect_retrying(nats.url, "agentstudio-dev")
        js = nc.jetstream()
        kv = await bundle_store.buckets(js)
        key_file = KeyFile(state / "keys.json")
        secrets = StaticSecrets()
        ok = await compile_and_publish(directory, key_file, kv, announce=True, signing_secrets=secrets)
        await service.start()
        app = create_app(settings, service)
        dispatcher, bundles = await dialer_main.webhooks(nc, settings, secrets)
        # Model keys and api_call headers come from AGENTSTUDIO_SECRET_<NAME>_<KEY> locally.
        runtime = await dialer_main.voice(nc, settings, bundles, EnvSecrets(), observer=terminal.turn)
        dialer_main.mount_relay(app, runtime)
        server = _Server(uvicorn.Config(app, fd=listening.fileno(), log_config=None, access_log=False))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, _request_exit, server)
        print(f"ingest: http://{host}:{port}/api/v1/webhooks/ingest", flush=True)
        print(f"console: http://{host}:{port}/console/ (sign in with a key that has calls:read)", flush=True)

        def simulated(tracker: CallTracker) -> SimulatedProvider:
            return SimulatedProvider(tracker, relay_url=relay.relay_url(settings.public_base_url),
                                     callees=terminal.callee_for, on_token=terminal.on_token_for)

        dialer = await dialer_main.build(nc, settings, announce=None if chat else _print, simulated_factory=simulated,
                                         bundles=bundles)
        background = [
            asyncio.create_task(dialer.run(stop), name="dialer"),
            asyncio.create_task(dispatcher.run(stop), name="webhooks"),
            asyncio.create_task(_watch(directory, key_file, kv, service, secrets, stop), name="watch"),
        ]
        if chat is None:  # a chat prints its own call's story
            background.append(asyncio.create_task(_report_calls(js), name="call lines"))
        chatting = None if chat is None else asyncio.create_task(
            _chat(directory, key_file, chat, settings, server, terminal, dialer.store, ok), name="chat")
        if chatting is not None:
            background.append(chatting)
        await server.serve()  # returns on Ctrl-C, SIGTERM, or when the chat's call is over
        chatted = chatting is None or (chatting.done() and not chatting.cancelled()
                                       and chatting.exception() is None and chatting.result())
        stop.set()
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await bundles.stop()
        await service.stop()
        await nc.close()
    finally:
        nats.stop()
        listening.close()
        print("stopped", flush=True)
    return chatted


async def _chat(
    directory: Path,
    key_file: KeyFile,
    request: ChatRequest,
    settings: Settings,
    server: uvicorn.Server,
    terminal: Terminal,
    store: CallStore,
    manifests_ok: bool,
) -> bool:
    """Place the chat's call once the server is up; stop the local run when the call is over. Whether
    a call was placed and talked through."""
    try:
        while not server.started:
            await asyncio.sleep(0.02)
        if not manifests_ok:
            print("chat: fix the manifests first", flush=True)
            return False
        resources, _ = load_dir(directory)
        kinds = {(i.resource.kind, i.resource.slug) for i in resources if isinstance(i.resource, (Agent, Workflow))}
        slug_kind = "workflow_slug" if ("Workflow", request.slug) in kinds else \
            "agent_slug" if ("Agent", request.slug) in kinds else None
        if slug_kind is None:
            print(f"chat: no workflow or agent {request.slug!r}; there are: "
                  f"{', '.join(sorted(slug for _, slug in kinds))}", flush=True)
            return False
        keys = sorted((i.resource.spec.mode != "test", i.resource.name, i.namespace or DEFAULT_TENANT)
                      for i in resources if isinstance(i.resource, ApiKey) and "calls:create" in i.resource.spec.scopes
                      and not i.resource.spec.disabled)
        if not keys:
            print("chat: add an ApiKey with the calls:create scope to the folder", flush=True)
            return False
        _, key_name, tenant = keys[0]
        # Without its model key the call would ring, then end in `error`: refuse before placing it.
        if missing := _missing_model_keys(resources, request.slug, slug_kind):
            for agent, ref in missing:
                print(f"chat: agent {agent} reads its model key from Secret {ref.name}/{ref.key}: "
                      f"set {env_name(ref)}", flush=True)
            return False
        print(f"chat: calling {request.phone_number} with {slug_kind} {request.slug} (key {key_name}). {HELP}",
              flush=True)
        call_id = await place(f"http://{settings.host}:{settings.port}", key_name, key_file.keys[key_name], tenant,
                              body_for(request, slug_kind), terminal)
        if call_id is None:
            return False
        await outcome(store, tenant, call_id, terminal, timeout=24 * 3600)
        return True
    finally:
        server.should_exit = True


def _missing_model_keys(resources: list[Located], slug: str, slug_kind: str) -> list[tuple[str, SecretKeyRef]]:
    """The agents the chat's call can reach whose model key is not in the environment, with its Secret."""
    reachable = {slug}
    if slug_kind == "workflow_slug":
        reachable = {s for i in resources if isinstance(i.resource, Workflow) and i.resource.slug == slug
                     for s in i.resource.spec.agent_slugs()}
    return [(i.resource.slug, ref) for i in resources if isinstance(i.resource, Agent) and i.resource.slug in reachable
            and (ref := i.resource.spec.llm.api_key_secret_ref) is not None and not os.environ.get(env_name(ref))]


async def _report_calls(js: JetStreamContext) -> None:
    """A line per call status change, from the events status webhooks carry (the answer and the end),
    so the outcome of a call is seen without asking the calls API."""
    await bus.ensure_events_stream(js)
    sub = await js.subscribe(bus.EVENTS_ALL, ordered_consumer=True, deliver_policy=DeliverPolicy.NEW)
    try:
        async for msg in sub.messages:
            print(call_line(orjson.loads(msg.data)["data"]), flush=True)
    finally:
        await sub.unsubscribe()


def call_line(data: dict[str, Any]) -> str:
    """`call <id> to ******3210: completed in 8 s, ended by end_call` from a status event's data."""
    status = data["status"]
    said = {"in_progress": "answered"}.get(status, status)
    if status == "completed":
        said += f" in {data['duration_seconds']} s"
    if data.get("end_reason"):
        said += f", ended by {data['end_reason']}"
    if data.get("error"):
        said += f" ({data['error']['code']}: {data['error']['message']})"
    return f"call {data['call_id']} to {phone.mask(data['phone_number'])}: {said}"


async def _watch(
    directory: Path,
    key_file: KeyFile,
    kv: bundle_store.Buckets,
    service: IngestService,
    secrets: StaticSecrets,
    stop: asyncio.Event,
) -> None:
    def manifest(_: watchfiles.Change, path: str) -> bool:
        return path.endswith(MANIFEST_SUFFIXES) and f"/{STATE_DIR}/" not in path

    async for _ in watchfiles.awatch(directory, watch_filter=manifest, stop_event=stop):
        print("manifests changed: recompiling", flush=True)
        await compile_and_publish(directory, key_file, kv, announce=False, service=service, signing_secrets=secrets)
