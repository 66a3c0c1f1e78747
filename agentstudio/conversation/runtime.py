"""Where conversations come from: a call connects (its provider's call id must match the record),
the runtime builds the conversation from the tenant's current bundle and takes the call record for
it; when the call goes, it closes the record."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from nats.js import JetStreamContext

from agentstudio import calls, tracing
from agentstudio.bundle_store import BundleWatcher
from agentstudio.conversation.conversation import Conversation, ConversationError, Limits, Tools, Voice
from agentstudio.conversation.metrics import VoiceMetrics
from agentstudio.conversation.record import CallRecorder
from agentstudio.conversation.transcript import Turn
from agentstudio.tracking import CallTracker

log = logging.getLogger("agentstudio.conversation")


class Refused(Exception):
    """This connection may not talk on this call; str() says why (safe to log)."""


@dataclass
class Session:
    conversation: Conversation
    recorder: CallRecorder


class VoiceRuntime:
    def __init__(
        self,
        js: JetStreamContext,
        tracker: CallTracker,
        bundles: BundleWatcher,
        tools: Tools,
        limits: Limits = Limits(),
        observer: Callable[[str, Turn], None] | None = None,
        record_wait_seconds: float = 5.0,
        twilio_auth_token: str = "",
        public_base_url: str = "",
    ) -> None:
        self.js = js
        self.tracker = tracker
        self.bundles = bundles
        self.tools = tools
        self.limits = limits
        self.observer = observer  # `dev --chat` prints tool calls and handoffs as they happen
        self.record_wait_seconds = record_wait_seconds
        self.twilio_auth_token = twilio_auth_token  # when set, the upgrade must carry Twilio's signature
        self.public_base_url = public_base_url
        self.metrics = VoiceMetrics()
        self.draining = False  # set when the dialer stops: /readyz then says 503 so no new calls come
        self._live = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def open(self, tenant: str, call_id: str, provider_call_id: str, voice: Voice) -> Session:
        """A conversation for the call, or Refused."""
        state = await self.tracker.store.get(tenant, call_id)
        # The provider can connect before the dialer has recorded its call id (the call was answered
        # at once): wait a little for the record rather than refuse a real call.
        deadline = asyncio.get_running_loop().time() + self.record_wait_seconds
        while state is not None and not state.provider_call_id and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
            state = await self.tracker.store.get(tenant, call_id)
        if state is None:
            raise Refused("no such call")
        if not provider_call_id or state.provider_call_id != provider_call_id:
            raise Refused("the call sid does not match the call record")
        if state.terminal or state.conversation is not None:
            raise Refused(f"the call already {'ended' if state.terminal else 'has a conversation'}")
        request = await calls.fetch(self.js, tenant, call_id)
        bundle = self.bundles.snapshot.bundles.get(tenant)
        if request is None or bundle is None:
            raise Refused("the call's request or its tenant's configuration is gone")
        recorder = CallRecorder(self.tracker, tenant, call_id)
        observer = self.observer
        try:
            conversation = Conversation(
                request, bundle, voice, self.tools, recorder, self.limits,
                observer=(lambda t: observer(call_id, t)) if observer is not None else None,
                metrics=self.metrics,
            )
        except ConversationError as exc:
            raise Refused(str(exc)) from None
        if await recorder.open() is None:
            raise Refused("the call already has a conversation")
        # A child of the dispatch that placed the call (its traceparent is in the record); its turns are
        # children of this span, which ends with the call.
        conversation.span = tracing.start("conversation", context=tracing.context_of(state.traceparent), attributes={
            "call_id": call_id, "tenant": tenant, "workflow": request.workflow_slug or "",
            "agent": conversation.agent.slug, "attempt": state.attempt})
        self.metrics.active.inc()
        self._live += 1
        self._idle.clear()
        log.info("conversation started", extra={"call_id": call_id, "tenant": tenant, "agent": conversation.agent.slug})
        return Session(conversation, recorder)

    async def idle(self) -> None:
        """Returns once no conversation is open (at once when none is)."""
        await self._idle.wait()

    async def close(self, session: Session) -> None:
        """The call is gone: stop the conversation and write its final record."""
        try:
            await session.conversation.hung_up()
            session.conversation.span.set_attribute("end_reason", session.conversation.end_reason or "unknown")
            session.conversation.span.end()
            self.metrics.active.dec()
            self.metrics.ended.labels(session.conversation.end_reason or "unknown").inc()
            await session.recorder.close()
        finally:
            self._live -= 1
            if self._live == 0:
                self._idle.set()
        log.info("conversation ended", extra={"call_id": session.recorder.call_id,
                                              "reason": session.conversation.end_reason})
