"""The paths on our public base URL where Twilio calls back: the dialer names them in the calls it
places, ingest serves them (the two roles share the contract, not each other's code); and the
verdict ingest passes on to the dialers when a machine answered."""

from __future__ import annotations

from pydantic import BaseModel

from agentstudio.callstate import CallState, CallStatus

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


class MachineVerdict(BaseModel):
    """Twilio's async AMD verdict that a machine answered one attempt, signature-checked by ingest
    and queued for a dialer, which holds the Twilio credentials to redirect the call."""

    tenant: str
    call_id: str
    provider_call_id: str  # CallSid: the attempt the verdict is about
    answered_by: str

    def due(self, state: CallState | None) -> bool:
        """Whether the call is to be redirected: a machine is on the attempt this verdict is about, it
        is still under way, and the call's policy says what to do with machines."""
        return (state is not None and not state.terminal and state.machine and state.voicemail is not None
                and state.provider_call_id in (None, self.provider_call_id)
                and state.attempt_of(self.provider_call_id) is None)
