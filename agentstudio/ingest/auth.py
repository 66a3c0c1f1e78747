"""Authentication, scopes and rate limiting as FastAPI dependencies.

`Annotated[Principal, Depends(require_scope("calls:create"))]` gives a route the caller's tenant,
key entry and bundle, all from one bundle snapshot, after the key's rate limit has been charged.
"""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Annotated, Callable, Coroutine, Any

from fastapi import Depends, Request
from nats.errors import Error as NatsError

from agentstudio import keys
from agentstudio.bundle import Bundle, KeyEntry
from agentstudio.bundle_store import KEY_INDEX_PREFIX, Snapshot
from agentstudio.ingest.errors import ApiError
from agentstudio.ingest.service import IngestService
from agentstudio.resources import Scope


@dataclass(frozen=True)
class Principal:
    tenant: str
    key: KeyEntry
    bundle: Bundle

    @property
    def key_id(self) -> str:
        return f"{self.tenant}.{self.key.name}"


def service_of(request: Request) -> IngestService:
    return request.app.state.service  # type: ignore[no-any-return]


async def _service(request: Request) -> IngestService:
    return service_of(request)


# For routes that need nothing else; routes that authenticate reach the service through the request,
# since every extra dependency costs FastAPI time on the hot path.
Service = Annotated[IngestService, Depends(_service)]


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, "Authorization", {"WWW-Authenticate": "Bearer"})


def authenticate(request: Request, svc: IngestService) -> Principal:
    header = request.headers.get("authorization")
    if not header:
        raise _unauthorized("missing API key: send Authorization: Bearer <key>")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise _unauthorized("malformed Authorization header: expected Bearer <key>")
    return key_holder(token, svc.snapshot)


def key_holder(token: str, snapshot: Snapshot) -> Principal:
    """Whoever holds API key `token`, or a 401 saying why not."""
    if not keys.is_well_formed(token):
        raise _unauthorized("malformed API key")
    digest = keys.digest(token)
    # The index is keyed by a short digest prefix; the full digest is compared in constant time.
    found = next(
        (c for c in snapshot.keys.get(digest[:KEY_INDEX_PREFIX], ()) if hmac.compare_digest(c[0], digest)),
        None,
    )
    if found is None:
        raise _unauthorized("unknown API key")
    _, tenant, entry = found
    return _usable(tenant, entry, snapshot)


def digest_holder(tenant: str, digest: str, snapshot: Snapshot) -> Principal:
    """The holder of the key with `digest` in `tenant`'s current bundle (a console session holds the
    digest, never the key), or a 401: a key disabled, expired, rotated away or deleted is refused."""
    bundle = snapshot.bundles.get(tenant)
    entry = bundle.keys.get(digest) if bundle is not None else None
    if entry is None:
        raise _unauthorized("unknown API key")
    return _usable(tenant, entry, snapshot)


def _usable(tenant: str, entry: KeyEntry, snapshot: Snapshot) -> Principal:
    if entry.disabled:
        raise _unauthorized("API key is disabled")
    if entry.not_after is not None and entry.not_after <= datetime.now(timezone.utc):
        raise _unauthorized("API key has expired")
    return Principal(tenant, entry, snapshot.bundles[tenant])


def require_scope(scope: Scope, *alternatives: Scope) -> Callable[..., Coroutine[Any, Any, Principal]]:
    """The caller, whose key must hold `scope` or one of the `alternatives`."""
    accepted = (scope, *alternatives)
    needed = " or ".join(accepted)

    async def dependency(request: Request) -> Principal:
        svc = service_of(request)
        principal = authenticate(request, svc)
        svc.usage.request(principal.tenant, principal.key.name, time.time())
        if not any(s in principal.key.scopes for s in accepted):
            raise ApiError(403, "forbidden", f"API key lacks the {needed} scope", "Authorization")
        try:
            retry_after = await svc.limiter.take(principal.key_id, principal.key.rate_limit_per_minute)
        except (NatsError, TimeoutError) as exc:
            raise unavailable(svc) from exc
        if retry_after is not None:
            raise ApiError(
                429,
                "rate_limited",
                f"rate limit of {principal.key.rate_limit_per_minute} requests per minute exceeded",
                headers={"Retry-After": str(max(1, int(retry_after + 0.999)))},
            )
        return principal

    return dependency


def unavailable(svc: IngestService) -> ApiError:
    return ApiError(
        503,
        "unavailable",
        "the call queue is unreachable; nothing was queued, retry later",
        headers={"Retry-After": str(svc.settings.retry_after_seconds)},
    )
