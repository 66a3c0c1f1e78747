"""The voice agent's test stack: the relay WebSocket served for real (uvicorn on a free port), the
scripted model, a local HTTP target for api_call tools, and answered calls to talk on — plus a
Twilio-like client that speaks ConversationRelay's messages."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import httpx
import orjson
import uvicorn
import websockets
import yaml
from fastapi import FastAPI, Request
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from starlette.responses import JSONResponse

from agentstudio import bus, calls, ports, transcripts
from agentstudio.bundle_store import BundleWatcher, buckets
from agentstudio.callstate import CallState
from agentstudio.conversation.conversation import Limits, Tools
from agentstudio.conversation.llm import ChatModel
from agentstudio.conversation.outbound import ApiCaller
from agentstudio.conversation.relay import relay_url
from agentstudio.conversation.runtime import VoiceRuntime
from agentstudio.dialer import main as dialer_main
from agentstudio.dialer.phone_line import Line
from agentstudio.dialer.providers import SimulatedProvider
from agentstudio.do_not_call import DoNotCall
from agentstudio.manifests import Located
from agentstudio.natsserver import free_port
from agentstudio.secrets import StaticSecrets
from agentstudio.settings import Settings
from agentstudio.tracking import CallTracker
from conftest import EXAMPLES, SEED_BODY, Tenant, docs, ingest_client, wait_for_bundle
from scripted_model import ScriptedModel
from test_webhooks import Receiver, serving

LLM_KEY = "sk-test-" + "x" * 24


@dataclass
class HttpTarget:
    """A partner API for api_call tools: records every request, answers JSON."""

    port: int = field(default_factory=free_port)
    seen: list[dict[str, Any]] = field(default_factory=list)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
        async def anything(path: str, request: Request) -> JSONResponse:
            body = await request.body()
            self.seen.append({"method": request.method, "path": "/" + path, "headers": dict(request.headers),
                              "json": orjson.loads(body) if body else None})
            return JSONResponse({"logged": True, "id": len(self.seen)})

        return app


@asynccontextmanager
async def serve(app: FastAPI, port: int) -> AsyncIterator[None]:
    async with running(uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None,
                                                     access_log=False))):
        yield


@asynccontextmanager
async def running(server: uvicorn.Server) -> AsyncIterator[None]:
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield
    finally:
        server.should_exit = True
        await task


def example_manifests(model_url: str, target: HttpTarget, allow_loopback: bool = True) -> list[dict[str, Any]]:
    """The examples/ folder, pointed at the scripted model and the local target (the real example
    reaches a placeholder domain that is never contacted)."""
    out = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "Agent":
                doc["spec"]["llm"]["baseUrl"] = model_url
                for tool in doc["spec"].get("tools", []):
                    if tool["action"]["type"] == "api_call":
                        tool["action"]["url"] = target.url("/calls/log")
                if allow_loopback:
                    doc["spec"]["allowedHosts"] = ["127.0.0.1"]
            if doc:
                out.append(doc)
    return out


def located(manifests: list[dict[str, Any]]) -> list[Located]:
    return docs(yaml.safe_dump_all(manifests))


@dataclass
class VoiceStack:
    nc: NATS
    js: JetStreamContext
    tenant: Tenant
    runtime: VoiceRuntime
    model: ScriptedModel
    target: HttpTarget
    port: int

    @property
    def relay(self) -> str:
        return relay_url(f"http://127.0.0.1:{self.port}")

    async def answered_call(self, **body: Any) -> tuple[calls.CallRequest, str]:
        """A queued call the provider has placed and the callee answered: (request, call sid)."""
        merged = {**SEED_BODY, **body}
        request = calls.CallRequest(
            call_id=str(uuid.uuid4()), tenant=self.tenant.name, api_key="clevertap",
            workflow_slug=merged.get("workflow_slug"), agent_slug=merged.get("agent_slug"),
            phone_number=merged["phone_number"], user_id=merged.get("user_id"),
            user_context=merged.get("user_context", {}), metadata=merged.get("metadata", {}), test=False,
            created_at=datetime.now(timezone.utc), bundle_version=1,
        )
        await calls.enqueue(self.js, request, timeout=5)
        sid = "CA" + uuid.uuid4().hex
        state = CallState.new(request)
        for status in ("dialing", "ringing", "in_progress"):
            state = state.advanced(status) or state  # type: ignore[arg-type]
        state = state.model_copy(update={"provider": "twilio", "provider_call_id": sid})
        await self.runtime.tracker.store.change(self.tenant.name, request.call_id, lambda _: state)
        return request, sid

    async def record(self, call_id: str) -> CallState:
        state = await self.runtime.tracker.store.get(self.tenant.name, call_id)
        assert state is not None
        return state

    async def closed_record(self, call_id: str, timeout: float = 10) -> CallState:
        async with asyncio.timeout(timeout):
            while (state := await self.record(call_id)).conversation != "closed":
                await asyncio.sleep(0.02)
        return await transcripts.filled(self.runtime.tracker.js, state) or state  # the transcript is in its own stream

    async def seed_call(self, client: httpx.AsyncClient, receiver: Receiver) -> str:
        """The seed body POSTed as the platform would (201), then the first webhook awaited at `receiver`:
        the call's id. `client` is the one `campaign` yields."""
        answer = await client.post("/api/v1/webhooks/ingest", json=SEED_BODY, headers=self.tenant.auth("clevertap"))
        assert answer.status_code == 201, answer.text
        async with asyncio.timeout(20):
            while not receiver.received:
                await asyncio.sleep(0.05)
        return answer.json()["call_id"]

    @asynccontextmanager
    async def campaign(
        self, nats_url: str, receiver: Receiver, webhook_secret: str, callee: Callable[[Line], Awaitable[None]]
    ) -> AsyncIterator[httpx.AsyncClient]:
        """The rest of a campaign call's path around this stack: an ingest client (once it serves the
        tenant's bundle), a dialer whose simulated provider answers with `callee` and opens this relay
        as Twilio does, and webhook delivery to `receiver`, signed with the Secret `webhook_secret`."""
        settings = Settings(nats_url=nats_url)
        secrets = StaticSecrets({(self.tenant.name, webhook_secret, "secret"): receiver.secret})
        dispatcher, watcher = await dialer_main.webhooks(self.nc, settings, secrets)

        def simulated(tracker: CallTracker) -> SimulatedProvider:
            return SimulatedProvider(tracker, relay_url=self.relay, callees=lambda call: callee)

        dialer = await dialer_main.build(self.nc, settings, simulated_factory=simulated)
        stop = asyncio.Event()
        running = [asyncio.create_task(dialer.run(stop)), asyncio.create_task(dispatcher.run(stop))]
        try:
            async with serving(receiver), ingest_client(nats_url) as (client, svc):
                assert self.tenant.bundle is not None
                await wait_for_bundle(svc, self.tenant.name, self.tenant.bundle.version)
                yield client
        finally:
            stop.set()
            await asyncio.gather(*running)
            await watcher.stop()


