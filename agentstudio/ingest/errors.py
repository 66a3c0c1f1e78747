"""The one error type of the HTTP layer and the one JSON shape every error response has:
`{"error": {"code": "...", "message": "...", "field": "..."}}`.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response


class ErrorBody(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers or {}


def error_response(status: int, code: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> Response:
    body: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        body["field"] = field
    return Response(orjson.dumps({"error": body}), status_code=status, headers=headers,
                    media_type="application/json")


async def handle_api_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message, exc.field, exc.headers)


async def handle_validation_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0]
    loc = [str(p) for p in first["loc"] if p not in ("query", "path", "header", "body")]
    return error_response(400, "invalid_request", str(first["msg"]), ".".join(loc) or None)


async def handle_http_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None))


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error responses a route can give."""
    return {s: {"model": ErrorResponse, "description": _DESCRIPTIONS[s]} for s in statuses}


_DESCRIPTIONS = {
    400: "Invalid request: missing or invalid field (named in error.field).",
    401: "Missing, malformed, unknown, expired, disabled or deleted API key.",
    403: "The API key lacks the scope this route needs.",
    404: "Not found in the key's namespace.",
    409: "The number is on the do-not-call list (error.code do_not_call: final, nothing was queued; do not"
         " retry), or the call is past the state this needs (error.code not_cancelable).",
    413: "Body larger than the limit (64 KiB).",
    415: "Content-Type is not application/json.",
    422: "Both workflow_slug and agent_slug given.",
    429: "Over the key's rate limit; see Retry-After.",
    503: "The queue is unreachable; nothing was queued. Retry after Retry-After seconds.",
}
