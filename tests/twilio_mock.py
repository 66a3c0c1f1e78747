"""Twilio's REST API for tests: Stoplight Prism serving Twilio's own OpenAPI spec, so every request the
official `twilio` SDK sends is validated the way the real API would (a missing `From`, a bad `Timeout`,
a non-URI `Url` fail with 422), behind a small recording shim:

    with TwilioMock() as mock:
        client = twilio_client(mock)
        call = client.calls.create(to=..., from_=..., twiml=...)
        [req] = mock.requests           # method, path, form (dict of lists), status, response

Prism answers with the spec's static examples, sends no status callbacks and opens no WebSocket: tests
drive call progress themselves. See ../shared/twilio/README.md."""

from __future__ import annotations

import base64
import email.utils
from datetime import datetime, timezone
import json
import os
import re
import secrets
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlencode, urlsplit

import httpx
from twilio.rest import Client

from agentstudio.natsserver import die_with_parent, free_port

ROOT = Path(__file__).resolve().parent.parent
# Twilio's spec is kept beside the repo, not in it (it is not ours, and 1.8 MB).
SPEC = ROOT.parent / "shared" / "twilio" / "twilio_api_v2010.json"
FORM = "application/x-www-form-urlencoded"

# Never forwarded as received: they describe one hop, or (Accept-Encoding) would let Prism compress a
# body the shim then has to pass on byte for byte.
_HOP_REQUEST = {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "accept-encoding",
                "proxy-authorization", "proxy-connection", "te", "upgrade"}
_HOP_RESPONSE = {"content-length", "connection", "keep-alive", "transfer-encoding", "content-encoding"}
_ONE_CALL = re.compile(r"/Calls/(CA[0-9a-fA-F]{32})\.json$")  # a fetch of one call


def prism_path() -> str:
    """The prism executable, installed by scripts/install-prism on first use (cached by version)."""
    run = subprocess.run(["bash", str(ROOT / "scripts" / "install-prism")], capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"scripts/install-prism exited with {run.returncode}:\n{run.stderr}")
    out = run.stdout
    paths = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    return paths["PRISM"]


def array_form_params(spec: Path = SPEC) -> frozenset[str]:
    """Names of array-typed form parameters anywhere in the spec. Each name is an array wherever it
    appears (StatusCallbackEvent, RecordingStatusCallbackEvent, MediaUrl, ...), so no per-route table."""
    doc = json.loads(spec.read_text())
    names: set[str] = set()
    for item in doc["paths"].values():
        for op in item.values():
            content = op.get("requestBody", {}).get("content", {}) if isinstance(op, dict) else {}
            props = content.get(FORM, {}).get("schema", {}).get("properties", {})
            names.update(name for name, schema in props.items() if schema.get("type") == "array")
    return frozenset(names)


def fold_arrays(pairs: list[tuple[str, str]], arrays: frozenset[str]) -> list[tuple[str, str]] | None:
    """Rename array parameters to bracket style (`StatusCallbackEvent[]=a&StatusCallbackEvent[]=b`);
    None when there is none, so the body goes on untouched.

    Twilio (and its SDK) send an array as the key repeated, once per value. Prism 5.16 rejects that
    with 422 "must be array", and also a single `StatusCallbackEvent=x`; it takes neither a comma list
    (`a,b`) nor space-separated values, but parses bracket keys (`K[]=a&K[]=b`, `K[0]=a&K[1]=b`) into
    an array, whatever the count. So the shim brackets every array-typed key, one value or many."""
    if not any(key in arrays for key, _ in pairs):
        return None
    return [(f"{key}[]" if key in arrays else key, value) for key, value in pairs]


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the client sent it (before folding) and Prism's answer to it."""

    method: str
    path: str
    query: dict[str, list[str]]
    form: dict[str, list[str]]
    auth: tuple[str, str] | None  # Basic credentials, decoded
    status: int
    response: Any  # Prism's JSON body (on 422 its "validation" list says what failed), None if not JSON

    def param(self, name: str) -> str | None:
        """The single value of a form parameter, or None when absent."""
        values = self.form.get(name)
        return values[-1] if values else None


def _basic_auth(header: str | None) -> tuple[str, str] | None:
    if not header or not header.lower().startswith("basic "):
        return None
    try:
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
    except ValueError:  # binascii.Error and UnicodeDecodeError both are
        return None
    return user, password


