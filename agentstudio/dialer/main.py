"""`agent-studio dialer`: the dialer role with its providers, wired to NATS."""

from __future__ import annotations

import asyncio
import logging
import socket
from datetime import timedelta
from collections.abc import Callable

import uvicorn
from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from nats.aio.client import Client as NATS
from prometheus_client import Counter

from agentstudio import bus, templating, tracing
from agentstudio.calling_hours import MAX_CAP_WINDOW
from agentstudio.callstate import CallStore
from agentstudio.concurrency import Concurrency
from agentstudio.dialer.metrics import DialerMetrics
from agentstudio.dialer.providers import Provider, SimulatedProvider, TwilioProvider
from agentstudio.dialer.webhooks import WebhookDispatcher
from agentstudio.secrets import KubeSecrets, SecretReader, StaticSecrets
from agentstudio.dialer import sweeper
from agentstudio.dialer.voicemail import MachineRedirects
from agentstudio.dialer.worker import AttemptRules, Dialer, Pauses
from agentstudio.do_not_call import DoNotCall
from agentstudio.bundle_store import BundleWatcher, buckets
from agentstudio.calls import CallRequest
from agentstudio.frequency_caps import FrequencyCaps
from agentstudio.resources import AgentSpec, CallPolicySpec
from agentstudio.conversation import relay
from agentstudio.conversation.variables import call_variables
from agentstudio.conversation.conversation import Limits, Tools
from agentstudio.conversation.llm import ChatModel
from agentstudio.conversation.outbound import ApiCaller
from agentstudio.conversation.runtime import VoiceRuntime
from agentstudio.conversation.transcript import Turn
from agentstudio.settings import TIME_LIMIT_BACKSTOP_SECONDS, Settings
from agentstudio.tracking import CallTracker
from agentstudio.twilio_api import twilio_client

log = logging.getLogger("agentstudio.dialer")


# How many calls a dialer remembers the record revision and request of, to move them without reading
# them back (callstate.CallStore, tracking.CallTracker): more than it has under way at once.
REMEMBERED_CALLS = 4096


async def tracker_for(nc: NATS, remember: int = 0, ended: Counter | None = None) -> CallTracker:
    js = nc.jetstream()
    await bus.ensure_events_stream(js)
    await bus.ensure_transcripts_stream(js)
    return CallTracker(js, CallStore(await bus.calls_bucket(js), remember), Concurrency(await bus.concurrency_bucket(js)),
                       remember, ended)


async def build(
    nc: NATS,
    settings: Settings,
    announce: Callable[[str], None] | None = None,
    simulated_factory: Callable[[CallTracker], Provider] = SimulatedProvider,
    bundles: BundleWatcher | None = None,
    metrics: DialerMetrics | None = None,
) -> Dialer:
    tracker = await tracker_for(nc, REMEMBERED_CALLS, metrics.calls_ended if metrics else None)
    simulated = simulated_factory(tracker)
    live: Provider = simulated
    if settings.telephony_provider == "twilio":
        client = twilio_client(settings.twilio_account_sid, settings.twilio_auth_token, settings.twilio_api_base_url)
        live = TwilioProvider(client, settings.twilio_from_number, settings.public_base_url,
                              settings.ring_timeout_seconds, agents_of=call_agents(bundles) if bundles else None,
                              max_call_seconds=settings.max_call_seconds)
    dnc = DoNotCall(await bus.dnc_bucket(nc.jetstream()))
    return Dialer(nc.jetstream(), settings, tracker, live, simulated, dnc, announce=announce,
                  pauses=pauses(bundles, settings.dialing_paused), policy_of=call_policies(bundles),
                  rules=attempt_rules(bundles) if bundles else lambda call: None,
                  caps=FrequencyCaps(await bus.frequency_bucket(nc.jetstream(), MAX_CAP_WINDOW)),
                  cap_of=concurrency_caps(bundles), pace_of=paces(bundles))


def concurrency_caps(bundles: BundleWatcher | None) -> Callable[[str], int | None]:
    """A tenant's concurrent-call cap in its current bundle (None: the dialer's own setting), so a
    changed plan applies without restarting dialers."""

    def cap_of(tenant: str) -> int | None:
        bundle = bundles.snapshot.bundles.get(tenant) if bundles else None
        return bundle.max_concurrent_calls if bundle else None

    return cap_of


def paces(bundles: BundleWatcher | None) -> Callable[[str], float | None]:
    """A tenant's calls per second in its current bundle (None: the dialer's own setting)."""

    def pace_of(tenant: str) -> float | None:
        bundle = bundles.snapshot.bundles.get(tenant) if bundles else None
        return bundle.calls_per_second if bundle else None

    return pace_of


def machine_redirects(nc: NATS, dialer: Dialer) -> MachineRedirects | None:
    """The consumer of machines' verdicts, with Twilio; the simulated provider plays its own."""
    if not isinstance(dialer.live, TwilioProvider):
        return None
    return MachineRedirects(nc.jetstream(), dialer.store, dialer.live)


