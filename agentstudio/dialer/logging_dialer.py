"""The interim dialer: consumes queued calls durably and logs each one (simulated telephony).

It already uses the durable pull consumer the real dialer will use (explicit ack, ack_wait,
max_deliver), so a call that is queued is consumed exactly as it will be once dialing is real.
"""

from __future__ import annotations

import asyncio
import logging

from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig

from agentstudio import bus, phone
from agentstudio.calls import CallRequest

log = logging.getLogger("agentstudio.dialer")

CONSUMER = "dialer"


async def run(js: JetStreamContext, stop: asyncio.Event) -> None:
    await bus.ensure_calls_stream(js)
    sub = await js.pull_subscribe(
        bus.DISPATCH_ALL,
        durable=CONSUMER,
        stream=bus.CALLS_STREAM,
        config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=30, max_deliver=5),
    )
    while not stop.is_set():
        try:
            messages = await sub.fetch(batch=32, timeout=1)
        except NatsTimeout:
            continue
        for msg in messages:
            call = CallRequest.model_validate_json(msg.data)
            target = call.workflow_slug and f"workflow={call.workflow_slug}" or f"agent={call.agent_slug}"
            print(
                f"dialer (simulated): call {call.call_id} to {phone.mask(call.phone_number)} {target}"
                f"{' [test]' if call.test else ''}",
                flush=True,
            )
            log.info("call consumed (simulated)", extra={"call_id": call.call_id, "tenant": call.tenant})
            await msg.ack()
