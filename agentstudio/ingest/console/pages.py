"""The console's pages: sign-in and out, calls (filtered, paged, counted, live), one call's story, API
keys and webhooks. They read through the calls API's own functions (listing, reading, exports,
dead letters, replay), so the console shows exactly what the API answers."""

from __future__ import annotations

import asyncio
import hmac
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode

import jinja2
import orjson
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from nats.errors import Error as NatsError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import KeyNotFoundError

from agentstudio import bus, calls_index, keys, phone
from agentstudio.addresses import reserved_host
from agentstudio.calls_index import CallFilter
from agentstudio.ingest.auth import Principal, digest_holder, key_holder, service_of
from agentstudio.ingest.console.sessions import COOKIE, Session
from agentstudio.ingest.errors import ApiError
from agentstudio.ingest.routes import calls as calls_api
from agentstudio.ingest.routes import deliveries as deliveries_api
from agentstudio.ingest.service import IngestService
from agentstudio.usage import Usage, usage_key

PREFIX = "/console"
_HERE = Path(__file__).parent
_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(_HERE / "templates"),
    autoescape=True,  # caller data (names, transcripts, metadata) is text, never markup
)
_ENV.filters["masked"] = phone.mask
_ENV.filters["json"] = lambda value: orjson.dumps(value, option=orjson.OPT_INDENT_2).decode()


def _when(moment: datetime | float | None) -> str:
    if isinstance(moment, (int, float)):
        moment = datetime.fromtimestamp(moment, timezone.utc)
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC") if moment is not None else "—"


_ENV.filters["when"] = _when

# Scripts only from our own files; styles too; nothing framed, nothing sent elsewhere.
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self';"
                               " connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    # The URL carries filters, which may name campaigns: never sent to another site. (no-referrer
    # would make Chromium send Origin: null with our own forms, which the origin check refuses.)
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
PAGE_SIZE = 25
LIVE_SECONDS = 25.0  # an event stream ends after this (the browser reconnects), so a shutdown never waits long
_FORM_MAX_BYTES = 4096
ENDED = {
    "signed_out": "You signed out.",
    "revoked": "Your session ended: its API key was disabled, rotated away or deleted.",
    "expired": "Your session expired. Sign in again.",
}

router = APIRouter(prefix=PREFIX, include_in_schema=False)


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.mount(f"{PREFIX}/static", StaticFiles(directory=_HERE / "static"), name="console-static")
    app.add_exception_handler(_SignIn, _to_sign_in)


@dataclass(frozen=True)
class Signed:
    principal: Principal
    session: Session
    token: str

    @property
    def can_manage_webhooks(self) -> bool:
        return "webhooks:manage" in self.principal.key.scopes


class _SignIn(Exception):
    def __init__(self, ended: str | None = None) -> None:
        self.ended = ended


async def _to_sign_in(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, _SignIn)
    query = f"?ended={exc.ended}" if exc.ended else ""
    response = RedirectResponse(f"{PREFIX}/sign-in{query}", status_code=303)
    if exc.ended:
        response.delete_cookie(COOKIE, path=PREFIX)
    return response


async def _signed_in(request: Request) -> Signed:
    """The session of this browser, checked against the key's current state on every request."""
    svc = service_of(request)
    token = request.cookies.get(COOKIE, "")
    session = await svc.sessions.get(token) if token else None
    if session is None:
        raise _SignIn("expired" if token else None)
    try:
        principal = digest_holder(session.tenant, session.key_digest, svc.snapshot)
    except ApiError:
        await svc.sessions.end(token)
        raise _SignIn("revoked") from None
    if "calls:read" not in principal.key.scopes:  # the scope was taken away since
        await svc.sessions.end(token)
        raise _SignIn("revoked")
    return Signed(principal, session, token)


def _render(name: str, status: int = 200, **context: Any) -> HTMLResponse:
    html = _ENV.get_template(name).render(prefix=PREFIX, **context)
    return HTMLResponse(html, status_code=status, headers=_HEADERS)


def _secure(request: Request) -> bool:
    return request.url.scheme == "https" or request.headers.get("x-forwarded-proto", "").lower() == "https"


def _same_origin(request: Request) -> bool:
    """A form posted from another site is refused even before its CSRF token is looked at."""
    origin = request.headers.get("origin")
    if origin is None:  # not a browser's cross-site form (they all send Origin with a POST)
        return True
    return origin.split("://", 1)[-1] == request.headers.get("host", "")


