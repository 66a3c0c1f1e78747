"""A deadline on receiving a request's whole body, and no keep-alive for a connection whose body was
left unread. uvicorn bounds idle keep-alive connections but not a body trickled a byte at a time
(slow-loris), which would hold a request, or the connection after an early answer, open for as long
as the client likes."""

from __future__ import annotations

import asyncio
from typing import Any

from agentstudio.ingest.errors import ApiError

_CLOSE = (b"connection", b"close")


class BodyDeadlineMiddleware:
    """Pure ASGI middleware: a body not received within `seconds` of the request's headers fails
    the read with 408. The route's own exception handling answers it (no response has started while
    the body is being read). Any answer given before its body was read whole (that 408, or a 401,
    413 or 415 that did not need the body) closes the connection: uvicorn would otherwise keep
    reading the rest of the trickle as the same connection's, with no deadline at all."""

    def __init__(self, app: Any, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        done = headers.get(b"content-length", b"0") == b"0" and b"transfer-encoding" not in headers
        deadline = asyncio.get_running_loop().time() + self.seconds

        async def bounded_receive() -> dict[str, Any]:
            nonlocal done
            if done:  # after the body only http.disconnect can come; waiting for it is not reading
                return await receive()  # type: ignore[no-any-return]
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise ApiError(408, "request_timeout",
                               f"request body not received within {self.seconds:g} s") from None
            done = message["type"] != "http.request" or not message.get("more_body", False)
            return message  # type: ignore[no-any-return]

        async def closing_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start" and not done:
                message = {**message, "headers": [*message.get("headers", []), _CLOSE]}
            await send(message)

        await self.app(scope, bounded_receive, closing_send)
