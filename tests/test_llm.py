"""ChatModel against the scripted model server: what a conversation sees of a streamed reply, what the
endpoint receives, and how failures arrive."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from agentstudio.conversation.llm import (ChatModel, Endpoint, Finished, LlmError, LlmEvent, TextDelta,
                                         ToolCall)
from agentstudio.natsserver import free_port
from scripted_model import Reply, ScriptedModel

USER = [{"role": "user", "content": "Hi, who is this?"}]
TOOLS = [
    {"type": "function", "function": {"name": "capture_email", "description": "Save the callee's email.",
                                      "parameters": {"type": "object", "properties": {"email": {"type": "string"}},
                                                     "required": ["email"]}}},
    {"type": "function", "function": {"name": "end_call", "description": "Hang up.",
                                      "parameters": {"type": "object", "properties": {}}}},
]


@pytest.fixture
def model() -> Iterator[ScriptedModel]:
    with ScriptedModel() as server:
        yield server


@pytest.fixture
async def chat() -> AsyncIterator[ChatModel]:
    client = ChatModel(timeout_seconds=5)
    yield client
    await client.aclose()


def endpoint(model: ScriptedModel, api_key: str | None = None) -> Endpoint:
    return Endpoint(base_url=model.url, model="scripted-1", api_key=api_key, temperature=0.1, max_tokens=128)


async def collect(chat: ChatModel, ep: Endpoint, messages: list[dict[str, Any]] = USER,
                  tools: list[dict[str, Any]] | None = None) -> list[LlmEvent]:
    return [event async for event in chat.stream(ep, messages, tools or [])]


async def test_text_arrives_token_by_token(model: ScriptedModel, chat: ChatModel) -> None:
    model.script([Reply("Hello there! This is Ada from Acme.")])
    events = await collect(chat, endpoint(model))
    assert [e.text for e in events[:-1] if isinstance(e, TextDelta)] == \
        ["Hello", " there", "!", " This", " is", " Ada", " from", " Acme", "."]
    assert events[-1] == Finished("stop")
    assert len(events) == 10  # nothing else: the empty first delta is not passed on


async def test_two_tool_calls_in_one_reply(model: ScriptedModel, chat: ChatModel) -> None:
    model.script([Reply("One moment.", tool_calls=[("capture_email", {"email": "ada@example.com"}),
                                                    ("end_call", {})])])
    events = await collect(chat, endpoint(model), tools=TOOLS)
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    calls = [e for e in events if isinstance(e, ToolCall)]
    assert text == "One moment."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == \
        [("capture_email", {"email": "ada@example.com"}), ("end_call", {})]
    assert all(c.id.startswith("call_") for c in calls) and calls[0].id != calls[1].id
    assert events[-1] == Finished("tool_calls")
    assert [type(e) for e in events[-3:]] == [ToolCall, ToolCall, Finished]


async def test_tool_results_go_back_to_the_model(model: ScriptedModel, chat: ChatModel) -> None:
    model.script([Reply(tool_calls=[("capture_email", {"email": "ada@example.com"})]), Reply("Got it, thanks!")])
    [call, _] = await collect(chat, endpoint(model), tools=TOOLS)
    assert isinstance(call, ToolCall)
    messages = USER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "saved"},
    ]
    events = await collect(chat, endpoint(model), messages, TOOLS)
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "Got it, thanks!"
    assert model.requests[1]["messages"][2] == {"role": "tool", "tool_call_id": call.id, "content": "saved"}


async def test_request_carries_the_endpoint_settings(model: ScriptedModel, chat: ChatModel) -> None:
    model.script([Reply("Hi."), Reply("Hi again.")])
    await collect(chat, endpoint(model), tools=TOOLS)
    await collect(chat, endpoint(model))
    with_tools, without = model.requests
    assert (with_tools["model"], with_tools["temperature"], with_tools["max_tokens"], with_tools["stream"]) == \
        ("scripted-1", 0.1, 128, True)
    assert with_tools["tools"] == TOOLS and with_tools["messages"] == USER
    assert "tools" not in without


async def test_authorization_header(chat: ChatModel) -> None:
    with ScriptedModel([Reply("Hi.")], api_key="sk-test-123456") as model:
        await collect(chat, endpoint(model, "sk-test-123456"))
        assert model.headers[0]["authorization"] == "Bearer sk-test-123456"
    with ScriptedModel([Reply("Hi.")]) as model:
        await collect(chat, endpoint(model, None))
        assert "authorization" not in model.headers[0]


async def test_wrong_key_is_http_401_without_the_key(chat: ChatModel) -> None:
    with ScriptedModel([Reply("Hi.")], api_key="sk-right-key") as model:
        with pytest.raises(LlmError) as failure:
            await collect(chat, endpoint(model, "sk-wrong-secret-987"))
    assert failure.value.code == "http_401"
    assert "401" in str(failure.value) and "Incorrect API key" in str(failure.value)
    assert "sk-wrong-secret-987" not in str(failure.value)
    assert "sk-wrong-secret-987" not in repr(endpoint(model, "sk-wrong-secret-987"))


async def test_unreachable_endpoint_is_connection(chat: ChatModel) -> None:
    ep = Endpoint(base_url=f"http://127.0.0.1:{free_port()}/v1", model="scripted-1", api_key=None)
    with pytest.raises(LlmError) as failure:
        await collect(chat, ep)
    assert failure.value.code == "connection"


async def test_slow_model_is_timeout(model: ScriptedModel) -> None:
    model.script([Reply("Too late.", delay_seconds=2)])
    impatient = ChatModel(timeout_seconds=0.3)
    try:
        with pytest.raises(LlmError) as failure:
            await collect(impatient, endpoint(model))
    finally:
        await impatient.aclose()
    assert failure.value.code == "timeout"


async def test_exhausted_script_fails_visibly(model: ScriptedModel, chat: ChatModel) -> None:
    with pytest.raises(LlmError) as failure:
        await collect(chat, endpoint(model))
    assert failure.value.code == "http_500" and "script exhausted" in str(failure.value)


async def test_model_rejects_tool_message_without_its_call(model: ScriptedModel) -> None:
    model.script([Reply("Hi.")])
    orphan = USER + [{"role": "tool", "tool_call_id": "call_nowhere", "content": "saved"}]
    async with httpx.AsyncClient(base_url=model.url) as client:
        rejected = await client.post("/chat/completions", json={"model": "scripted-1", "messages": orphan})
        accepted = await client.post("/chat/completions", json={"model": "scripted-1", "messages": USER})
    assert rejected.status_code == 400
    assert rejected.json()["error"]["type"] == "invalid_request_error"
    assert rejected.json()["error"]["param"] == "messages.[1].role"
    # A rejected request consumes no reply.
    assert accepted.status_code == 200
    assert accepted.json()["choices"][0]["message"]["content"] == "Hi."


async def test_server_sent_events_as_servers_write_them(chat: ChatModel) -> None:
    # Servers other than OpenAI's send keep-alive comments, CRLF line ends, `data:` without its space and
    # fields chat completions do not use: the reply is the same.
    chunks = [{"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]} for text in ("Hi", " there")]
    chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    events = (b": keep-alive\r\n\r\n" + b"id: 1\r\ndata: " + json.dumps(chunks[0]).encode() + b"\r\n\r\n"
              + b"data:" + json.dumps(chunks[1]).encode() + b"\n\n" + b"event: message\ndata: "
              + json.dumps(chunks[2]).encode() + b"\n\n" + b"data: [DONE]\n\n")

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n%s"
                     % (len(events), events))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    async with server:
        ep = Endpoint(base_url=f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1", model="m", api_key=None)
        assert await collect(chat, ep) == [TextDelta("Hi"), TextDelta(" there"), Finished("stop")]


async def test_a_burst_of_replies_keeps_its_connections(model: ScriptedModel, chat: ChatModel) -> None:
    # A dialer carrying hundreds of conversations streams dozens of replies at once; the connections of
    # a burst stay for the next turns (httpx's default kept 20 idle, so each turn after a burst paid a
    # new TCP connect).
    burst = 100
    # A second is far longer than starting the burst takes, so every reply is in flight at once.
    model.script(lambda body: Reply("Hello.", delay_seconds=1.0))
    for _ in range(2):
        replies = await asyncio.gather(*(collect(chat, endpoint(model)) for _ in range(burst)))
        assert all(events[-1] == Finished("stop") for events in replies)
    first, second = model.clients[:burst], model.clients[burst:]
    assert len(set(first)) == burst and set(second) <= set(first)


async def test_a_streamed_token_costs_few_python_calls(model: ScriptedModel, chat: ChatModel) -> None:
    # The model client's CPU bounded how many conversations one dialer process carries (py-spy with
    # bench/conversations.py: the openai SDK over httpx, 41% of the samples at 500 conversations). Its
    # work is counted here as Python calls on the event loop's thread (the server has its own): the SDK
    # path took about 3,700 a reply and 220 a token, this client 384 and 78 (531 a reply while aiohttp
    # also looked up ~/.netrc for each request, trust_env).
    async def calls(words: int) -> int:
        model.script([Reply(" ".join(["word"] * words), token_delay_seconds=0.002)])
        counted = 0

        def count(frame: Any, event: str, arg: Any) -> None:
            nonlocal counted
            counted += event == "call"

        sys.setprofile(count)
        try:
            events = await collect(chat, endpoint(model))
        finally:
            sys.setprofile(None)
        assert len(events) == words + 1
        return counted

    await calls(1)  # the first reply also connects
    one, many = await calls(1), await calls(201)
    assert one < 450
    assert (many - one) / 200 < 120
