"""Settings a live Twilio call cannot honour are refused when a role starts, naming the variable."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from pydantic import ValidationError

from agentstudio.natsserver import NatsServer
from agentstudio.settings import TIME_LIMIT_BACKSTOP_SECONDS, Settings
from processes import Process

TWILIO = {"telephony_provider": "twilio", "public_base_url": "https://voice.example.com"}


def test_defaults_with_twilio_fit_a_default_account() -> None:
    # A default Twilio account cuts every call at 4 h (error 32015 / 64104: "maximum call duration");
    # our polite end plus the TimeLimit backstop must come before it.
    settings = Settings(**TWILIO)
    assert settings.twilio_max_call_seconds == 4 * 3600
    assert settings.max_call_seconds + TIME_LIMIT_BACKSTOP_SECONDS <= settings.twilio_max_call_seconds


@pytest.mark.parametrize("env, named", [
    # The cap plus the 60 s backstop is over the account's maximum: Twilio would cut the goodbye.
    ({"AGENTSTUDIO_MAX_CALL_SECONDS": "14400"}, "AGENTSTUDIO_MAX_CALL_SECONDS"),
    ({"AGENTSTUDIO_TWILIO_MAX_CALL_SECONDS": "600", "AGENTSTUDIO_MAX_CALL_SECONDS": "600"},
     "AGENTSTUDIO_TWILIO_MAX_CALL_SECONDS"),
    # Twilio's Timeout: "the maximum is 600 seconds" (the Calls resource in the API spec).
    ({"AGENTSTUDIO_RING_TIMEOUT_SECONDS": "601"}, "AGENTSTUDIO_RING_TIMEOUT_SECONDS"),
    ({"AGENTSTUDIO_RING_TIMEOUT_SECONDS": "0"}, "AGENTSTUDIO_RING_TIMEOUT_SECONDS"),
    # ConversationRelay connects only to wss://, which our relay URL is only under an https:// base.
    ({"AGENTSTUDIO_PUBLIC_BASE_URL": "http://voice.example.com"}, "AGENTSTUDIO_PUBLIC_BASE_URL"),
])
def test_a_dialer_refuses_settings_twilio_cannot_honour(
    env: dict[str, str], named: str, nats_server: NatsServer, tmp_path: Path,
) -> None:
    secret = "auth-token-that-must-not-be-printed"
    process = Process.agent_studio("dialer", log=tmp_path / "dialer.log", env={
        **os.environ, "AGENTSTUDIO_NATS_URL": nats_server.url, "AGENTSTUDIO_HOST": "127.0.0.1",
        "AGENTSTUDIO_PORT": "0", "AGENTSTUDIO_WEBHOOK_SECRETS": "none",
        "AGENTSTUDIO_TELEPHONY_PROVIDER": "twilio", "AGENTSTUDIO_PUBLIC_BASE_URL": "https://voice.example.com",
        "AGENTSTUDIO_TWILIO_AUTH_TOKEN": secret, **env,
    })
    try:
        code = process.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.stop()
        raise AssertionError(f"the dialer started with {env}:\n{process.output()}") from None
    said = process.log.read_text()
    assert code == 1, process.output()
    assert named in said and "Traceback" not in said, process.output()
    assert secret not in said


def test_the_simulated_provider_needs_no_https() -> None:
    assert Settings(public_base_url="http://127.0.0.1:8080").public_base_url == "http://127.0.0.1:8080"


def test_errors_name_the_variable_in_process() -> None:
    with pytest.raises(ValidationError, match="AGENTSTUDIO_PUBLIC_BASE_URL"):
        Settings(telephony_provider="twilio", public_base_url="http://voice.example.com")