@asynccontextmanager
async def voice_stack(
    nats_server_url: str,
    js: JetStreamContext,
    manifests: list[dict[str, Any]] | None = None,
    limits: Limits = Limits(speech_chars_per_second=1e6),
    allow_loopback: bool = True,
    extra: list[dict[str, Any]] = [],
    secrets: dict[tuple[str, str], str] = {},
    twilio_auth_token: str = "",
) -> AsyncIterator[VoiceStack]:
    """The examples (or `manifests`, which may say MODEL_URL for the scripted model's, and TARGET_URL
    for the HTTP target's) and `extra` as a fresh tenant, with `secrets` ((Secret, key) → value),
    talking on a served relay WebSocket."""
    target = HttpTarget()
    with ScriptedModel(api_key=LLM_KEY) as model:
        items = orjson.loads(orjson.dumps(manifests).replace(b"MODEL_URL", model.url.encode())
                             .replace(b"TARGET_URL", target.url("").encode())) \
            if manifests is not None else example_manifests(model.url, target, allow_loopback)
        items = [*items, *extra]
        tenant = Tenant(f"t-{uuid.uuid4().hex[:10]}", js, located(items))
        bundle = await tenant.publish()
        nc = await bus.connect(nats_server_url, "test-voice")
        watcher = BundleWatcher(await buckets(nc.jetstream()))
        await watcher.start()
        async with asyncio.timeout(5):
            while (b := watcher.snapshot.bundles.get(tenant.name)) is None or b.version < bundle.version:
                await asyncio.sleep(0.01)
        known = {(tenant.name, name, key): value for (name, key), value in secrets.items()}
        reader = StaticSecrets({(tenant.name, "llm-credentials", "api-key"): LLM_KEY, **known})
        tools = Tools(ChatModel(timeout_seconds=10), ApiCaller(), reader, DoNotCall(await bus.dnc_bucket(nc.jetstream())))
        listening = ports.bind("127.0.0.1", 0, "")
        port = listening.getsockname()[1]
        runtime = VoiceRuntime(nc.jetstream(), await dialer_main.tracker_for(nc), watcher, tools, limits,
                               twilio_auth_token=twilio_auth_token, public_base_url=f"http://127.0.0.1:{port}")
        try:
            # The relay as the dialer serves it.
            async with running(dialer_main.relay_server(runtime, listening)), serve(target.app(), target.port):
                yield VoiceStack(nc, nc.jetstream(), tenant, runtime, model, target, port)
        finally:
            listening.close()
            await watcher.stop()
            await tools.model.aclose()
            await tools.api.aclose()
            await nc.close()


