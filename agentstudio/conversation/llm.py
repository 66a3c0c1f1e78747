"""Streaming chat with any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, Ollama, ...) through
the official `openai` SDK, turned into the few events a conversation acts on: text as it arrives, the
tool calls the reply asked for, and how it finished."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
from openai import AsyncOpenAI, AsyncStream, omit


# Connections to model endpoints (a reply streams on one) go in POOLS pools of POOL_CONNECTIONS each.
# httpcore walks a pool's every connection, and each for every queued request, on each request and
# response: one pool of 100 took 53% of a dialer's CPU at 500 conversations, one without a cap 58%
# (bench/conversations.py with py-spy). Replies take the pools in turn.
POOLS = 8
POOL_CONNECTIONS = 25


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
        # The timeout bounds connecting and each wait for the next chunk, so a stalled model fails the
        # turn instead of leaving the callee in silence.
        self._timeout = timeout_seconds
        # Every connection of a pool is kept for the next turns: httpx's default kept 20 of 100, so
        # each turn after a burst paid a new TCP connect. One TLS context for all (each loads the CAs).
        limits = httpx.Limits(max_connections=POOL_CONNECTIONS, max_keepalive_connections=POOL_CONNECTIONS)
        tls = httpx.create_ssl_context()
        self._http = [httpx.AsyncClient(timeout=timeout_seconds, limits=limits, verify=tls) for _ in range(POOLS)]
        self._turns = itertools.count()
        self._clients: dict[tuple[str, str | None, int], AsyncOpenAI] = {}

    def _client(self, endpoint: Endpoint) -> AsyncOpenAI:
        pool = next(self._turns) % POOLS
        key = (endpoint.base_url, endpoint.api_key, pool)
        if key not in self._clients:
            # No retries: a live call cannot wait for them. Without a key, a placeholder stops the SDK
            # from reading OPENAI_API_KEY from the environment; stream() omits the header it would make.
            self._clients[key] = AsyncOpenAI(base_url=endpoint.base_url, api_key=endpoint.api_key or "unused",
                                             max_retries=0, timeout=self._timeout, http_client=self._http[pool])
        return self._clients[key]

    async def stream(self, endpoint: Endpoint, messages: list[dict[str, Any]],
                     tools: list[dict[str, Any]]) -> AsyncIterator[LlmEvent]:
        """Stream one reply: TextDelta events as tokens arrive (never an empty one), then every ToolCall
        assembled from the streamed tool_calls deltas (in index order), then exactly one Finished.
        Close the iterator (contextlib.aclosing) to abandon a reply, e.g. when the callee barges in."""
        calls: dict[int, _PartialCall] = {}
        reason: str | None = None
        with _translated_errors(endpoint, self._timeout):
            body: dict[str, Any] = {"model": endpoint.model, "messages": messages, "stream": True,
                                    "temperature": endpoint.temperature, "max_tokens": endpoint.max_tokens}
            if tools:
                body["tools"] = tools
            # The SDK's own request path (its typed `create`) re-walks every message of the history on
            # each turn, several ms for a long call; the body we build is already the wire format, so it
            # goes through the SDK's plain `post`, which still streams, decodes the SSE and raises the
            # API's errors. Each chunk comes as its JSON (cast_to=object): building a typed chunk per
            # token was the largest CPU cost of a live conversation (bench/conversations.py, py-spy).
            response = await self._client(endpoint).post(
                "/chat/completions", body=body, cast_to=object, stream=True, stream_cls=AsyncStream[object],
                options={"headers": {} if endpoint.api_key else {"Authorization": omit}},
            )
            async with response:
                async for chunk in response:
                    for choice in _choices(chunk):
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
        # The SDK clients share the pools and do not own them, so closing those is enough.
        self._clients.clear()
        for http in self._http:
            await http.aclose()


@contextmanager
def _translated_errors(endpoint: Endpoint, timeout: float) -> Iterator[None]:
    """SDK and transport failures as LlmError; httpx's own errors too, which SDKs before 3.x let escape
    from a stream that fails mid-way."""
    where = endpoint.base_url
    try:
        yield
    except openai.APIStatusError as e:
        message = f"{where} answered HTTP {e.status_code}: {_message(e.body)}"
        raise _error(endpoint, f"http_{e.status_code}", message) from e
    except (openai.APITimeoutError, httpx.TimeoutException) as e:
        raise _error(endpoint, "timeout", f"{where} did not answer within {timeout:g}s") from e
    except (openai.APIConnectionError, httpx.TransportError) as e:
        raise _error(endpoint, "connection", f"cannot reach {where}: {type(e.__cause__ or e).__name__}") from e
    # ValueError: a chunk that is not JSON; the others: JSON of another shape than a chunk's.
    except (openai.OpenAIError, httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise _error(endpoint, "bad_stream", f"{where} sent an unusable stream: {type(e).__name__}: {e}") from e


def _choices(chunk: object) -> list[dict[str, Any]]:
    """A streamed chunk's choices, each a JSON object (a chunk of another shape is a bad stream)."""
    choices = chunk.get("choices") if isinstance(chunk, dict) else None
    if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
        raise ValueError(f"a chunk without a list of choices: {str(chunk)[:200]}")
    return choices


def _message(body: object) -> str:
    """The error message of an OpenAI error body (the SDK has already unwrapped `{"error": ...}`)."""
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return body["message"]
    return str(body)


def _error(endpoint: Endpoint, code: str, message: str) -> LlmError:
    # Servers may echo what they were sent; whatever they said, the key does not reach a log.
    if endpoint.api_key:
        message = message.replace(endpoint.api_key, "***")
    return LlmError(code, message[:500])
