"""Why an HTTP request we send on a tenant's behalf failed, in words that never quote it: a header
value it cannot carry, or a transport failure by its class. An exception's own message may quote the
request's headers, Secrets among them, so it never reaches a log, a record, an event or a model."""

from __future__ import annotations

import httpx


def header_problem(value: str) -> str | None:
    """Why `value` cannot be sent as an HTTP header value (RFC 9110: visible ASCII, with spaces and
    tabs inside; the HTTP client would refuse anything else, quoting the value), or None."""
    if "\r" in value or "\n" in value:
        return "it contains a line break"
    if "\0" in value:
        return "it contains a NUL character"
    if any(c < " " and c != "\t" or c == "\x7f" for c in value):
        return "it contains a control character"
    if not value.isascii():
        return "it contains a character that is not ASCII"
    return None


def described(exc: httpx.HTTPError, host: str) -> str:
    """The failure of a request to `host` by its class (what we know), never by its message."""
    if isinstance(exc, httpx.TimeoutException):
        return f"{host} did not answer in time"
    if isinstance(exc, httpx.ConnectError):
        return f"could not connect to {host}"
    if isinstance(exc, httpx.RemoteProtocolError):
        return f"{host} did not answer with valid HTTP"
    if isinstance(exc, httpx.NetworkError):
        return f"the connection to {host} broke"
    if isinstance(exc, httpx.LocalProtocolError):
        return f"the request to {host} was not valid HTTP"
    if isinstance(exc, httpx.DecodingError):
        return f"{host} answered with a body that could not be decoded"
    return f"the request to {host} failed ({type(exc).__name__})"