class TwilioRelay:
    """Twilio's side of one ConversationRelay session, message for message."""

    def __init__(self, ws: websockets.ClientConnection) -> None:
        self.ws = ws
        self.received: list[dict[str, Any]] = []

    @classmethod
    @asynccontextmanager
    async def connect(
        cls, url: str, call: calls.CallRequest, call_sid: str, signature: str | None = None
    ) -> AsyncIterator[TwilioRelay]:
        headers = {"X-Twilio-Signature": signature} if signature is not None else {}
        async with websockets.connect(url, additional_headers=headers) as ws:
            relay = cls(ws)
            await relay.send(type="setup", sessionId="VX" + uuid.uuid4().hex, accountSid="AC" + "1" * 32,
                             callSid=call_sid, parentCallSid="", **{"from": "+15005550006"}, to=call.phone_number,
                             forwardedFrom=call.phone_number, callerName="", direction="outbound-api",
                             callType="PSTN", callStatus="IN-PROGRESS",
                             customParameters={"call_id": call.call_id, "tenant": call.tenant})
            yield relay

    async def send(self, **message: Any) -> None:
        await self.ws.send(orjson.dumps(message).decode())

    async def prompt(self, text: str) -> None:
        await self.send(type="prompt", voicePrompt=text, lang="en-US", last=True)

    async def next(self, timeout: float = 10) -> dict[str, Any]:
        message = orjson.loads(await asyncio.wait_for(self.ws.recv(), timeout))
        self.received.append(message)
        return message

    async def utterance(self, timeout: float = 10) -> str:
        """Text tokens up to the one marked last, joined; an `end` first raises."""
        words = []
        while True:
            message = await self.next(timeout)
            assert message["type"] == "text", message
            words.append(message["token"])
            if message["last"]:
                return "".join(words)

    async def end(self, timeout: float = 10) -> dict[str, Any]:
        message = await self.next(timeout)
        assert message["type"] == "end", message
        return orjson.loads(message["handoffData"])
