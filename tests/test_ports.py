"""The socket a role binds before uvicorn serves it (agentstudio.ports)."""

from __future__ import annotations

import asyncio
import socket

import httpx
import uvicorn
from starlette.types import Receive, Scope, Send

from agentstudio import ports


async def _ok(scope: Scope, receive: Receive, send: Send) -> None:
    """A response in two parts (headers, then body), as every ASGI app writes one."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})


def test_connections_served_from_a_bound_socket_send_without_nagle() -> None:
    """uvicorn takes a handed socket for a Unix one and leaves Nagle on for its connections; a
    response written in two parts then waited for the client's delayed ACK, 40 ms a request (ingest
    served 484 req/s instead of 905 in bench/ingest.py)."""
    sock = ports.bind("127.0.0.1", 0, "use --port")
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(_ok, fd=sock.fileno(), log_config=None, access_log=False,
                                           lifespan="off"))

    async def scenario() -> list[int]:
        serving = asyncio.create_task(server.serve())
        try:
            async with httpx.AsyncClient() as client:
                for _ in range(200):  # bounded wait for the server to listen
                    if server.started:
                        break
                    await asyncio.sleep(0.05)
                assert server.started, "uvicorn never started"
                assert (await client.get(f"http://127.0.0.1:{port}/")).text == "ok"
                return [c.transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                        for c in server.server_state.connections]
        finally:
            server.should_exit = True
            await serving

    try:
        nodelay = asyncio.run(scenario())
    finally:
        sock.close()
    assert nodelay and all(nodelay), f"TCP_NODELAY on the served connections: {nodelay}"
