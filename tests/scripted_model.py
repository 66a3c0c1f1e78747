"""A scripted stand-in for an OpenAI-compatible model server, since no real model runs offline. It speaks
the real wire protocol (`POST /v1/chat/completions`, SSE `chat.completion.chunk` streams ending in
`data: [DONE]`) and rejects what the real API rejects with its error shape, so a client that passes here
talks to OpenAI, vLLM or Ollama the same way:

    with ScriptedModel([Reply("Hello there!"), Reply(tool_calls=[("end_call", {})])]) as model:
        endpoint = Endpoint(base_url=model.url, model="any", api_key=None)
        ...                             # model.requests holds every request body, model.headers their headers

A streamed reply's own first-token delay (from the request read to its first chunk with content or a
tool call) goes into model.first_tokens as (request body, seconds), for benchmarks that subtract it.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

ROLES = {"system", "developer", "user", "assistant", "tool", "function"}
# A word or one punctuation mark with the whitespace before it, or trailing whitespace: the pieces
# always join back to the text.
TOKEN = re.compile(r"\s*(?:\w+|[^\w\s])|\s+")
FUNCTION_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


@dataclass
class Reply:
    text: str = ""
    tool_calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (function name, arguments)
    delay_seconds: float = 0.0  # before the first chunk (a slow model)
    token_delay_seconds: float = 0.0  # between chunks


Script = list[Reply] | Callable[[dict[str, Any]], Reply]


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


def error(status: int, message: str, type_: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status)


def validate(body: Any) -> None:
    """The checks of the real API that catch mistakes in building a conversation."""
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    if not body.get("model"):
        raise BadRequest("you must provide a model parameter", "model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("Missing required parameter: 'messages'.", "messages", "missing_required_parameter")
    pending: dict[str, int] = {}  # tool_call_id → index of the assistant message still waiting for its answer
    answerable: set[str] = set()
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise BadRequest(f"Invalid value: {role!r}. Supported values are: {', '.join(sorted(ROLES))}.",
                             f"messages[{i}].role", "invalid_value")
        if role == "tool":
            if message.get("tool_call_id") not in answerable:
                raise BadRequest("Invalid parameter: messages with role 'tool' must be a response to a preceeding "
                                 "message with 'tool_calls'.", f"messages.[{i}].role")
            pending.pop(message["tool_call_id"], None)
            continue
        if pending:
            raise_unanswered(pending)
        answerable = {c.get("id") for c in message.get("tool_calls") or []} if role == "assistant" else set()
        pending = dict.fromkeys(answerable, i)
    if pending:
        raise_unanswered(pending)
    tools = body.get("tools", [])
    if not isinstance(tools, list):
        raise BadRequest("Invalid type for 'tools': expected an array.", "tools", "invalid_type")
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise BadRequest("Invalid value. Supported values are: 'function'.", f"tools[{i}].type", "invalid_value")
        if not isinstance(function, dict) or not FUNCTION_NAME.match(str(function.get("name", ""))):
            raise BadRequest(f"Invalid 'tools[{i}].function.name': expected a string of letters, digits, "
                             "underscores or dashes.", f"tools[{i}].function.name", "invalid_value")
        if not isinstance(function.get("parameters"), dict):
            raise BadRequest("Invalid type for 'parameters': expected a JSON schema object.",
                             f"tools[{i}].function.parameters", "invalid_type")


def raise_unanswered(pending: dict[str, int]) -> None:
    raise BadRequest("An assistant message with 'tool_calls' must be followed by tool messages responding to each "
                     f"'tool_call_id'. The following tool_call_ids did not have response messages: "
                     f"{', '.join(sorted(pending))}", f"messages.[{min(pending.values())}].role")


def chunk(base: dict[str, Any], delta: dict[str, Any], finish_reason: str | None = None) -> str:
    body = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
    return f"data: {json.dumps(body)}\n\n"


def argument_fragments(arguments: str) -> list[str]:
    n = len(arguments)
    return [p for p in (arguments[: n // 3], arguments[n // 3: 2 * n // 3], arguments[2 * n // 3:]) if p]


class ScriptedModel:
    """A real HTTP server on a free 127.0.0.1 port, run by uvicorn in a background thread, so both sync and
    async tests and subprocesses can reach it."""

    def __init__(self, replies: Script | None = None, api_key: str | None = None) -> None:
        self.api_key = api_key
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.clients: list[int] = []  # each request's client port: which connection it came on
        self.first_tokens: list[tuple[dict[str, Any], float]] = []
        self._lock = threading.Lock()
        self._script: Script = replies if replies is not None else []
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}/v1"
        app = Starlette(routes=[Route("/v1/chat/completions", self._completions, methods=["POST"])])
        # A short graceful shutdown: a client that gave up on a slow reply must not hold up the test.
        self._server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="off",
                                                     timeout_graceful_shutdown=1))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True)

    def script(self, replies: Script) -> None:
        with self._lock:
            self._script = replies

    def __enter__(self) -> ScriptedModel:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the scripted model server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._socket.close()

    def _next_reply(self, body: dict[str, Any]) -> Reply | None:
        with self._lock:
            if callable(self._script):
                return self._script(body)
            return self._script.pop(0) if self._script else None

    async def _completions(self, request: Request) -> Response:
        try:
            body = json.loads(await request.body())
            received = time.perf_counter()
        except ValueError:
            return error(400, "We could not parse the JSON body of your request.", "invalid_request_error")
        with self._lock:
            self.requests.append(body)
            self.headers.append(dict(request.headers))
            self.clients.append(request.client.port if request.client else 0)
        if self.api_key is not None and request.headers.get("authorization") != f"Bearer {self.api_key}":
            given = request.headers.get("authorization", "").removeprefix("Bearer ")
            masked = f"{given[:3]}{'*' * max(len(given) - 7, 0)}{given[-4:]}" if len(given) > 7 else "***"
            return error(401, f"Incorrect API key provided: {masked}.", "invalid_request_error", None,
                         "invalid_api_key")
        try:
            validate(body)
        except BadRequest as e:
            return error(400, str(e), "invalid_request_error", e.param, e.code)
        reply = self._next_reply(body)
        if reply is None:
            return error(500, f"script exhausted: no reply left for request {len(self.requests)}", "server_error")
        calls = [{"id": f"call_{secrets.token_hex(12)}", "type": "function",
                  "function": {"name": name, "arguments": json.dumps(args)}} for name, args in reply.tool_calls]
        finish_reason = "tool_calls" if calls else "stop"
        base = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": body["model"]}
        if body.get("stream"):
            return StreamingResponse(self._chunks(reply, calls, finish_reason, base, body, received),
                                     media_type="text/event-stream")
        await asyncio.sleep(reply.delay_seconds)
        message = {"role": "assistant", "content": reply.text or None, "refusal": None}
        if calls:
            message["tool_calls"] = calls
        return JSONResponse({**base, "object": "chat.completion", "choices": [
            {"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}]})

    async def _chunks(self, reply: Reply, calls: list[dict[str, Any]], finish_reason: str,
                      base: dict[str, Any], body: dict[str, Any], received: float) -> AsyncIterator[str]:
        base = {**base, "object": "chat.completion.chunk"}
        # As the real API: a first chunk with the role and an empty content, then one chunk per piece.
        deltas: list[dict[str, Any]] = [{"role": "assistant", "content": "" if reply.text else None}]
        deltas += [{"content": token} for token in TOKEN.findall(reply.text)]
        for index, call in enumerate(calls):
            function = call["function"]
            deltas.append({"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                           "function": {"name": function["name"], "arguments": ""}}]})
            deltas += [{"tool_calls": [{"index": index, "function": {"arguments": fragment}}]}
                       for fragment in argument_fragments(function["arguments"])]
        first = next((i for i, d in enumerate(deltas) if d.get("content") or d.get("tool_calls")), None)
        await asyncio.sleep(reply.delay_seconds)
        for i, delta in enumerate(deltas):
            if i and reply.token_delay_seconds:
                await asyncio.sleep(reply.token_delay_seconds)
            if i == first:
                with self._lock:
                    self.first_tokens.append((body, time.perf_counter() - received))
            yield chunk(base, delta)
        yield chunk(base, {}, finish_reason)
        yield "data: [DONE]\n\n"
