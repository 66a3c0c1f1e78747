"""The transcript: every turn of a call in order, as it goes into the call record and `call.completed`.

One flat shape for every kind, so receivers can read it without a schema per kind:
- message: `speaker` agent|callee said `text`; an agent message cut short by barge-in has
  `interrupted: true` and `text` is what the callee actually heard.
- dtmf: the callee pressed `digit`.
- tool: the agent called `tool` with `arguments`; `result` (what the model read back) or `error`.
- handoff: `agent` handed the call to `to`, with `summary`.
- transfer: the call was connected to the human number `to`.
- silence: the callee said nothing for `seconds`.
- end: the conversation ended for `reason` (end_call, callee_hangup, silence, max_duration,
  transfer, model_error, error).
`agent` is always the agent in charge at that moment.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

TurnKind = Literal["message", "dtmf", "tool", "handoff", "transfer", "silence", "end"]


class Turn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: TurnKind
    at: datetime
    agent: str
    speaker: Literal["agent", "callee"] | None = None
    text: str | None = None
    interrupted: bool | None = None
    digit: str | None = None
    tool: str | None = None
    arguments: Any = None
    result: Any = None
    error: str | None = None
    elapsed_ms: int | None = None
    to: str | None = None
    summary: str | None = None
    seconds: int | None = None
    reason: str | None = None

    def record(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


def turn(kind: TurnKind, agent: str, **fields: Any) -> Turn:
    return Turn(kind=kind, at=datetime.now(timezone.utc), agent=agent, **fields)