async def _form(request: Request) -> dict[str, str]:
    """A small urlencoded form; nothing for a larger body (read no further than the limit)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > _FORM_MAX_BYTES:
            return {}
    return dict(parse_qsl(body.decode(errors="replace"), keep_blank_values=True))


def _csrf_ok(signed: Signed, form: dict[str, str]) -> bool:
    # As bytes: compare_digest refuses str with non-ASCII characters, which a forged form may send.
    return hmac.compare_digest(form.get("csrf", "").encode(), signed.session.csrf.encode())


# --- signing in and out ----------------------------------------------------------------------------


@router.get("/")
async def home(request: Request) -> Response:
    return RedirectResponse(f"{PREFIX}/calls", status_code=303)


@router.get("/sign-in")
async def sign_in_page(request: Request, ended: str | None = None) -> Response:
    return _render("sign_in.html", notice=ENDED.get(ended or ""), error=None)


@router.post("/sign-in")
async def sign_in(request: Request) -> Response:
    if not _same_origin(request):
        return _render("sign_in.html", 403, notice=None, error="This form must be sent from the console itself.")
    svc = service_of(request)
    key = (await _form(request)).get("key", "").strip()
    try:
        principal = key_holder(key, svc.snapshot)
    except ApiError:
        # One answer for every kind of wrong key: the page must not help guess which keys exist.
        return _render("sign_in.html", 401, notice=None,
                       error="That API key was not accepted. Paste a key with the calls:read scope.")
    if "calls:read" not in principal.key.scopes:
        return _render("sign_in.html", 403, notice=None,
                       error=f"The key {principal.key.name} lacks the calls:read scope the console needs.")
    token, _ = await svc.sessions.create(principal.tenant, keys.digest(key))
    response = RedirectResponse(f"{PREFIX}/calls", status_code=303)
    response.set_cookie(COOKIE, token, max_age=int(svc.sessions.lifetime), path=PREFIX, httponly=True,
                        samesite="strict", secure=_secure(request))
    return response


@router.post("/sign-out")
async def sign_out(request: Request) -> Response:
    signed = await _signed_in(request)
    if not _same_origin(request) or not _csrf_ok(signed, await _form(request)):
        return _render("error.html", 403, signed=signed, title="Not signed out",
                       message="The sign-out form was not sent by this console page. Reload and try again.")
    await service_of(request).sessions.end(signed.token)
    raise _SignIn("signed_out")


# --- calls -----------------------------------------------------------------------------------------


_FILTER_FIELDS = frozenset({"status", "workflow_slug", "agent_slug", "metadata", "created_after", "created_before",
                            "mode"})


@dataclass(frozen=True)
class _Query:
    """The calls page's filters as the URL keeps them (empty form fields dropped)."""

    params: list[tuple[str, str]]

    @classmethod
    def of(cls, request: Request) -> _Query:
        kept = [(k, v.strip()) for k, v in request.query_params.multi_items()
                if v.strip() and k not in ("cursor", "partial", "format")]
        return cls(kept)

    def get(self, name: str) -> str | None:
        return next((v for k, v in self.params if k == name), None)

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.params if k == name]

    def to_filter(self) -> CallFilter:
        metadata: dict[str, set[str]] = {}
        for name, value in self.params:
            if name not in _FILTER_FIELDS and not name.startswith("metadata."):
                # As in the API: a misspelt filter must not list or export every call.
                raise ApiError(400, "invalid_request", f"unknown filter {name!r}", name)
            if name.startswith("metadata."):
                metadata.setdefault(name[len("metadata."):], set()).add(value)
            elif name == "metadata":  # the form's one "key=value" field
                key, sep, wanted = value.partition("=")
                if not sep or not key.strip():
                    raise ApiError(400, "invalid_request", "metadata: write key=value, e.g. campaign_id=spring",
                                   "metadata")
                metadata.setdefault(key.strip(), set()).add(wanted.strip())
        mode = self.get("mode")
        return calls_api.call_filter(
            self.all("status") or None, self.get("workflow_slug"), self.get("agent_slug"), metadata,
            _moment(self.get("created_after"), "created_after"), _moment(self.get("created_before"), "created_before"),
            {"live": False, "test": True}.get(mode or ""),
        )

    def export(self, format_: str) -> str:
        """The export link's query: this page's own filters, so the download holds what the page lists."""
        return urlencode([*self.params, ("format", format_)])

    def with_cursor(self, cursor: str) -> str:
        return urlencode([*self.params, ("cursor", cursor)])

    def without_status(self) -> str:
        return urlencode([(k, v) for k, v in self.params if k != "status"])

    def only_status(self, status: str) -> str:
        return urlencode([*((k, v) for k, v in self.params if k != "status"), ("status", status)])


