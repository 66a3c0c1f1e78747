"""A NATS that requires a user and password (the chart's bundled one does: each tenant's pods get
their release's credentials from a Secret): every role connects with AGENTSTUDIO_NATS_USER and
AGENTSTUDIO_NATS_PASSWORD, and a wrong password is refused without the password in any log line."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentstudio import bus, natsserver
from agentstudio.settings import Settings
from processes import Process

PASSWORD = "s3cret-" + "p" * 20


@pytest.fixture
def guarded_nats(tmp_path: Path) -> Iterator[str]:
    port = natsserver.free_port()
    server = Process([natsserver.binary(), "-a", "127.0.0.1", "-p", str(port), "--user", "tenant",
                      "--pass", PASSWORD], tmp_path / "nats.log")
    try:
        server.wait_until(lambda: _listens(port), "nats-server listening")
        yield f"nats://127.0.0.1:{port}"
    finally:
        server.stop()


def _listens(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


async def test_roles_connect_with_the_configured_user_and_password(guarded_nats: str) -> None:
    settings = Settings(nats_url=guarded_nats, nats_user="tenant", nats_password=PASSWORD)
    nc = await bus.connect(settings.nats_url, "test", auth=settings.nats_auth())
    try:
        assert nc.is_connected
    finally:
        await nc.close()


async def test_a_wrong_password_is_refused_and_not_logged(guarded_nats: str, caplog: pytest.LogCaptureFixture) -> None:
    wrong = "wrong-" + "w" * 20
    settings = Settings(nats_url=guarded_nats, nats_user="tenant", nats_password=wrong)
    caplog.set_level(logging.DEBUG)
    # A role keeps trying (NATS may be restarting with new credentials) and says why meanwhile.
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(2):
            await bus.connect(settings.nats_url, "test", auth=settings.nats_auth(), connect_timeout=1)
    assert any("authorization violation" in r.getMessage().lower() for r in caplog.records)
    assert not any(wrong in r.getMessage() or PASSWORD in r.getMessage() for r in caplog.records)  # ...not the password
