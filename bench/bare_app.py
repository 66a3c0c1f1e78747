"""The baseline for bench/ingest.py: a bare FastAPI route with a pydantic body that answers the same
201 as ingest, with no auth, no rate limit and no I/O."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

app = FastAPI()


class Body(BaseModel):
    phone_number: str
    workflow_slug: str | None = None
    agent_slug: str | None = None
    user_id: str | None = None
    user_context: dict[str, Any] = {}
    metadata: dict[str, Any] = {}


@app.post("/api/v1/webhooks/ingest", status_code=201)
async def ingest(body: Body) -> dict[str, str]:
    return {"call_id": str(uuid.uuid4()), "status": "pending"}