class _Shim(ThreadingHTTPServer):
    daemon_threads = True  # a client that hangs up mid-request must not block shutdown

    def __init__(self, upstream: str, arrays: frozenset[str]) -> None:
        super().__init__(("127.0.0.1", 0), _ShimHandler)
        # trust_env=False: an HTTP(S)_PROXY in the environment must not capture loopback traffic.
        self.upstream = httpx.Client(base_url=upstream, trust_env=False, timeout=30)
        self.arrays = arrays
        self.lock = threading.Lock()
        self.recorded: list[RecordedRequest] = []
        self.created: list[dict[str, Any]] = []  # the calls Prism accepted, as Twilio would list them


class _ShimHandler(BaseHTTPRequestHandler):
    server: _Shim
    protocol_version = "HTTP/1.1"  # keep-alive, as the SDK's requests.Session expects

    def _proxy(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        url = urlsplit(self.path)
        pairs: list[tuple[str, str]] = []
        if self.command == "POST" and self.headers.get_content_type() == FORM:
            try:
                pairs = parse_qsl(body.decode(), keep_blank_values=True)
            except UnicodeDecodeError:
                pass  # not ours to fix: Prism sees it as sent
        folded = fold_arrays(pairs, self.server.arrays)
        sent = urlencode(folded).encode() if folded is not None else body
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_REQUEST}
        try:
            resp = self.server.upstream.request(self.command, self.path, content=sent, headers=headers)
            status, out, resp_headers = resp.status_code, resp.content, list(resp.headers.multi_items())
        except httpx.HTTPError as exc:  # Prism gone: say so instead of hanging the client
            status, out, resp_headers = 502, f"twilio shim: {exc!r}".encode(), [("content-type", "text/plain")]
        try:
            parsed: Any = json.loads(out) if out else None
        except ValueError:
            parsed = None
        form: dict[str, list[str]] = {}
        for key, value in pairs:
            form.setdefault(key, []).append(value)
        if isinstance(parsed, dict) and (url.path.endswith("/Calls.json") or _ONE_CALL.search(url.path)):
            parsed = self._remember(status, parsed, form, parse_qs(url.query), url.path)
            out = json.dumps(parsed).encode()
        record = RecordedRequest(
            self.command, url.path, parse_qs(url.query, keep_blank_values=True), form,
            _basic_auth(self.headers.get("Authorization")), status, parsed,
        )
        # Recorded before the answer goes out: when the SDK call returns, the test can read it.
        with self.server.lock:
            self.server.recorded.append(record)
        self.send_response(status)
        for key, value in resp_headers:
            if key.lower() not in _HOP_RESPONSE:
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def _remember(self, status: int, body: dict[str, Any], form: dict[str, list[str]],
                  query: dict[str, list[str]], path: str) -> dict[str, Any]:
        """Prism answers every create with the same example call and every list with the same page.
        A dialer that must find out whether a call went out needs what Twilio gives: a distinct sid
        per created call, and a list of the calls really created (filtered by To, From, Status, StartTime>).
        A created call stays `queued` with no start time, as Twilio documents `start_time` ("Empty if
        the call has not yet been dialed"): a StartTime filter never matches it. Fetching one call
        gives it as created, or as a test moved it on (TwilioMock.update_call)."""
        one = _ONE_CALL.search(path)
        if one and self.command == "GET" and status == 200:
            with self.server.lock:
                return next((c for c in self.server.created if c["sid"] == one.group(1)), body)
        if self.command == "POST" and status == 201:
            call = {**body, "sid": "CA" + secrets.token_hex(16), "to": form.get("To", [""])[-1],
                    "from": form.get("From", [""])[-1], "status": "queued", "start_time": None,
                    "end_time": None, "duration": None,
                    "date_created": email.utils.format_datetime(datetime.now(timezone.utc))}
            with self.server.lock:
                self.server.created.append(call)
            return call
        if self.command == "GET" and status == 200 and "calls" in body:
            after = query.get("StartTime>", [None])[-1]
            with self.server.lock:
                calls = [c for c in self.server.created
                         if c["to"] == query.get("To", [c["to"]])[-1] and c["from"] == query.get("From", [c["from"]])[-1]
                         and c["status"] == query.get("Status", [c["status"]])[-1]
                         and (after is None or (c["start_time"] is not None and email.utils.parsedate_to_datetime(
                             c["start_time"]).date().isoformat() >= after[:10]))]
            # One page: the example's next_page_uri would send the SDK to a URL Prism refuses.
            return {**body, "calls": calls, "next_page_uri": None, "previous_page_uri": None}
        return body

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _proxy

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass  # Prism's own log (TwilioMock.log_file) has every request


