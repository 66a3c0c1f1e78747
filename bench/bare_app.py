"""Baselines for bench/ingest.py: a bare FastAPI route with a pydantic body that answers the same 201
as ingest, with no auth, no rate limit and no I/O; with BARE_NATS_URL set, it also awaits one
JetStream publish-ack per request (the floor for any design that queues durably)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import nats

from fastapi import FastAPI
from pydantic import BaseModel

NATS_URL = os.environ.get("BARE_NATS_URL")
js = None


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    global js
    if NATS_URL:
        nc = await nats.connect(NATS_URL)
        js = nc.jetstream()
    yield


app = FastAPI(lifespan=lifespan)


class Body(BaseModel):
    phone_number: str
    workflow_slug: str | None = None
    agent_slug: str | None = None
    user_id: str | None = None
    user_context: dict[str, Any] = {}
    metadata: dict[str, Any] = {}


@app.post("/api/v1/webhooks/ingest", status_code=201)
async def ingest(body: Body) -> dict[str, str]:
    call_id = str(uuid.uuid4())
    if js is not None:
        # A subject of CALLS that ingest's calls table skips: a dispatch without a call's fields stops
        # that table's projection, which then fetched 2000 messages a second in ingest's windows.
        await js.publish(f"calls.bare.dead.{call_id}", body.model_dump_json().encode(),
                         headers={"Nats-Msg-Id": call_id})
    return {"call_id": call_id, "status": "pending"}
