"""The HTTP requests an Agent's `api_call` tools send during a live call: checked by the outbound
address policy (addresses.py), sent to the address that was checked, bounded in time and size, and
summarised for the model."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from agentstudio import tracing
from agentstudio.addresses import Refused, guard
from agentstudio.http_failures import described, header_problem

_NO_BODY = frozenset({"GET", "HEAD", "DELETE"})
_MIN_MODEL_LIMIT = 64  # room for the envelope of the shortest summary


@dataclass(frozen=True)
class ApiResult:
    status: int | None  # HTTP status, None when not sent or no response
    body: Any  # parsed JSON, or text (truncated), or None
    truncated: bool  # the response was larger than the cap
    error: str | None  # why it failed (refused, timeout, connection), None on a response
    elapsed_ms: int

    def for_model(self, limit: int = 2000) -> str:
        """Compact JSON text the model reads as the tool result: {"status":..,"body":..} or
        {"error":..}; at most `limit` chars."""
        if limit < _MIN_MODEL_LIMIT:
            raise ValueError(f"limit must be at least {_MIN_MODEL_LIMIT}")
        if self.error is not None:
            return _fit(lambda s: {"error": s}, self.error, limit)
        whole: dict[str, Any] = {"status": self.status, "body": self.body}
        if self.truncated:
            whole["truncated"] = True
        text = _dumps(whole)
        if len(text) <= limit:
            return text
        # Cut as text: a shortened JSON document would not parse, a shortened string always does.
        body = self.body if isinstance(self.body, str) else _dumps(self.body)
        return _fit(lambda s: {"status": self.status, "body": s, "truncated": True}, body, limit)


def _dumps(value: Any) -> str:
    return orjson.dumps(value, default=str).decode()


def _fit(shape: Callable[[str], dict[str, Any]], text: str, limit: int) -> str:
    """The JSON of shape(text), with text cut short (ending "…") until it fits in `limit` chars."""
    out, keep = _dumps(shape(text)), len(text)
    while len(out) > limit and keep > 0:
        # Each char removed shortens the JSON by at least one (escapes only make it longer).
        keep = max(0, keep - (len(out) - limit) - 1)
        out = _dumps(shape(text[:keep] + "…"))
    return out


class ApiCaller:
    """Sends `api_call` tool requests; one per process, shared by all calls."""

    def __init__(self, max_response_bytes: int = 64 * 1024) -> None:
        self.max_response_bytes = max_response_bytes
        self._client = httpx.AsyncClient(
            # A redirect is the model's to see, never followed: its target has not been checked.
            follow_redirects=False,
            # A proxy from the environment would connect on our behalf, past the address check.
            trust_env=False,
            # The pool matches connections by IP: a TLS connection verified for one name must not
            # be reused for another name on the same IP.
            limits=httpx.Limits(max_keepalive_connections=0),
            # The size cap counts decoded bytes; a compressed body could inflate a thousandfold first.
            headers={"Accept-Encoding": "identity"},
        )

    async def call(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: Any,
        timeout_seconds: float,
        allowed_hosts: Sequence[str],
    ) -> ApiResult:
        """Send one request; every failure comes back as an ApiResult with `error` set."""
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout_seconds):
                addresses = await guard(url, allowed_hosts)
                for name, value in headers.items():
                    if (problem := header_problem(value)) is not None:
                        raise Refused(f"header {name} cannot be sent: {problem}")
                status, parsed, truncated = await self._send(
                    method.upper(), httpx.URL(url), addresses, headers, body, timeout_seconds
                )
        except Refused as e:
            error = str(e)
        except (TimeoutError, httpx.TimeoutException):
            error = f"timed out after {timeout_seconds:g}s"
        except httpx.HTTPError as e:
            # Never the exception's text: httpx quotes the headers it refused, Secrets among them.
            error = described(e, httpx.URL(url).host)
        else:
            return ApiResult(status, parsed, truncated, None, _ms_since(started))
        return ApiResult(None, None, False, error, _ms_since(started))

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _send(
        self,
        method: str,
        url: httpx.URL,
        addresses: list[str],
        headers: Mapping[str, str],
        body: Any,
        timeout: float,
    ) -> tuple[int, Any, bool]:
        request_headers = httpx.Headers(headers)
        # We connect to the checked IP, not the name (a second lookup could be rebound to an internal
        # address); the server still sees the name it was addressed by.
        request_headers["Host"] = url.netloc.decode("ascii")
        tracing.outgoing(request_headers)  # the caller's `tool call` span: the endpoint's spans join its trace
        content = None
        if body is not None and method not in _NO_BODY:
            try:
                content = orjson.dumps(body)
            except TypeError:
                raise Refused("the request body cannot be sent as JSON") from None
            request_headers.setdefault("Content-Type", "application/json")
        # httpcore takes TLS SNI and the certificate's expected name from here (ignored for http).
        extensions = {"sni_hostname": url.raw_host.decode("ascii")}

        async def send_to(address: str) -> tuple[int, Any, bool]:
            async with self._client.stream(
                method,
                url.copy_with(host=address),
                headers=request_headers,
                content=content,
                timeout=timeout,
                extensions=extensions,
            ) as response:
                parsed, truncated = await self._read(response)
                return response.status_code, parsed, truncated

        for address in addresses[:-1]:
            try:
                return await send_to(address)
            except httpx.ConnectError:
                continue  # nothing was sent; another address of the host may answer (IPv6 vs IPv4)
        return await send_to(addresses[-1])

    async def _read(self, response: httpx.Response) -> tuple[Any, bool]:
        """The parsed body (at most max_response_bytes of it) and whether it was cut."""
        if response.is_redirect:
            return {"location": response.headers["location"]}, False
        cap = self.max_response_bytes
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            chunks.append(chunk)
            size += len(chunk)
            if size > cap:
                break
        data = b"".join(chunks)
        truncated = len(data) > cap
        data = data[:cap]
        if not data:
            return None, truncated
        if not truncated:
            try:
                return orjson.loads(data), False
            except orjson.JSONDecodeError:
                pass  # not JSON whatever the Content-Type says: the model gets the text
        return data.decode(response.encoding or "utf-8", errors="replace"), truncated


def _ms_since(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
