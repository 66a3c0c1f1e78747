"""A deadline on receiving a request's whole body. uvicorn bounds idle keep-alive connections but
not a body trickled a byte at a time (slow-loris), which would hold a request open for as long as
the client likes."""

from __future__ import annotations

import asyncio
from typing import Any

from agentstudio.ingest.errors import ApiError


class BodyDeadlineMiddleware:
    """Pure ASGI middleware: a body not received within `seconds` of the request's headers fails
    the read with 408. The route's own exception handling answers it (no response has started while
    the body is being read), and the connection is closed after it."""

    def __init__(self, app: Any, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.seconds
        done = False

        async def bounded_receive() -> dict[str, Any]:
            nonlocal done
            if done:  # after the body only http.disconnect can come; waiting for it is not reading
                return await receive()  # type: ignore[no-any-return]
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                # Connection: close, or uvicorn would keep the connection for the rest of the trickle
                raise ApiError(408, "request_timeout", f"request body not received within {self.seconds:g} s",
                               headers={"Connection": "close"}) from None
            done = message["type"] != "http.request" or not message.get("more_body", False)
            return message  # type: ignore[no-any-return]

        await self.app(scope, bounded_receive, send)
