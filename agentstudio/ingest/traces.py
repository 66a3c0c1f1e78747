"""The ingest request's server span: the root of a call's trace (or a child of the platform's own
traceparent, when its webhook sends one). Installed only while tracing is on."""

from __future__ import annotations

from typing import Any

from agentstudio import tracing


class TraceMiddleware:
    """Pure ASGI middleware: one SERVER span for each API request, named by its route's template
    (never by its path, which holds call ids)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/api/"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"] if k == b"traceparent"}
        method = scope["method"]
        with tracing.span(method, kind=tracing.SpanKind.SERVER, context=tracing.extract(headers),
                          attributes={"http.request.method": method}) as span:

            async def send_status(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    span.set_attribute("http.response.status_code", message["status"])
                    if message["status"] >= 500:
                        tracing.failed(span, f"HTTP {message['status']}")
                await send(message)

            try:
                await self.app(scope, receive, send_status)
            finally:
                route = getattr(scope.get("route"), "path", None)
                if route is not None:
                    span.update_name(f"{method} {route}")
                    span.set_attribute("http.route", route)
