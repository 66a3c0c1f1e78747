"""JSON Schema, the one way: checking schemas users write (userContextSchema, tool parameters) and
validating data against them, with jsonschema-rs (compiled, so the ingest hot path stays cheap)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import jsonschema_rs
import orjson


def schema_problem(schema: dict[str, Any]) -> str | None:
    """Why `schema` is not a valid JSON Schema (draft 2020-12 unless it says otherwise), or None."""
    try:
        jsonschema_rs.meta.validate(schema)
        jsonschema_rs.validator_for(schema)
    except (jsonschema_rs.ValidationError, ValueError) as exc:
        return getattr(exc, "message", str(exc)).splitlines()[0]
    return None


@dataclass(frozen=True)
class Violation:
    path: list[str]  # where in the instance, down to a missing required property
    message: str


class Schema:
    def __init__(self, schema: dict[str, Any]) -> None:
        self._validator = jsonschema_rs.validator_for(schema)

    def violation(self, instance: Any) -> Violation | None:
        """The first way `instance` breaks the schema, or None when it is valid."""
        if self._validator.is_valid(instance):
            return None
        error = next(iter(self._validator.iter_errors(instance)))
        path = [str(p) for p in error.instance_path]
        if isinstance(error.kind, jsonschema_rs.ValidationErrorKind.Required):
            path.append(str(error.kind.property))
        return Violation(path, error.message)


@lru_cache(maxsize=1024)
def _compiled(canonical: bytes) -> Schema:
    return Schema(orjson.loads(canonical))


def compiled(schema: dict[str, Any]) -> Schema:
    """A compiled validator, cached by the schema's content."""
    return _compiled(orjson.dumps(schema, option=orjson.OPT_SORT_KEYS))
