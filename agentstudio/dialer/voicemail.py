"""Redirecting the calls a machine answered. Ingest checks Twilio's async AMD verdict and queues it
(stream VOICEMAIL); the dialers, which hold the Twilio credentials and the egress, share one durable
consumer of that queue and update the live call with the policy's message or a hang-up. A verdict
whose attempt is over (ended, or a retry under way) is dropped; a message is acked only once acted
on, so a dialer that dies leaves it to another."""

from __future__ import annotations

import asyncio
import logging

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig
from pydantic import ValidationError

from agentstudio import bus
from agentstudio.callstate import CallStore
from agentstudio.dialer.providers import ProviderError, TwilioProvider
from agentstudio.twilio_callbacks import MachineVerdict

log = logging.getLogger("agentstudio.dialer")

CONSUMER = "voicemail"
ACK_WAIT_SECONDS = 30.0  # a Twilio update takes a fraction of this; past it another dialer tries
RETRY_SECONDS = 2.0
# Deliveries before a verdict Twilio could not be reached for is given up: the machine then hears
# the agent, and the call still ends with the outcome voicemail.
MAX_DELIVERIES = 5


class MachineRedirects:
    def __init__(self, js: JetStreamContext, store: CallStore, twilio: TwilioProvider) -> None:
        self.js = js
        self.store = store
        self.twilio = twilio

    async def run(self, stop: asyncio.Event) -> None:
        await bus.ensure_voicemail_stream(self.js)
        sub = await self.js.pull_subscribe(
            bus.VOICEMAIL_ALL, durable=CONSUMER, stream=bus.VOICEMAIL_STREAM,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=ACK_WAIT_SECONDS, max_deliver=-1),
        )
        while not stop.is_set():
            # A batch at once: each update is one Twilio round trip, and a campaign's machines come in bursts.
            await asyncio.gather(*(self.handle(msg) for msg in await bus.fetch(sub, 32, 0.5)))
        await sub.unsubscribe()

    async def handle(self, msg: Msg) -> None:
        try:
            verdict = MachineVerdict.model_validate_json(msg.data)
        except ValidationError:  # only ingest publishes here; never let one message stop the loop
            log.error("dropped a message on the voicemail queue that is not a verdict")
            await msg.term()
            return
        where = {"call_id": verdict.call_id, "tenant": verdict.tenant}
        try:
            state = await self.store.get(verdict.tenant, verdict.call_id)
            if verdict.due(state):
                assert state is not None
                await self.twilio.answer_machine(verdict.provider_call_id, state.voicemail_message)
                log.info("call a machine answered redirected", extra={**where, "answered_by": verdict.answered_by})
        except ProviderError as exc:
            # Twilio refused (e.g. the call ended meanwhile): asking again changes nothing. The call
            # goes on with the agent; its outcome is still voicemail when it ends.
            log.warning("could not redirect a call a machine answered: %s", exc.error.code, extra=where)
        except Exception:  # noqa: BLE001 - Twilio or NATS unreachable: tried again, a few times
            if msg.metadata.num_delivered < MAX_DELIVERIES:
                log.warning("redirecting a call a machine answered failed; will retry", exc_info=True, extra=where)
                await msg.nak(delay=RETRY_SECONDS)
                return
            log.exception("gave up redirecting a call a machine answered", extra=where)
        await msg.ack()
