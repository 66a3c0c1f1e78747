"""The official Twilio REST client, built one way: the dialers are the only role that calls Twilio
(they place calls, ask about overdue ones and redirect those a machine answered)."""

from __future__ import annotations

from twilio.rest import Client


def twilio_client(account_sid: str, auth_token: str, api_base_url: str = "") -> Client:
    client = Client(account_sid, auth_token)
    if api_base_url:
        client.api.base_url = api_base_url.rstrip("/")
    return client