class TwilioMock:
    """Prism on one free loopback port, the recording shim on another; `base_url` is the shim's."""

    def __init__(self, spec: Path = SPEC, log_file: Path | None = None) -> None:
        if not spec.exists():
            raise FileNotFoundError(f"Twilio's OpenAPI spec is not at {spec} (see ../shared/twilio/README.md)")
        self.spec = spec
        self.log_file = log_file or Path(tempfile.mkdtemp(prefix="twilio-mock-")) / "prism.log"
        # Prism checks that Basic auth is there, not what it says: any well-formed pair works. The SID
        # must match the spec's `^AC[0-9a-fA-F]{32}$` path pattern, or every URL under it gets 422.
        self.account_sid = "AC" + secrets.token_hex(16)
        self.auth_token = secrets.token_hex(16)
        self.prism_url = ""
        self.base_url = ""
        self.startup_seconds = 0.0  # Prism's start, until it answers (it parses the 1.8 MB spec first)
        self._proc: subprocess.Popen[bytes] | None = None
        self._shim: _Shim | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 60) -> None:
        _bypass_proxy_for_loopback()
        prism = prism_path()
        port = free_port()
        self.prism_url = f"http://127.0.0.1:{port}"
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        with open(self.log_file, "ab") as log:  # the child keeps its own descriptor
            self._proc = subprocess.Popen(
                [prism, "mock", "-h", "127.0.0.1", "-p", str(port), str(self.spec)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent,
            )
        self._wait(timeout)
        self.startup_seconds = time.monotonic() - started
        self._shim = _Shim(self.prism_url, array_form_params(self.spec))
        self._thread = threading.Thread(target=self._shim.serve_forever, name="twilio-shim", daemon=True)
        self._thread.start()
        self.base_url = f"http://127.0.0.1:{self._shim.server_address[1]}"

    def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        assert self._proc is not None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                # All of it: it exited while starting, and its fatal line comes before a page of usage.
                said = self.log_file.read_text(errors="replace")[:8000]
                raise RuntimeError(f"prism exited with {self._proc.returncode} ({self.log_file}):\n{said}")
            try:
                httpx.get(self.prism_url, timeout=2, trust_env=False)  # any answer, even 404, means up
                return
            except httpx.TransportError:
                time.sleep(0.1)
        raise TimeoutError(f"prism not answering at {self.prism_url} after {timeout}s; see {self.log_file}")

    def stop(self) -> None:
        if self._shim is not None:
            self._shim.shutdown()
            self._shim.server_close()
            self._shim.upstream.close()
            self._shim = None
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of every request forwarded so far, oldest first."""
        assert self._shim is not None, "TwilioMock is not started"
        with self._shim.lock:
            return list(self._shim.recorded)

    def clear(self) -> None:
        assert self._shim is not None, "TwilioMock is not started"
        with self._shim.lock:
            self._shim.recorded.clear()

    def update_call(self, sid: str, **fields: Any) -> None:
        """Move a created call on as Twilio would (status, start_time, duration...): what a fetch
        or a list then returns, whether or not a status callback told anyone."""
        assert self._shim is not None, "TwilioMock is not started"
        with self._shim.lock:
            [call] = [c for c in self._shim.created if c["sid"] == sid]
            call.update(fields)

    @property
    def calls_path(self) -> str:
        """Path of the Calls resource for this mock's account, as in `RecordedRequest.path`."""
        return f"/2010-04-01/Accounts/{self.account_sid}/Calls.json"

    def __enter__(self) -> TwilioMock:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _bypass_proxy_for_loopback() -> None:
    """Any HTTP client in this process (the SDK's requests session, app code under test) must reach the
    mock directly, not through a proxy set in the environment."""
    for var in ("NO_PROXY", "no_proxy"):
        entries = [e for e in os.environ.get(var, "").split(",") if e]
        if "127.0.0.1" not in entries:
            os.environ[var] = ",".join([*entries, "127.0.0.1"])


def twilio_client(mock: TwilioMock) -> Client:
    """The official SDK client with the mock's credentials, sending its 2010-04-01 API calls to the shim."""
    client = Client(mock.account_sid, mock.auth_token)
    # TWILIO_EDGE / TWILIO_REGION, read from the environment by the constructor, rewrite the request
    # host at send time (api.twilio.com -> api.<edge>.<region>.twilio.com) and would mangle a local URL.
    client.edge = None
    client.region = None
    client.api.base_url = mock.base_url
    return client


if __name__ == "__main__":  # `python tests/twilio_mock.py`: a mock to poke at by hand
    with TwilioMock() as running:
        print(f"base_url={running.base_url} account_sid={running.account_sid} auth_token={running.auth_token}")
        print(f"prism log: {running.log_file} (Ctrl-C stops)")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
