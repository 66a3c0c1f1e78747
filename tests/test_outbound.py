"""An Agent's `api_call` tool against a real HTTP server on loopback: what is refused never reaches it,
what is allowed arrives exactly as sent, and every answer comes back bounded in time and size."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from agentstudio.addresses import Refused, guard
from agentstudio.conversation.outbound import ApiCaller, ApiResult

ANSWER = {"ok": True, "order": {"id": "A-17", "items": ["tea", "scones"]}}


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: bytes


@dataclass
class Target:
    """A partner API: records every request it receives and answers by path."""

    port: int = 0
    seen: list[Seen] = field(default_factory=list)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


def _handler(target: Target) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            headers = {k.lower(): v for k, v in self.headers.items()}
            target.seen.append(Seen(self.command, self.path, headers, self.rfile.read(length)))
            route = self.path.split("?")[0]
            if route == "/endless":  # only a client that stops reading ever finishes
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                try:
                    while True:
                        self.wfile.write(b"x" * 65536)
                except OSError:
                    pass
            elif route == "/slow":
                time.sleep(3)
                self._answer(200, b"{}", "application/json")
            elif route == "/drip":  # never idle long enough for a read timeout to fire
                self.send_response(200)
                self.send_header("Content-Length", "40")
                self.end_headers()
                try:
                    for _ in range(40):
                        self.wfile.write(b"x")
                        self.wfile.flush()
                        time.sleep(0.1)
                except OSError:
                    pass  # the client gave up, as it should
            elif route == "/redirect":
                self.send_response(302)
                self.send_header("Location", target.url("/echo"))
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self._answer(200, json.dumps(ANSWER).encode(), "application/json")

        def _answer(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture(scope="module")
def server() -> Iterator[Target]:
    target = Target()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(target))
    httpd.daemon_threads = True
    target.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield target
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def target(server: Target) -> Target:
    server.seen.clear()
    return server


@pytest.fixture
async def caller() -> AsyncIterator[ApiCaller]:
    c = ApiCaller()
    yield c
    await c.aclose()


@dataclass
class FakeDns:
    """Answers for chosen names (one answer per lookup, then failure); other names resolve for real."""

    answers: dict[str, list[list[str]]] = field(default_factory=dict)
    lookups: list[str] = field(default_factory=list)


@pytest.fixture
async def dns(monkeypatch: pytest.MonkeyPatch) -> FakeDns:
    fake = FakeDns()
    loop = asyncio.get_running_loop()
    real = loop.getaddrinfo

    async def getaddrinfo(host: Any, port: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        if name not in fake.answers:
            return await real(host, port, **kwargs)
        fake.lookups.append(name)
        if not fake.answers[name]:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
            for a in fake.answers[name].pop(0)
        ]

    monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
    return fake


HEADERS = {"Authorization": "Bearer sk-live-not-for-logs", "X-Request-Id": "call-42"}
BODY = {"caller": "Zoë", "party": 4, "notes": 'window "please"\nthanks'}


async def test_loopback_target_is_refused_and_never_contacted(caller: ApiCaller, target: Target) -> None:
    for allowed in ([], ["127.0.0.2"], ["partner.io"]):
        result = await caller.call("POST", target.url("/echo"), HEADERS, BODY, 2, allowed)
        assert result.status is None and result.body is None
        assert result.error == "127.0.0.1 is a loopback address; requests there are not allowed"
    # Allowing the IP does not allow a name that resolves to it: allowedHosts compares names.
    result = await caller.call("GET", target.url("/echo", "localhost"), {}, None, 2, ["127.0.0.1"])
    assert result.error is not None and "internal name" in result.error
    assert target.seen == []


@pytest.mark.parametrize(
    ("host", "allowed"),
    [("127.0.0.1", ["127.0.0.1"]), ("localhost", ["localhost"]), ("localhost", ["LocalHost."])],
)
async def test_allow_listed_host_receives_the_request_exactly(
    caller: ApiCaller, target: Target, host: str, allowed: list[str]
) -> None:
    result = await caller.call("post", target.url("/echo?ref=1", host), HEADERS, BODY, 2, allowed)

    assert (result.status, result.body, result.truncated, result.error) == (200, ANSWER, False, None)
    [seen] = target.seen
    assert (seen.method, seen.path) == ("POST", "/echo?ref=1")
    assert seen.headers["authorization"] == HEADERS["Authorization"]
    assert seen.headers["x-request-id"] == HEADERS["X-Request-Id"]
    assert seen.headers["content-type"] == "application/json"
    assert seen.headers["host"] == f"{host}:{target.port}"  # the name, though we connected to an IP
    assert json.loads(seen.body) == BODY


@pytest.mark.parametrize("method", ["GET", "DELETE"])
async def test_body_is_not_sent_with_get_or_delete(caller: ApiCaller, target: Target, method: str) -> None:
    result = await caller.call(method, target.url("/echo"), {}, BODY, 2, ["127.0.0.1"])
    assert result.status == 200
    assert [(s.method, s.body, "content-type" in s.headers) for s in target.seen] == [(method, b"", False)]


async def test_connects_to_the_address_checked_without_a_second_lookup(
    caller: ApiCaller, target: Target, dns: FakeDns
) -> None:
    # A rebinding DNS server: the second answer would point somewhere else entirely.
    dns.answers["api.partner.io"] = [["127.0.0.1"], ["10.9.9.9"]]
    result = await caller.call("GET", target.url("/echo", "api.partner.io"), {}, None, 2, ["api.partner.io"])
    assert result.status == 200
    assert dns.lookups == ["api.partner.io"]
    assert target.seen[0].headers["host"] == f"api.partner.io:{target.port}"


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://localhost/", "localhost is an internal name"),
        ("http://api.localhost/", "internal name"),
        ("http://10.0.0.1/", "10.0.0.1 is a private address"),
        ("http://172.16.0.1/", "private address"),
        ("http://192.168.1.1/", "private address"),
        ("http://169.254.169.254/latest/meta-data/", "link-local address"),
        ("http://100.64.0.1/", "shared (carrier-grade NAT) address"),
        ("http://[::1]/", "::1 is a loopback address"),
        ("http://[fe80::1]/", "link-local address"),
        ("http://[fc00::1]/", "private address"),
        ("http://[::ffff:127.0.0.1]/", "loopback address"),
        ("http://[64:ff9b::a00:1]/", "private address"),  # NAT64 of 10.0.0.1
        ("http://[2002:a9fe:a9fe::]/", "link-local address"),  # 6to4 of 169.254.169.254
        ("http://0.0.0.0:8080/", "unspecified address"),
        ("http://224.0.0.1/", "multicast address"),
        ("http://240.0.0.1/", "reserved address"),
        ("http://kubernetes.default.svc/api", "internal name"),
        ("http://agent-studio-ingest.prod.svc.cluster.local/", "internal name"),
        ("http://redis:6379/", "redis is an internal name"),
        ("http://metadata.google.internal/computeMetadata/v1/", "internal name"),
        ("ftp://files.partner.io/menu.csv", "only http and https"),
        ("http://user:pw@partner.io/", "user name or password"),
        ("https://example.com/hook", "example.com is reserved for documentation"),
        ("https://crm.test/contacts", "reserved for documentation"),
    ],
)
async def test_internal_and_reserved_targets_are_refused(caller: ApiCaller, url: str, reason: str) -> None:
    result = await caller.call("POST", url, HEADERS, BODY, 2, [])
    assert result.status is None and result.body is None
    assert result.error is not None and reason in result.error, result.error


@pytest.mark.parametrize(
    ("url", "allowed", "addresses"),
    [
        ("http://93.184.216.34/", [], ["93.184.216.34"]),
        ("http://[64:ff9b::808:808]/", [], ["64:ff9b::808:808"]),  # NAT64 of a public address
        ("http://[::1]:8080/", ["[::1]"], ["::1"]),
        ("http://10.0.0.1/", ["10.0.0.1"], ["10.0.0.1"]),
    ],
)
async def test_public_and_allow_listed_addresses_pass(
    url: str, allowed: list[str], addresses: list[str]
) -> None:
    assert await guard(url, allowed) == addresses


async def test_a_name_is_refused_when_any_of_its_addresses_is_internal(dns: FakeDns) -> None:
    dns.answers["api.partner.io"] = [["93.184.216.34", "10.1.2.3"]] * 3
    with pytest.raises(Refused, match="api.partner.io resolves to a private address"):
        await guard("https://api.partner.io/v1", [])
    assert await guard("https://API.partner.io/v1", ["api.partner.io"]) == ["93.184.216.34", "10.1.2.3"]
    dns.answers["gone.partner.io"] = []
    with pytest.raises(Refused, match="could not resolve gone.partner.io"):
        await guard("https://gone.partner.io/v1", [])


async def test_reserved_hosts_are_refused_even_when_allow_listed() -> None:
    with pytest.raises(Refused, match="reserved for documentation"):
        await guard("https://api.example.com/", ["api.example.com"])


async def test_response_is_cut_at_the_size_cap(target: Target) -> None:
    caller = ApiCaller(max_response_bytes=1000)
    try:
        result = await caller.call("GET", target.url("/endless"), {}, None, 2, ["127.0.0.1"])
    finally:
        await caller.aclose()
    assert (result.status, result.error, result.truncated, result.body) == (200, None, True, "x" * 1000)
    assert json.loads(result.for_model())["truncated"] is True


@pytest.mark.parametrize("path", ["/slow", "/drip"])
async def test_slow_target_times_out_on_time(caller: ApiCaller, target: Target, path: str) -> None:
    # No stopwatch: /slow answers after 3 s and /drip never idles long enough for a read timeout, so
    # only a deadline on the whole request ends either as "timed out" (a per-read timeout, or none,
    # would return their 200).
    result = await caller.call("GET", target.url(path), {}, None, 0.5, ["127.0.0.1"])
    assert (result.status, result.error) == (None, "timed out after 0.5s")
    assert result.elapsed_ms >= 400  # it did wait for the deadline
    assert len(target.seen) == 1


async def test_unreachable_target_is_a_connection_error(caller: ApiCaller) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = await caller.call("GET", f"http://127.0.0.1:{port}/", {}, None, 2, ["127.0.0.1"])
    assert (result.status, result.error) == (None, "could not connect to 127.0.0.1")


@pytest.mark.parametrize("value,problem", [
    ("campaign-7\r\nX-Injected: 1", "a line break"), ("campaign-7\0", "a NUL character"),
    ("campaign-7é", "a character that is not ASCII"),
])
async def test_a_header_value_http_cannot_carry_is_refused_without_quoting_it(
    caller: ApiCaller, target: Target, value: str, problem: str
) -> None:
    result = await caller.call("GET", target.url("/echo"), {"X-Campaign": value}, None, 2, ["127.0.0.1"])
    assert (result.status, result.error) == (None, f"header X-Campaign cannot be sent: it contains {problem}")
    assert target.seen == []


async def test_redirect_is_returned_not_followed(caller: ApiCaller, target: Target) -> None:
    result = await caller.call("GET", target.url("/redirect"), {}, None, 2, ["127.0.0.1"])
    assert (result.status, result.body, result.error) == (302, {"location": target.url("/echo")}, None)
    assert [s.path for s in target.seen] == ["/redirect"]


def test_for_model_is_compact_json() -> None:
    assert ApiResult(201, {"id": 7}, False, None, 3).for_model() == '{"status":201,"body":{"id":7}}'
    timed_out = ApiResult(None, None, False, "timed out after 2s", 2000)
    assert timed_out.for_model() == '{"error":"timed out after 2s"}'


@pytest.mark.parametrize("limit", [64, 300, 2000])
@pytest.mark.parametrize(
    "result",
    [
        ApiResult(200, {"items": [{"name": "x" * 40, "note": 'say "hi"\n'}] * 300}, False, None, 5),
        ApiResult(200, "\u0001" * 5000, True, None, 5),  # each char escapes to six
        ApiResult(200, "é☃" * 3000, False, None, 5),
        ApiResult(None, None, False, "connection failed: " + "y" * 5000, 5),
    ],
    ids=["json", "escapes", "unicode", "error"],
)
def test_for_model_stays_within_the_limit(result: ApiResult, limit: int) -> None:
    text = result.for_model(limit)
    assert len(text) <= limit
    summary = json.loads(text)
    if result.error is None:
        assert summary["status"] == 200 and summary["truncated"] is True
        assert summary["body"].endswith("…")
    else:
        assert summary["error"].startswith("connection failed: y")
