"""The paths on our public base URL where Twilio calls back: the dialer names them in the calls it
places, ingest serves them (the two roles share the contract, not each other's code)."""

from __future__ import annotations

STATUS_CALLBACK_PATH = "/api/v1/providers/twilio/status"  # call status changes
RELAY_ENDED_PATH = "/api/v1/providers/twilio/relay-ended"  # <Connect action>: the relay session ended
