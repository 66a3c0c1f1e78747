"""The one error type of the HTTP layer and the one JSON shape every error response has:
`{"error": {"code": "...", "message": "...", "field": "..."}}`.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import FastAPI, Request
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


def document_errors(app: FastAPI) -> None:
    """Make `app`'s OpenAPI document say what the handlers above answer. FastAPI documents a 422
    HTTPValidationError on every route with parameters or a body, but handle_validation_error answers
    those 400 in ErrorResponse; any body can also meet the body deadline (408); and every route that
    can answer 401 takes a bearer key."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        spec = generate()
        error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
        for operations in spec["paths"].values():
            for operation in operations.values():
                answers = operation["responses"]
                if "HTTPValidationError" in orjson.dumps(answers.get("422", {})).decode():
                    del answers["422"]
                    answers.setdefault("400", {"description": _DESCRIPTIONS[400], "content": error})
                if "requestBody" in operation:
                    answers.setdefault("408", {"description": _DESCRIPTIONS[408], "content": error})
                if "401" in answers:
                    operation["security"] = [{"bearer": []}]
        components = spec.setdefault("components", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.get("schemas", {}).pop(name, None)
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer",
                                                    "description": "An ApiKey's key: as_live_... or as_test_..."}}
        app.openapi_schema = spec
        return spec

    app.openapi = openapi  # type: ignore[method-assign]


_DESCRIPTIONS = {
    400: "Invalid request: missing or invalid field (named in error.field).",
    401: "Missing, malformed, unknown, expired, disabled or deleted API key.",
    403: "The API key lacks the scope this route needs.",
    404: "Not found in the key's namespace.",
    408: "The body did not arrive whole within AGENTSTUDIO_BODY_TIMEOUT_SECONDS (30 s); the connection is closed.",
    409: "The number is on the do-not-call list (error.code do_not_call: final, nothing was queued; do not"
         " retry), or the call is past the state this needs (error.code not_cancelable).",
    413: "Body larger than the limit (64 KiB).",
    415: "Content-Type is not application/json.",
    422: "Both workflow_slug and agent_slug given.",
    429: "Over the key's rate limit; see Retry-After.",
    503: "The queue is unreachable; nothing was queued. Retry after Retry-After seconds.",
}
