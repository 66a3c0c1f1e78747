"""Records and messages that more than one version of Agent Studio reads and writes.

During a rolling upgrade old and new dialers, ingest and webhook workers share the queue and the
call records, so each reads what the other wrote. A field this version does not know is kept, not
refused (a refused record would stall its call), and is written back as it came, as protobuf keeps
unknown fields: the next version's additions survive this one's compare-and-set writes.
"""

from __future__ import annotations

from typing import Self

from pydantic import BaseModel, ConfigDict


class Stored(BaseModel):
    model_config = ConfigDict(extra="allow")

    @classmethod
    def read(cls, data: bytes | str) -> Self:
        """One stored value. `extra="allow"` reaches nested models that forbid unknown fields in
        manifests (a CallPolicy's retries copied into the record): accepted, though not written back."""
        return cls.model_validate_json(data, extra="allow")