def reconcile(settings: Settings, provider: Provider) -> sweeper.Reconcile:
    """When an overdue call is asked about: past its ring timeout, or past the longest call Twilio
    allows it (`TimeLimit`: the longest agent's limit and its one-minute backstop)."""
    return sweeper.Reconcile(provider, ring=timedelta(seconds=settings.ring_timeout_seconds),
                             longest=timedelta(seconds=settings.max_call_seconds + TIME_LIMIT_BACKSTOP_SECONDS),
                             late=timedelta(seconds=settings.reconcile_after_seconds))


def pauses(bundles: BundleWatcher | None, everything: bool = False) -> Callable[[], Pauses | None]:
    """What waits: every call when this dialer's dialing is paused (the tenant's release), else the
    calls of workflows paused in their tenant's current bundle (`spec.paused`); None until the
    bundles are read."""
    seen: list[tuple[object, Pauses]] = []  # the last snapshot read and what it pauses

    def current() -> Pauses | None:
        if everything:
            return Pauses(everything=True)
        if bundles is None:
            return Pauses()
        if not bundles.loaded.is_set():
            return None
        snapshot = bundles.snapshot  # swapped whole on every change, so one read per change
        if not seen or seen[0] is not snapshot:
            workflows = frozenset((tenant, slug) for tenant, bundle in snapshot.bundles.items()
                                  for slug, workflow in bundle.workflows.items() if workflow.paused)
            seen[:] = [(snapshot, Pauses(workflows=workflows))]
        return seen[0][1]

    return current


def attempt_rules(bundles: BundleWatcher) -> Callable[[CallRequest], AttemptRules | None]:
    """A call's retries and voicemail from its CallPolicy in the tenant's current bundle, the
    voicemail message rendered over the call's variables as an agent's first message is."""

    policy_of = call_policies(bundles)

    def rules(call: CallRequest) -> AttemptRules | None:
        bundle = bundles.snapshot.bundles.get(call.tenant)
        policy = policy_of(call)
        if bundle is None or policy is None:
            return None
        voicemail = policy.voicemail
        if voicemail is not None and voicemail.message is not None:
            workflow = bundle.workflows.get(call.workflow_slug) if call.workflow_slug else None
            variables = call_variables(call, workflow, bundle.entry_slug(call.workflow_slug, call.agent_slug) or "")
            try:
                voicemail = voicemail.model_copy(update={"message": templating.render(voicemail.message, variables)})
            except Exception:  # noqa: BLE001 - the sandbox refusing what the template does with this call's data
                log.warning("voicemail message could not be rendered; hanging up on machines instead",
                            extra={"call_id": call.call_id, "tenant": call.tenant})
                voicemail = voicemail.model_copy(update={"action": "hang_up", "message": None})
        return AttemptRules(policy.retries, voicemail)

    return rules


def call_policies(bundles: BundleWatcher | None) -> Callable[[CallRequest], CallPolicySpec | None]:
    """A call's CallPolicy in its tenant's current bundle (a policy changed since the call was queued
    applies to it from its next dispatch)."""

    def policy_of(call: CallRequest) -> CallPolicySpec | None:
        bundle = bundles.snapshot.bundles.get(call.tenant) if bundles else None
        return bundle.policy_for(call.workflow_slug, call.agent_slug) if bundle else None

    return policy_of


def call_agents(bundles: BundleWatcher) -> Callable[[CallRequest], list[AgentSpec]]:
    """The agents a call may speak with, from the tenant's current bundle: the one it starts with
    first, then the rest of its workflow's, or, without a workflow, those its handoff tools reach."""

    def agents_of(call: CallRequest) -> list[AgentSpec]:
        bundle = bundles.snapshot.bundles.get(call.tenant)
        if bundle is None:
            return []
        workflow = bundle.workflows.get(call.workflow_slug) if call.workflow_slug else None
        slugs = [bundle.entry_slug(call.workflow_slug, call.agent_slug) or "", *(workflow.agents if workflow else [])]
        found: dict[str, AgentSpec] = {}
        while slugs:
            slug = slugs.pop(0)
            if slug in found or slug not in bundle.agents:
                continue
            found[slug] = bundle.agents[slug].spec
            if workflow is None:
                slugs += [t.action.agent for t in found[slug].tools if t.action.type == "handoff" and t.action.agent]
        return list(found.values())

    return agents_of


async def voice(
    nc: NATS,
    settings: Settings,
    bundles: BundleWatcher,
    secrets: SecretReader,
    observer: Callable[[str, Turn], None] | None = None,
    ended: Counter | None = None,
) -> VoiceRuntime:
    """The voice agent runtime: conversations on the relay WebSocket of answered calls."""
    tools = Tools(ChatModel(settings.llm_timeout_seconds), ApiCaller(settings.api_call_max_response_bytes), secrets,
                  DoNotCall(await bus.dnc_bucket(nc.jetstream())))
    limits = Limits(speech_chars_per_second=settings.speech_chars_per_second, max_call_seconds=settings.max_call_seconds)
    return VoiceRuntime(nc.jetstream(), await tracker_for(nc, ended=ended), bundles, tools, limits, observer,
                        twilio_auth_token=settings.twilio_auth_token, public_base_url=settings.public_base_url)


