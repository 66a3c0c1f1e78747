"""Console sessions: a random token in an HttpOnly cookie, its record in the `as-console-sessions`
KV bucket (so every ingest replica knows it and signing out ends it everywhere). The record holds
the key's digest, never the key; each request checks that digest against the tenant's current
bundle, so disabling, rotating away or deleting the key ends its sessions at once."""

from __future__ import annotations

import hashlib
import secrets
import time

import orjson
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue
from pydantic import BaseModel

COOKIE = "as_console"


class Session(BaseModel):
    tenant: str
    key_digest: str
    csrf: str  # sent with every form that changes something; the cookie alone is not enough
    expires_at: float


def _key(token: str) -> str:
    # Stored by hash: whoever can read the bucket still cannot act as a signed-in browser.
    return hashlib.sha256(token.encode()).hexdigest()


class Sessions:
    def __init__(self, kv: KeyValue, lifetime_seconds: float) -> None:
        self._kv = kv
        self.lifetime = lifetime_seconds

    async def create(self, tenant: str, key_digest: str) -> tuple[str, Session]:
        """A new session; the token goes into the cookie and nowhere else."""
        token = secrets.token_urlsafe(32)
        session = Session(tenant=tenant, key_digest=key_digest, csrf=secrets.token_urlsafe(24),
                          expires_at=time.time() + self.lifetime)
        await self._kv.put(_key(token), orjson.dumps(session.model_dump()))
        return token, session

    async def get(self, token: str) -> Session | None:
        if not token or len(token) > 128:
            return None
        try:
            entry = await self._kv.get(_key(token))
        except KeyNotFoundError:
            return None
        if not entry.value:
            return None
        session = Session.model_validate_json(entry.value)
        return session if session.expires_at > time.time() else None

    async def end(self, token: str) -> None:
        await self._kv.delete(_key(token))
