"""Streaming chat with any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, Ollama, ...), turned
into the few events a conversation acts on: text as it arrives, the tool calls the reply asked for, and
how it finished. The request body is the API's wire format as the conversation builds it, posted with
aiohttp; the reply's server-sent events are read line by line here."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import httpx
import orjson

from agentstudio import tracing

# Replies streaming at once per process (a reply holds a connection while it streams); more wait for a
# free connection, within the timeout. Every connection is kept for the next turns. aiohttp keeps a
# host's idle connections in a list, so one pool serves them all (httpcore walked its pool's every
# connection on each request and response: 8 pools of 25 were needed there).
CONNECTIONS = 200


@dataclass(frozen=True)
class Endpoint:
    base_url: str
    model: str
    api_key: str | None = field(repr=False)  # None: no Authorization header is sent (local models)
    temperature: float = 0.3
    max_tokens: int = 512


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # the raw JSON text the model produced (may be invalid JSON; the caller decides)


@dataclass(frozen=True)
class Finished:
    reason: str | None  # finish_reason: "stop", "tool_calls", "length", ...


LlmEvent = TextDelta | ToolCall | Finished


class LlmError(Exception):
    """The endpoint refused or failed; str() is safe to log and never contains the API key."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code  # e.g. "http_401", "timeout", "connection", "bad_stream"


@dataclass
class _PartialCall:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


class ChatModel:
    """One per process: connections are pooled across calls and endpoints."""

    def __init__(self, timeout_seconds: float = 30.0) -> None:
        # The timeout bounds getting a connection and each wait for the next bytes, so a stalled model
        # fails the turn instead of leaving the callee in silence; a long reply is not cut.
        self._timeout = timeout_seconds
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:  # made on first use: a session belongs to the running event loop
            # httpx's TLS context (certifi's CAs, or SSL_CERT_FILE), as the project's other outbound
            # requests. Not trust_env: aiohttp then reads ~/.netrc in a worker thread for every request
            # (a fifth of a dialer's busy samples at 500 conversations, py-spy); no proxy is configured.
            connector = aiohttp.TCPConnector(limit=CONNECTIONS, ssl=httpx.create_ssl_context())
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None, connect=self._timeout, sock_read=self._timeout))
        return self._session

    async def stream(self, endpoint: Endpoint, messages: list[dict[str, Any]],
                     tools: list[dict[str, Any]]) -> AsyncIterator[LlmEvent]:
        """Stream one reply: TextDelta events as tokens arrive (never an empty one), then every ToolCall
        assembled from the streamed tool_calls deltas (in index order), then exactly one Finished.
        Close the iterator (contextlib.aclosing) to abandon a reply, e.g. when the callee barges in."""
        calls: dict[int, _PartialCall] = {}
        reason: str | None = None
        body: dict[str, Any] = {"model": endpoint.model, "messages": messages, "stream": True,
                                "temperature": endpoint.temperature, "max_tokens": endpoint.max_tokens}
        if tools:
            body["tools"] = tools
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if endpoint.api_key:
            headers["Authorization"] = f"Bearer {endpoint.api_key}"
        tracing.outgoing(headers)  # the caller's `llm request` span is current while the stream is read
        url = endpoint.base_url.rstrip("/") + "/chat/completions"
        with _translated_errors(endpoint, self._timeout):
            async with self._http().post(url, data=orjson.dumps(body), headers=headers,
                                         allow_redirects=False) as response:
                if not 200 <= response.status < 300:
                    raise LlmError(f"http_{response.status}", f"{endpoint.base_url} answered HTTP "
                                   f"{response.status}: {_message(await response.read())}")
                done = False
                async for data in _events(response.content):
                    # Read on past [DONE] to the end of the response, so its connection is kept.
                    if done or (done := data == b"[DONE]"):
                        continue
                    for choice in _choices(orjson.loads(data)):
                        delta = choice.get("delta") or {}
                        if content := delta.get("content"):
                            yield TextDelta(str(content))
                        # The first delta of an index carries id and name, later ones argument fragments.
                        for part in delta.get("tool_calls") or []:
                            call = calls.setdefault(int(part["index"]), _PartialCall())
                            call.id = part.get("id") or call.id
                            if function := part.get("function"):
                                call.name = function.get("name") or call.name
                                call.arguments.append(function.get("arguments") or "")
                        reason = choice.get("finish_reason") or reason
        for index in sorted(calls):
            call = calls[index]
            if not (call.id and call.name):
                raise LlmError("bad_stream", f"{endpoint.base_url} streamed tool call {index} without an id or name")
            yield ToolCall(call.id, call.name, "".join(call.arguments))
        yield Finished(reason)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def _events(content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """The data of each server-sent event: its `data:` lines joined by line breaks, up to the blank line
    that ends it. Chat completions use no other field; comments (`:` lines, keep-alives) are skipped.
    Written here: aiohttp has no SSE reader, and the well-kept ones (httpx-sse) read httpx's streams."""
    data: list[bytes] = []
    async for line in content:
        line = line.rstrip(b"\r\n")
        if not line:
            if data:
                yield b"\n".join(data)
                data = []
        elif line.startswith(b"data:"):
            data.append(line[6:] if line.startswith(b"data: ") else line[5:])
    if data:
        yield b"\n".join(data)


@contextmanager
def _translated_errors(endpoint: Endpoint, timeout: float) -> Iterator[None]:
    """Transport failures and unusable streams as LlmError, with the key masked in every message."""
    where = endpoint.base_url
    try:
        yield
    except LlmError as e:
        raise _error(endpoint, e.code, str(e)) from None
    except TimeoutError as e:  # aiohttp's connect and read timeouts are TimeoutErrors
        raise _error(endpoint, "timeout", f"{where} did not answer within {timeout:g}s") from e
    # ClientPayloadError: the connection ended in the middle of the reply.
    except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
        raise _error(endpoint, "connection", f"cannot reach {where}: {type(e).__name__}") from e
    # ValueError: a chunk that is not JSON (orjson's error is one) or a line too long; the others: JSON of
    # another shape than a chunk's.
    except (aiohttp.ClientError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise _error(endpoint, "bad_stream", f"{where} sent an unusable stream: {type(e).__name__}: {e}") from e


def _choices(chunk: object) -> list[dict[str, Any]]:
    """A streamed chunk's choices, each a JSON object (a chunk of another shape is a bad stream)."""
    choices = chunk.get("choices") if isinstance(chunk, dict) else None
    if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
        raise ValueError(f"a chunk without a list of choices: {str(chunk)[:200]}")
    return choices


def _message(body: bytes) -> str:
    """The message of an OpenAI error body (`{"error": {"message": ...}}`), else the body as text."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode(errors="replace")
    error = parsed.get("error", parsed) if isinstance(parsed, dict) else parsed
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"]
    return str(error)


def _error(endpoint: Endpoint, code: str, message: str) -> LlmError:
    # Servers may echo what they were sent; whatever they said, the key does not reach a log.
    if endpoint.api_key:
        message = message.replace(endpoint.api_key, "***")
    return LlmError(code, message[:500])
