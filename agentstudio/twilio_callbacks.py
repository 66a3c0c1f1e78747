"""The paths on our public base URL where Twilio calls back: the dialer names them in the calls it
places, ingest serves them (the two roles share the contract, not each other's code)."""

from __future__ import annotations

from agentstudio.callstate import CallStatus

STATUS_CALLBACK_PATH = "/api/v1/providers/twilio/status"  # call status changes
RELAY_ENDED_PATH = "/api/v1/providers/twilio/relay-ended"  # <Connect action>: the relay session ended
AMD_CALLBACK_PATH = "/api/v1/providers/twilio/amd"  # AsyncAmdStatusCallback: a human or a machine answered

# A call's status as Twilio names it (CallStatus in a callback, `status` of the Call resource) -> ours.
TWILIO_STATUS: dict[str, CallStatus] = {
    "queued": "dialing",
    "initiated": "dialing",
    "ringing": "ringing",
    "in-progress": "in_progress",
    "answered": "in_progress",
    "completed": "completed",
    "busy": "busy",
    "no-answer": "no_answer",
    "failed": "failed",
    "canceled": "canceled",
}
