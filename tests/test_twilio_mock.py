"""The Twilio mock harness itself: the official SDK against Prism serving Twilio's OpenAPI spec,
through the recording shim (tests/twilio_mock.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from twilio.base import values
from twilio.base.exceptions import TwilioRestException
from twilio.rest import Client

from twilio_mock import TwilioMock, twilio_client

EVENTS = ["initiated", "ringing", "answered", "completed"]
VALID: dict[str, Any] = {
    "to": "+14155552671",
    "from_": "+14155550100",
    "twiml": "<Response><Say>hi</Say></Response>",
    "status_callback": "https://example.com/cb",
    "status_callback_event": EVENTS,
    "status_callback_method": "POST",
    "timeout": 30,
}


@pytest.fixture(scope="module")
def twilio_mock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwilioMock]:
    with TwilioMock(log_file=tmp_path_factory.mktemp("twilio") / "prism.log") as mock:
        yield mock


@pytest.fixture
def client(twilio_mock: TwilioMock) -> Client:
    twilio_mock.clear()  # each test reads only its own requests
    return twilio_client(twilio_mock)


def test_valid_call_is_created_and_recorded(client: Client, twilio_mock: TwilioMock) -> None:
    call = client.calls.create(**VALID)

    assert call.sid and call.sid.startswith("CA")
    [req] = twilio_mock.requests
    assert (req.method, req.path, req.status) == ("POST", twilio_mock.calls_path, 201)
    # As the SDK sent it: repeated keys, in order (the shim bracketed them only on the way to Prism).
    assert req.form["StatusCallbackEvent"] == EVENTS
    assert req.param("To") == "+14155552671"
    assert req.param("From") == "+14155550100"
    assert req.param("Timeout") == "30"
    assert req.param("StatusCallbackMethod") == "POST"
    assert req.auth == (twilio_mock.account_sid, twilio_mock.auth_token)


def test_single_status_callback_event_is_an_array_too(client: Client, twilio_mock: TwilioMock) -> None:
    call = client.calls.create(**{**VALID, "status_callback_event": ["completed"]})

    assert call.sid
    assert twilio_mock.requests[-1].form["StatusCallbackEvent"] == ["completed"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"from_": values.unset}, "From"),  # unset: the SDK leaves the parameter out
        ({"timeout": "abc"}, "Timeout"),
        ({"twiml": values.unset, "url": "not a uri"}, "Url"),
        ({"status_callback_method": "PUT"}, "StatusCallbackMethod"),
    ],
    ids=["missing-from", "timeout-not-integer", "url-not-uri", "bad-status-callback-method"],
)
def test_request_the_api_refuses_fails(
    client: Client, twilio_mock: TwilioMock, change: dict[str, Any], field: str
) -> None:
    with pytest.raises(TwilioRestException) as raised:
        client.calls.create(**{**VALID, **change})

    # Prism says 422 where Twilio says 400 (with a Twilio error code): assert only what both share,
    # a client error, and that it is about the parameter we broke.
    assert raised.value.status == 422
    [req] = twilio_mock.requests
    problems = req.response["validation"]
    # A bad value names the field in its location; a missing one only in the message.
    assert any(field in p["location"] or f"'{field}'" in p["message"] for p in problems), problems


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer some-token"}],
    ids=["no-credentials", "not-basic"],
)
def test_missing_basic_auth_gets_401(twilio_mock: TwilioMock, headers: dict[str, str]) -> None:
    # Prism checks that Basic credentials are present, not that they are right (any user:password
    # passes), so there is no wrong-token case here.
    resp = httpx.post(
        twilio_mock.base_url + twilio_mock.calls_path,
        data={"To": "+14155552671", "From": "+14155550100", "Twiml": "<Response/>"},
        headers=headers, trust_env=False,
    )
    assert resp.status_code == 401


def test_prism_alone_rejects_repeated_keys(twilio_mock: TwilioMock) -> None:
    """Why the shim exists: if this ever passes through Prism, the folding can go."""
    resp = httpx.post(
        twilio_mock.prism_url + twilio_mock.calls_path,
        content="To=%2B14155552671&From=%2B14155550100&Twiml=x"
                "&StatusCallbackEvent=initiated&StatusCallbackEvent=answered",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        auth=(twilio_mock.account_sid, twilio_mock.auth_token), trust_env=False,
    )
    assert resp.status_code == 422
    assert "must be array" in resp.text