def _moment(text: str | None, name: str) -> datetime | None:
    if text is None:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise ApiError(400, "invalid_request", f"{name}: not a date and time", name) from None


@router.get("/calls")
async def calls_page(request: Request, cursor: str | None = None, partial: bool = False) -> Response:
    signed = await _signed_in(request)
    svc = service_of(request)
    query = _Query.of(request)
    if any(not v.strip() for _, v in request.query_params.multi_items()):
        # The form sends its empty fields too: the URL people share and bookmark names only the filters.
        kept = query.with_cursor(cursor) if cursor else urlencode(query.params)
        return RedirectResponse(f"{PREFIX}/calls?{kept}" if kept else f"{PREFIX}/calls", status_code=303)
    context: dict[str, Any] = {"signed": signed, "query": query, "statuses": calls_index.STATUSES,
                               "bundle": signed.principal.bundle, "error": None, "page": None, "counts": {},
                               "cursor": cursor, "which": None}
    try:
        which = query.to_filter()
        tenant = signed.principal.tenant
        page = await calls_api.list_page(svc, tenant, which, PAGE_SIZE, cursor, with_transcripts=False)
        counts = await _counts(svc, tenant, which)  # the page's read has caught the table up
        context.update(which=which, page=page, counts=counts)
    except ApiError as exc:
        context["error"] = exc.message
    return _render("calls_region.html" if partial else "calls.html", 400 if context["error"] else 200, **context)


async def _counts(svc: IngestService, tenant: str, which: CallFilter) -> dict[str, int]:
    """Calls that pass the filter apart from its statuses, by status: what each status tab holds."""
    try:
        return await svc.table.counts(tenant, which)
    except sqlite3.Error as exc:
        raise ApiError(503, "unavailable", "the calls index is unreadable; try again shortly") from exc


@router.get("/calls/export")
async def export_calls(request: Request, format: Literal["csv", "jsonl"] = "csv") -> Response:  # noqa: A002
    signed = await _signed_in(request)
    try:
        which = _Query.of(request).to_filter()
    except ApiError as exc:
        return _render("error.html", 400, signed=signed, title="Cannot export", message=exc.message)
    return await calls_api.export(service_of(request), signed.principal.tenant, which, format)


@router.get("/calls/live")
async def live(request: Request) -> Response:
    """Server-sent events: one `call` event per call queued or changed in the tenant (the dispatch
    subject and the CALL_EVENTS subjects, read as plain subscriptions: a missed event only delays a
    refresh), `signed-out` when the session no longer holds."""
    signed = await _signed_in(request)
    svc = service_of(request)
    return StreamingResponse(_events(request, svc, signed), media_type="text/event-stream",
                             headers={**_HEADERS, "X-Accel-Buffering": "no"})


async def _events(request: Request, svc: IngestService, signed: Signed) -> AsyncIterator[bytes]:
    tenant = signed.principal.tenant
    changes: asyncio.Queue[str] = asyncio.Queue(maxsize=256)

    async def on_message(msg: Any) -> None:
        if not changes.full():
            changes.put_nowait(msg.subject.rsplit(".", 1)[-1])

    assert svc.nc is not None
    subs = [await svc.nc.subscribe(bus.dispatch_subject(tenant, "*"), cb=on_message),
            await svc.nc.subscribe(bus.event_subject(tenant, "*"), cb=on_message)]
    loop = asyncio.get_running_loop()
    ends = loop.time() + LIVE_SECONDS
    try:
        yield b"retry: 1000\n\n"
        while (left := ends - loop.time()) > 0:
            try:
                call_id = await asyncio.wait_for(changes.get(), timeout=min(left, 5.0))
            except asyncio.TimeoutError:
                call_id = None
            if not await _still_signed_in(svc, signed):
                yield b"event: signed-out\ndata: {}\n\n"
                return
            if await request.is_disconnected():
                return
            yield (b"event: call\ndata: " + orjson.dumps({"call_id": call_id}) + b"\n\n") if call_id else b": idle\n\n"
    finally:
        for sub in subs:
            await sub.unsubscribe()


