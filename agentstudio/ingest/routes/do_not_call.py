"""The key's tenant's do-not-call list: add, check, remove one number, and import a CSV of them.
Changes need the dnc:manage scope; a check is also allowed with calls:read."""

from __future__ import annotations

import csv
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from nats.errors import Error as NatsError
from pydantic import BaseModel, Field
from starlette.responses import Response

from agentstudio import phone
from agentstudio.do_not_call import Listing
from agentstudio.ingest.auth import Principal, require_scope, service_of, unavailable
from agentstudio.ingest.errors import ApiError, responses

router = APIRouter(prefix="/api/v1/do-not-call", tags=["do-not-call"])
Manager = Annotated[Principal, Depends(require_scope("dnc:manage"))]
Reader = Annotated[Principal, Depends(require_scope("dnc:manage", "calls:read"))]

_CSV_TYPES = ("text/csv", "text/plain")
_COLUMN = "phone_number"
_MAX_LINE = 4096  # no number needs more; bounds what one line may hold before its newline
_WRITE_EVERY = 1024  # numbers validated before they are written, so an import holds no more
_MAX_ERRORS = 1000  # invalid lines listed in the report (all are counted)


class AddNumber(BaseModel):
    phone_number: str = Field(description="E.164, e.g. +14155552671; spaces, dashes and brackets are removed.")
    reason: str | None = Field(None, max_length=500, description="Why, for people reading the list.")


class LineError(BaseModel):
    line: int = Field(description="1-based line of the CSV body.")
    message: str


class ImportReport(BaseModel):
    added: int = Field(description="Numbers listed by this import.")
    already_listed: int = Field(description="Valid numbers that were on the list already (kept as they were).")
    invalid: int = Field(description="Lines that held no valid number; the first 1000 are in errors.")
    errors: list[LineError]


def _number(raw: str, field: str = "phone_number") -> str:
    try:
        return phone.normalize(raw.strip())
    except phone.InvalidPhoneNumber as exc:
        raise ApiError(400, "invalid_phone_number", f"{field}: invalid phone number: {exc}", field) from None


@router.post(
    "",
    status_code=201,
    response_model=Listing,
    responses={200: {"model": Listing, "description": "Already listed: the listing as it was."},
               **responses(400, 401, 403, 429, 503)},
    summary="Add a number to the do-not-call list",
)
async def add_number(request: Request, body: AddNumber, principal: Manager) -> Response:
    svc = service_of(request)
    number = _number(body.phone_number)
    try:
        listing, new = await svc.dnc.add(principal.tenant, number, "api", body.reason)
    except (NatsError, TimeoutError) as exc:
        raise unavailable(svc) from exc
    return Response(listing.model_dump_json(), status_code=201 if new else 200, media_type="application/json")


@router.post(
    "/import",
    response_model=ImportReport,
    responses=responses(400, 401, 403, 413, 415, 429, 503),
    openapi_extra={"requestBody": {"required": True, "content": {
        "text/csv": {"schema": {"type": "string"},
                     "example": "phone_number,name\n+14155552671,Ann\n+919876543210,Ravi\n"}}}},
    summary="Import numbers from a CSV",
    description="One number per line, or a header row with a `phone_number` column. Valid numbers are"
                " listed as they are read (source `import`); invalid lines are reported with their line"
                " numbers. Importing the same file again changes nothing, so after a 413 or 503 the whole"
                " file can be sent again.",
)
async def import_numbers(request: Request, principal: Manager) -> ImportReport:
    svc = service_of(request)
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media not in _CSV_TYPES:
        raise ApiError(415, "unsupported_media_type", "Content-Type must be text/csv", "Content-Type")
    limit = svc.settings.dnc_import_max_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "payload_too_large", f"body is larger than {limit} bytes")
    report = ImportReport(added=0, already_listed=0, invalid=0, errors=[])
    batch: list[str] = []

    async def write() -> None:
        added = await svc.dnc.add_many(principal.tenant, batch, "import")
        report.added += added
        report.already_listed += len(batch) - added
        batch.clear()

    column: int | None = None  # of phone_number in a header row; None: one number per line
    first = True
    try:
        async for number, line in _lines(request, limit):
            cells = next(csv.reader([line]), [])
            if not any(c.strip() for c in cells):
                continue
            if first:  # the first line decides: a header row naming phone_number, or a number
                first = False
                names = [c.strip().lower() for c in cells]
                if _COLUMN in names:
                    column = names.index(_COLUMN)
                    continue
            problem = None
            if column is None and len(cells) > 1:
                problem = f"expected one number per line, or a header row with a {_COLUMN} column"
            elif len(cells) <= (column or 0) or not cells[column or 0].strip():
                problem = f"no {_COLUMN} on this line"
            else:
                try:
                    batch.append(phone.normalize(cells[column or 0].strip()))
                except phone.InvalidPhoneNumber as exc:
                    problem = f"invalid phone number: {exc}"
            if problem is not None:
                report.invalid += 1
                if len(report.errors) < _MAX_ERRORS:
                    report.errors.append(LineError(line=number, message=problem))
            if len(batch) >= _WRITE_EVERY:
                await write()
        await write()
    except (NatsError, TimeoutError) as exc:
        raise unavailable(svc) from exc
    return report


async def _lines(request: Request, limit: int) -> AsyncIterator[tuple[int, str]]:
    """The body's lines with their 1-based numbers, read as they arrive (never the whole body)."""
    size, count, pending = 0, 0, b""
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "payload_too_large",
                           f"body is larger than {limit} bytes; some of its numbers may be listed already "
                           "(importing them again is harmless)")
        *complete, pending = (pending + chunk).split(b"\n")
        for raw in complete:
            count += 1
            yield count, _text(raw, count)
        if len(pending) > _MAX_LINE:
            raise ApiError(400, "invalid_csv", f"line {count + 1} is longer than {_MAX_LINE} bytes")
    if pending.strip():
        yield count + 1, _text(pending, count + 1)


def _text(raw: bytes, number: int) -> str:
    try:
        return raw.decode("utf-8-sig" if number == 1 else "utf-8").rstrip("\r")
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_csv", f"line {number} is not UTF-8") from None


@router.get(
    "/{phone_number}",
    response_model=Listing,
    responses=responses(400, 401, 403, 404, 429, 503),
    summary="Check whether a number is on the do-not-call list",
    description="200 with its listing when it is listed, 404 when it is not. Needs dnc:manage or calls:read.",
)
async def check_number(request: Request, phone_number: str, principal: Reader) -> Listing:
    svc = service_of(request)
    number = _number(phone_number)
    try:
        listing = await svc.dnc.get(principal.tenant, number)
    except (NatsError, TimeoutError) as exc:
        raise unavailable(svc) from exc
    if listing is None:
        raise ApiError(404, "not_found", "the number is not on the do-not-call list", "phone_number")
    return listing


@router.delete(
    "/{phone_number}",
    status_code=204,
    response_class=Response,
    responses=responses(400, 401, 403, 404, 429, 503),
    summary="Remove a number from the do-not-call list",
)
async def remove_number(request: Request, phone_number: str, principal: Manager) -> Response:
    svc = service_of(request)
    number = _number(phone_number)
    try:
        removed = await svc.dnc.remove(principal.tenant, number)
    except (NatsError, TimeoutError) as exc:
        raise unavailable(svc) from exc
    if not removed:
        raise ApiError(404, "not_found", "the number is not on the do-not-call list", "phone_number")
    return Response(status_code=204)
