"""A backlog of queued calls, as ingest would have left them: simulated, zero-length test calls of one
tenant on the CALLS stream, for the dispatch tests and bench/dispatch.py."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

from agentstudio import bus, calls


async def queue_backlog(js: Any, tenant: str, n: int) -> list[str]:
    """Queue n calls for `tenant` (each publish acknowledged) and return their ids in order."""
    ids = []
    for _ in range(n):
        call = calls.CallRequest(
            call_id=str(uuid.uuid4()), tenant=tenant, api_key="k", agent_slug="a", phone_number="+14155552671",
            user_context={}, metadata={"simulate_duration_seconds": 0}, test=True,
            created_at=datetime.now(timezone.utc), bundle_version=1)
        ids.append(call.call_id)
        await js.publish(bus.dispatch_subject(tenant, call.call_id), calls.encode(call),
                         headers={"Nats-Msg-Id": call.call_id})
    return ids