async def _still_signed_in(svc: IngestService, signed: Signed) -> bool:
    session = await svc.sessions.get(signed.token)
    if session is None:
        return False
    try:
        return "calls:read" in digest_holder(session.tenant, session.key_digest, svc.snapshot).key.scopes
    except ApiError:
        return False


@router.get("/calls/{call_id}")
async def call_page(request: Request, call_id: str) -> Response:
    signed = await _signed_in(request)
    svc = service_of(request)
    tenant = signed.principal.tenant
    try:
        call = await calls_api.read_call(svc, tenant, call_id)
        delivered = await _deliveries(svc, tenant, call.call_id)
    except ApiError as exc:
        return _render("error.html", exc.status, signed=signed, title="Call not found" if exc.status == 404
                       else "Call not available", message=exc.message)
    return _render("call.html", signed=signed, call=call, deliveries=delivered)


async def _deliveries(svc: IngestService, tenant: str, call_id: str) -> list[dict[str, Any]]:
    """The call's webhook deliveries as the dispatcher recorded them, by subscription then event."""
    try:
        kv = await bus.deliveries_bucket(svc.js)
        records = []
        for key in await bus.kv_keys(svc.js, bus.DELIVERIES_BUCKET, f"{tenant}.{call_id}."):
            try:
                entry = await kv.get(key)
            except KeyNotFoundError:
                continue
            if entry.value:
                records.append(orjson.loads(entry.value))
    except (NatsError, TimeoutError) as exc:
        raise ApiError(503, "unavailable", "webhook deliveries are unreachable; try again shortly") from exc
    return sorted(records, key=lambda r: (r["subscription"], r["at"]))


# --- keys and webhooks -----------------------------------------------------------------------------


@router.get("/keys")
async def keys_page(request: Request) -> Response:
    signed = await _signed_in(request)
    svc = service_of(request)
    tenant = signed.principal.tenant
    by_name: dict[str, list[Any]] = {}
    for entry in signed.principal.bundle.keys.values():
        by_name.setdefault(entry.name, []).append(entry)
    usage: dict[str, Usage] = {}
    try:
        kv = await bus.usage_bucket(svc.js)
        for name in by_name:
            try:
                entry = await kv.get(usage_key(tenant, name))
                usage[name] = Usage.model_validate_json(entry.value or b"{}")
            except KeyNotFoundError:
                usage[name] = Usage()
    except (NatsError, TimeoutError):
        usage = {}
    rows = [{"name": name, "entries": sorted(entries, key=lambda e: e.not_after is not None), "usage": usage.get(name)}
            for name, entries in sorted(by_name.items())]
    return _render("keys.html", signed=signed, rows=rows)


@router.get("/webhooks")
async def webhooks_page(request: Request, replayed: str | None = None, subscription: str | None = None,
                        cursor: str | None = None, queued: str | None = None, more: str | None = None) -> Response:
    # Text, not int and bool: a mangled link is still a page, not a JSON error.
    signed = await _signed_in(request)
    notice = None
    if replayed:
        notice = f"Event {replayed} was queued for delivery again."
    elif queued is not None and queued.isdigit():
        notice = f"{queued} dead letters of {subscription} were queued for delivery again." + (
            " More are left: replay again for the next ones." if more == "true" else "")
    return await _webhooks(request, signed, notice=notice, subscription=subscription or None, cursor=cursor)


async def _webhooks(request: Request, signed: Signed, notice: str | None = None, error: str | None = None,
                    status: int = 200, subscription: str | None = None, cursor: str | None = None) -> Response:
    svc = service_of(request)
    tenant = signed.principal.tenant
    letters, disabled = None, {}
    try:
        if signed.can_manage_webhooks:
            letters = await deliveries_api.dead_letters(svc, tenant, subscription, PAGE_SIZE, cursor)
        _, off = await bus.ensure_webhooks(svc.js)
        for sub in signed.principal.bundle.subscriptions:
            try:
                entry = await off.get(f"{tenant}.{sub.name}")
                if entry.value:
                    disabled[sub.name] = orjson.loads(entry.value)
            except KeyNotFoundError:
                pass
    except ApiError as exc:
        error = error or exc.message
    except (NatsError, TimeoutError):
        error = error or "Webhook state is unreachable right now; try again shortly."
    try:
        recent = await _recent_deliveries(svc, tenant)
    except (NatsError, TimeoutError):
        recent = []
        error = error or "Recent deliveries are unreachable right now; try again shortly."
    subscriptions = signed.principal.bundle.subscriptions
    shown = {"subscription": subscription} if subscription else {}
    return _render("webhooks.html", status, signed=signed, subscriptions=subscriptions, disabled=disabled,
                   placeholders={s.name for s in subscriptions if reserved_host(s.url)}, letters=letters,
                   recent=recent, notice=notice, error=error, shown=subscription, cursor=cursor,
                   first_page=urlencode(shown),
                   next_page=urlencode({**shown, "cursor": letters.next_cursor}) if letters and letters.next_cursor
                   else None)