def relay_app(runtime: VoiceRuntime, dialer_metrics: DialerMetrics | None = None) -> FastAPI:
    """The dialer's HTTP side: the ConversationRelay WebSocket Twilio connects answered calls to, and
    /metrics: the voice agent's and, given, the dialer's own."""
    app = FastAPI(title="Agent Studio dialer", version="v1")
    mount_relay(app, runtime)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Response:
        # Not ready while stopping: the Service stops sending relay connections here, while the
        # conversations already open finish.
        ready = not runtime.draining and runtime.bundles.loaded.is_set()
        return JSONResponse({"status": "ready" if ready else "not ready", "draining": runtime.draining},
                            status_code=200 if ready else 503)

    @app.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        body = runtime.metrics.render() + (dialer_metrics.render() if dialer_metrics is not None else b"")
        return Response(body, media_type="text/plain; version=0.0.4")

    return app


def relay_server(runtime: VoiceRuntime, listening: socket.socket, metrics: DialerMetrics | None = None) -> uvicorn.Server:
    """uvicorn serving relay_app on `listening`. Without permessage-deflate: a relay frame is one token or
    one prompt, a few dozen bytes, and every socket's zlib streams cost CPU on each frame and memory for the
    length of the call (bench/conversations.py)."""
    return uvicorn.Server(uvicorn.Config(relay_app(runtime, metrics), fd=listening.fileno(), log_config=None,
                                         access_log=False, ws_per_message_deflate=False))


async def serve_relay(server: uvicorn.Server, runtime: VoiceRuntime, stop: asyncio.Event) -> None:
    """Serve the relay until `stop`, then until the last open conversation ends: a dialer being
    replaced (a rollout, a scale-down) lets its live calls finish, within the pod's grace period."""
    serving = asyncio.create_task(server.serve())
    await stop.wait()
    runtime.draining = True
    await runtime.idle()
    server.should_exit = True
    await serving


def mount_relay(app: FastAPI, runtime: VoiceRuntime) -> None:
    app.state.voice = runtime
    app.include_router(relay.router)


async def webhooks(nc: NATS, settings: Settings, secrets: SecretReader,
                   metrics: DialerMetrics | None = None) -> tuple[WebhookDispatcher, BundleWatcher]:
    js = nc.jetstream()
    watcher = BundleWatcher(await buckets(js))
    await watcher.start()
    return WebhookDispatcher(js, watcher, secrets, settings.retry_schedule(), settings.webhook_timeout_seconds,
                             outcomes=metrics.webhook_deliveries if metrics else None), watcher


async def run(settings: Settings, stop: asyncio.Event, listening: socket.socket) -> None:
    """Dial, deliver webhooks and serve the relay on `listening` (bound by the caller, before anything
    started, so a taken port stops the dialer before it takes a call) until `stop` is set."""
    watchers: list[BundleWatcher] = []
    tracing.setup("dialer", outbound=settings.trace_outbound)

    async def resubscribe() -> None:  # a reconnection loses the watch's ephemeral consumer
        for w in watchers:
            w.restart_soon()

    nc = await bus.connect_retrying(settings.nats_url, "agentstudio-dialer", auth=settings.nats_auth(),
                                   replicas=settings.nats_replicas, on_reconnect=resubscribe)
    try:
        secrets: SecretReader = KubeSecrets() if settings.webhook_secrets == "kubernetes" else StaticSecrets()
        metrics = DialerMetrics()
        dispatcher, watcher = await webhooks(nc, settings, secrets, metrics)
        watchers.append(watcher)
        metrics.watch_bundles(watcher)
        dialer = await build(nc, settings, bundles=watcher, metrics=metrics)
        runtime = await voice(nc, settings, watcher, secrets, ended=metrics.calls_ended)
        server = relay_server(runtime, listening, metrics)
        stale = timedelta(seconds=settings.stale_call_seconds)
        redirects = machine_redirects(nc, dialer)

        try:
            await asyncio.gather(
                dialer.run(stop),
                *([redirects.run(stop)] if redirects else []),
                dispatcher.run(stop),
                sweeper.run(dialer.tracker, stale,
                            settings.sweep_interval_seconds, stop, reconcile(settings, dialer.live)),
                serve_relay(server, runtime, stop),
                metrics.keep_slots(dialer.concurrency, watcher, dialer.cap, settings.metrics_refresh_seconds, stop),
            )
        finally:
            await watcher.stop()
    finally:
        await nc.close()  # everything taken is finished or handed back by now
        tracing.shutdown()