RECENT_DELIVERIES = 25
# The newest writes of the deliveries bucket looked through for the tenant's (all tenants share it):
# the page's cost stays bounded however many deliveries the week holds.
RECENT_WINDOW = 2000


async def _recent_deliveries(svc: IngestService, tenant: str) -> list[dict[str, Any]]:
    """The tenant's latest delivery records among the bucket's newest writes, newest first."""
    await bus.deliveries_bucket(svc.js)
    stream = f"KV_{bus.DELIVERIES_BUCKET}"
    prefix = f"$KV.{bus.DELIVERIES_BUCKET}.{tenant}."
    last = int((await svc.js.stream_info(stream)).state.last_seq)
    if last == 0:
        return []
    info = await svc.js.add_consumer(stream, ConsumerConfig(
        filter_subject=prefix + ">", deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=max(1, last - RECENT_WINDOW + 1), ack_policy=AckPolicy.NONE, mem_storage=True,
        num_replicas=1, inactive_threshold=calls_index.CONSUMER_IDLE_SECONDS))
    latest: dict[str, dict[str, Any]] = {}
    try:
        pending = int(info.num_pending or 0)
        if pending:
            sub = await svc.js.pull_subscribe_bind(stream=stream, consumer=info.name)
            try:
                # No more than is pending: a fetch for more would wait out its timeout.
                for msg in await sub.fetch(pending, timeout=calls_index.FETCH_TIMEOUT):
                    if msg.data:
                        call_id = msg.subject[len(prefix):].split(".", 1)[0]
                        latest[msg.subject] = {**orjson.loads(msg.data), "call_id": call_id}
            finally:
                await sub.unsubscribe()
    finally:
        await svc.js.delete_consumer(stream, info.name)
    return sorted(latest.values(), key=lambda r: r["at"], reverse=True)[:RECENT_DELIVERIES]


@router.post("/webhooks/replay")
async def replay(request: Request) -> Response:
    signed = await _signed_in(request)
    form = await _form(request)
    if not _same_origin(request) or not _csrf_ok(signed, form):
        return await _webhooks(request, signed, error="The replay form was not sent by this console page; nothing"
                               " was replayed. Reload and try again.", status=403)
    if not signed.can_manage_webhooks:
        return await _webhooks(request, signed, error="Replaying needs a key with the webhooks:manage scope.",
                               status=403)
    event_id = form.get("event_id", "")
    try:
        await deliveries_api.replay_dead_letter(service_of(request), signed.principal.tenant,
                                                form.get("subscription", ""), event_id)
    except ApiError as exc:
        return await _webhooks(request, signed, error=exc.message, status=exc.status)
    return RedirectResponse(f"{PREFIX}/webhooks?" + urlencode({"replayed": event_id}), status_code=303)


@router.post("/webhooks/replay-all")
async def replay_all(request: Request) -> Response:
    """One bulk replay of the subscription's dead letters (at most the API's largest batch per press)."""
    signed = await _signed_in(request)
    form = await _form(request)
    subscription = form.get("subscription", "")
    if not _same_origin(request) or not _csrf_ok(signed, form):
        return await _webhooks(request, signed, error="The replay form was not sent by this console page; nothing"
                               " was replayed. Reload and try again.", status=403)
    if not signed.can_manage_webhooks:
        return await _webhooks(request, signed, error="Replaying needs a key with the webhooks:manage scope.",
                               status=403)
    try:
        done = await deliveries_api.replay_dead_letters(service_of(request), signed.principal.tenant, subscription,
                                                        None, None, deliveries_api.REPLAY_MAX)
    except ApiError as exc:
        return await _webhooks(request, signed, error=exc.message, status=exc.status)
    answer = {"subscription": subscription, "queued": done.queued, **({"more": "true"} if done.more else {})}
    return RedirectResponse(f"{PREFIX}/webhooks?" + urlencode(answer), status_code=303)
