"""The calls console in a real browser (Debian's chromium driven by Playwright) against `agent-studio
dev` with its real NATS: what a marketing user does, from pasting a key to reading a call's story."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from playwright.sync_api import Browser, BrowserContext, Page, expect

from agentstudio.natsserver import free_port
from browser import chromium, serious_accessibility_violations
from scripted_model import Reply, ScriptedModel
from test_chat import CAPTURED, GOODBYE, LLM_KEY, Chat, environment, examples_for
from test_dev import DevProcess

SCRIPT = "<script>window.pwned = 1</script>"
IMG = '<img src=x onerror="window.pwned = 2">'
PHONE = "+15005550006"
OTHER_TENANT = "acme"
SCREENSHOTS = os.environ.get("AGENTSTUDIO_CONSOLE_SCREENSHOTS")  # a folder: the pages' pictures go there
# A key of its own for each test that changes it, and one that reads calls and manages webhooks.
EXTRA = f"""
apiVersion: agentstudio.io/v1alpha1
kind: ApiKey
metadata: {{name: console}}
spec: {{scopes: ["calls:read", "webhooks:manage"], mode: live}}
---
apiVersion: agentstudio.io/v1alpha1
kind: ApiKey
metadata: {{name: soon-disabled}}
spec: {{scopes: ["calls:read"], mode: live}}
---
apiVersion: agentstudio.io/v1alpha1
kind: Agent
metadata: {{name: acme-agent, namespace: {OTHER_TENANT}}}
spec: {{prompt: Hi}}
---
apiVersion: agentstudio.io/v1alpha1
kind: ApiKey
metadata: {{name: acme-reader, namespace: {OTHER_TENANT}}}
spec: {{scopes: ["calls:read", "calls:create"], mode: live}}
"""


class Receiver(ThreadingHTTPServer):
    """Webhook endpoints: /results takes every delivery; /flaky answers 503 until `flaky_up`."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.flaky_up = False
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/flaky" and not receiver.flaky_up:
                    self.send_response(503)
                else:
                    receiver.received.append({**body, "path": self.path})
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def url(self, path: str = "/results") -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


@dataclass
class Console:
    """`agent-studio dev` serving the console, with the keys it printed and the seed call's id."""

    dev: DevProcess
    folder: Path
    keys: dict[str, str]
    seed_call: str
    receiver: Receiver
    calls: dict[str, str] = field(default_factory=dict)  # name → call id, queued by the fixture

    @property
    def url(self) -> str:
        return f"{self.dev.url}/console"

    def queue(self, key: str, **body: Any) -> str:
        resp = httpx.post(f"{self.dev.url}/api/v1/webhooks/ingest", headers={"Authorization": f"Bearer {self.keys[key]}"},
                          json={"phone_number": "+14155552671", **body})
        assert resp.status_code == 201, resp.text
        return str(resp.json()["call_id"])

    def call(self, call_id: str, key: str = "console") -> dict[str, Any]:
        resp = httpx.get(f"{self.dev.url}/api/v1/calls/{call_id}", headers={"Authorization": f"Bearer {self.keys[key]}"})
        assert resp.status_code == 200, resp.text
        return resp.json()  # type: ignore[no-any-return]

    def until_status(self, call_id: str, status: str, key: str = "console") -> None:
        self.dev.process.wait_until(lambda: self.call(call_id, key)["status"] == status, f"call {call_id} {status}")


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    tmp = tmp_path_factory.mktemp("console")
    receiver = Receiver()
    with ScriptedModel(api_key=LLM_KEY) as model:
        model.script([
            Reply("Did anything get in the way of activating your trial?"),
            Reply(tool_calls=[("capture_lead_response", CAPTURED)]),
            Reply(GOODBYE, tool_calls=[("end_call", {})]),
        ])
        folder = examples_for(tmp, model.url)
        webhooks = yaml.safe_load((folder / "webhooks.yaml").read_text())
        webhooks["spec"].update(url=receiver.url(), events=["call.*"])
        flaky = {**webhooks, "metadata": {"name": "flaky"},
                 "spec": {"url": receiver.url("/flaky"), "events": ["call.failed"]}}
        (folder / "webhooks.yaml").write_text(yaml.safe_dump_all([webhooks, flaky]))
        (folder / "console.yaml").write_text(EXTRA)
        # The seed campaign's call, talked through in the terminal by `dev --chat` (which stops after
        # it), with markup where a caller's data can carry it: its name, its metadata, its words.
        chat = Chat(folder, "free-trial-followup", "--phone", PHONE, "--user-id", "user-123",
                    "--user-context", json.dumps({"name": SCRIPT, "trial_started_at": "2026-02-01"}),
                    "--metadata", json.dumps({"campaign_id": "trial_recovery_jan", "note": IMG}),
                    env=environment(fast_speech=True))
        try:
            chat.until("chat: calling ")
            chat.next_line()  # the first message
            chat.say(IMG)
            chat.next_line()
            chat.say("The OTP never arrived, I'd like help.")
            rest = chat.rest(timeout=30)
            assert chat.wait() == 0, rest
        finally:
            chat.kill()
        seed_call = next(line.split()[1].rstrip(":") for line in chat.seen if line.startswith("call ") and "completed" in line)

    # Two quick retries, so the flaky receiver's delivery is dead-lettered while the tests run.
    os.environ["AGENTSTUDIO_WEBHOOK_RETRY_SCHEDULE"] = "0,0.1"
    try:
        dev = DevProcess(folder, free_port())
    finally:
        del os.environ["AGENTSTUDIO_WEBHOOK_RETRY_SCHEDULE"]
    try:
        keys = dev.start()
        dev.expect(rf"^console: {dev.url}/console/ \(sign in with a key that has calls:read\)$")  # where to go
        console = Console(dev, folder, keys, seed_call, receiver)
        console.calls["failed"] = console.queue("clevertap", workflow_slug="free-trial-followup",
                                                metadata={"simulate_outcome": "failed", "campaign_id": "autumn"})
        console.calls["spring"] = console.queue("clevertap", workflow_slug="free-trial-followup",
                                                metadata={"campaign_id": "spring", "simulate_duration_seconds": 0})
        console.calls["acme"] = console.queue("acme-reader", agent_slug="acme-agent",
                                              metadata={"simulate_duration_seconds": 0})
        console.until_status(console.calls["failed"], "failed")
        console.until_status(console.calls["spring"], "completed")
        console.until_status(console.calls["acme"], "completed", key="acme-reader")
        yield console
    finally:
        dev.interrupt()
        receiver.shutdown()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as b:
        yield b


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    yield ctx
    ctx.close()


@pytest.fixture
def page(context: BrowserContext) -> Page:
    return context.new_page()


def sign_in(page: Page, console: Console, key: str = "console") -> None:
    page.goto(f"{console.url}/")
    page.get_by_label("API key").fill(console.keys[key])
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Calls", exact=True)).to_be_visible()


def rows(page: Page) -> list[str]:
    """The listed calls' ids, top to bottom; a failure says what the page said instead of listing."""
    # After a form's redirect the URL changes before the new page has loaded.
    page.wait_for_load_state()
    problem = page.locator("#calls-region .problem")
    assert problem.count() == 0, problem.inner_text()
    return [r.get_attribute("data-call-id") or "" for r in page.locator("tr[data-call-id]").all()]


def test_sign_in_holds_a_session_cookie_that_is_not_the_key(console: Console, page: Page,
                                                            context: BrowserContext) -> None:
    page.goto(f"{console.url}/calls")
    expect(page).to_have_url(f"{console.url}/sign-in")  # nothing without signing in

    page.get_by_label("API key").fill("as_live_" + "x" * 32)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("That API key was not accepted")
    assert context.cookies() == []

    # A key without calls:read is named and refused.
    page.get_by_label("API key").fill(console.keys["clevertap"])
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("clevertap lacks the calls:read scope")
    assert context.cookies() == []

    response = None
    with page.expect_response(lambda r: r.url.endswith("/console/calls") and r.status == 200) as info:
        sign_in(page, console)
    response = info.value
    [cookie] = context.cookies()
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["expires"] > time.time()
    assert cookie["path"] == "/console" and console.keys["console"] not in cookie["value"]
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert console.keys["console"] not in page.content()


def test_filters_by_status_and_metadata_stay_in_the_url(console: Console, page: Page) -> None:
    sign_in(page, console)
    assert {console.calls["failed"], console.calls["spring"], console.seed_call} <= set(rows(page))
    assert console.calls["acme"] not in rows(page)

    page.get_by_label("failed").check()
    page.get_by_role("button", name="Apply filters").click()
    expect(page).to_have_url(f"{console.url}/calls?status=failed")
    assert rows(page) == [console.calls["failed"]]
    expect(page.get_by_role("list", name="Calls by status")).to_contain_text("failed 1")

    page.goto(f"{console.url}/calls")
    page.get_by_label("Metadata").fill("campaign_id=spring")
    page.get_by_role("button", name="Apply filters").click()
    assert rows(page) == [console.calls["spring"]]
    page.reload()  # the filter is in the URL
    assert rows(page) == [console.calls["spring"]]

    # The export link exports the same filter.
    with page.expect_download() as download:
        page.get_by_role("link", name="CSV").click()
    lines = Path(download.value.path()).read_text().splitlines()
    assert len(lines) == 2 and lines[1].startswith(console.calls["spring"])

    # Test-key calls only (the seed call came from dev --chat's sandbox key), on the page and exported.
    page.goto(f"{console.url}/calls?mode=test")
    assert rows(page) == [console.seed_call]
    with page.expect_download() as download:
        page.get_by_role("link", name="JSON Lines").click()
    exported = [json.loads(line) for line in Path(download.value.path()).read_text().splitlines()]
    assert [c["call_id"] for c in exported] == [console.seed_call]


def test_a_failed_call_shows_its_error(console: Console, page: Page) -> None:
    sign_in(page, console)
    page.get_by_role("row").filter(has_text="simulated_failure").get_by_role("link").click()
    expect(page.get_by_role("heading", name="Why it failed")).to_be_visible()
    expect(page.locator("#error-code")).to_have_text("simulated_failure")
    expect(page.locator("#error-message")).to_have_text("scripted failure")
    expect(page.locator("#call-status")).to_have_text("failed")


def test_the_seed_call_tells_its_story(console: Console, page: Page) -> None:
    sign_in(page, console)
    page.goto(f"{console.url}/calls/{console.seed_call}")
    expect(page.locator("h1")).to_have_text("Call to " + "*" * 8 + PHONE[-4:])  # the number masked
    assert PHONE not in page.content()
    conversation = page.locator("#transcript")
    expect(conversation.locator(".turn.agent").first).to_contain_text(f"Hi {SCRIPT}, this is the Tap Health assistant")
    expect(conversation.locator(".turn.callee").first).to_have_text(f"Callee\n{IMG}", use_inner_text=True)
    expect(conversation).to_contain_text("Did anything get in the way of activating your trial?")
    expect(conversation).to_contain_text("Tool capture_lead_response")
    expect(conversation).to_contain_text(GOODBYE)
    captured = page.locator("#captured")
    expect(captured).to_contain_text("capture_lead_response")
    expect(captured).to_contain_text("The OTP never arrived")
    expect(page.locator("#end-reason")).to_have_text("end_call")
    # Its status webhooks reached the receiver, and the page says so per subscription.
    console.dev.process.wait_until(lambda: {e["type"] for e in console.receiver.received
                                            if e["data"]["call_id"] == console.seed_call} >= {"call.completed"},
                                   "the seed call's call.completed delivered")
    page.reload()
    deliveries = page.locator("#deliveries")
    expect(deliveries.get_by_role("row").filter(has_text="call.completed")).to_contain_text("delivered")
    expect(deliveries).to_contain_text("results")
    assert "flaky" not in deliveries.inner_text()  # it takes call.failed only


def test_caller_data_is_shown_as_text_never_run(console: Console, page: Page) -> None:
    sign_in(page, console)
    page.goto(f"{console.url}/calls/{console.seed_call}")
    expect(page.locator("#user-context")).to_contain_text(SCRIPT)
    expect(page.locator("#metadata")).to_contain_text(IMG)
    page.goto(f"{console.url}/calls")
    page.goto(f"{console.url}/calls/{console.seed_call}")
    assert page.evaluate("window.pwned") is None
    assert page.locator("#main script, #main img").count() == 0


def test_a_new_call_appears_without_a_reload(console: Console, page: Page) -> None:
    sign_in(page, console)
    expect(page.locator("#live-status")).to_have_text("Live")
    page.evaluate("window.marker = 'same page'")
    call_id = console.queue("clevertap", workflow_slug="free-trial-followup", metadata={"simulate_duration_seconds": 0})
    expect(page.locator(f'tr[data-call-id="{call_id}"]')).to_be_visible(timeout=15_000)
    expect(page.locator(f'tr[data-call-id="{call_id}"]')).to_contain_text("completed", timeout=15_000)
    assert page.evaluate("window.marker") == "same page"  # updated in place


def test_sign_out_ends_the_session_on_the_server(console: Console, page: Page, context: BrowserContext) -> None:
    sign_in(page, console)
    [cookie] = context.cookies()
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("status")).to_have_text("You signed out.")
    assert context.cookies() == []
    # The old cookie, replayed, opens nothing.
    context.add_cookies([cookie])
    page.goto(f"{console.url}/calls")
    expect(page).to_have_url(f"{console.url}/sign-in?ended=expired")


def test_a_key_disabled_while_signed_in_is_signed_out(console: Console, page: Page) -> None:
    sign_in(page, console, "soon-disabled")
    manifests = console.folder / "console.yaml"
    manifests.write_text(manifests.read_text().replace(
        'metadata: {name: soon-disabled}\nspec: {scopes: ["calls:read"], mode: live}',
        'metadata: {name: soon-disabled}\nspec: {scopes: ["calls:read"], mode: live, disabled: true}'))
    console.dev.expect_new_version()
    page.reload()
    expect(page).to_have_url(f"{console.url}/sign-in?ended=revoked")
    expect(page.get_by_role("status")).to_contain_text("its API key was disabled")


def test_each_tenant_sees_only_its_calls(console: Console, browser: Browser) -> None:
    acme = browser.new_page()
    default = browser.new_page()
    try:
        sign_in(acme, console, "acme-reader")
        assert rows(acme) == [console.calls["acme"]]
        expect(acme.locator(".tenant")).to_have_text(OTHER_TENANT)
        acme.goto(f"{console.url}/calls/{console.calls['spring']}")
        expect(acme.get_by_role("heading", name="Call not found")).to_be_visible()

        sign_in(default, console)
        default.goto(f"{console.url}/calls/{console.calls['acme']}")
        expect(default.get_by_role("heading", name="Call not found")).to_be_visible()
    finally:
        acme.context.close()
        default.context.close()


def test_replay_needs_the_csrf_token(console: Console, page: Page, context: BrowserContext) -> None:
    sign_in(page, console)
    page.goto(f"{console.url}/webhooks")
    expect(page.get_by_role("heading", name="Dead letters")).to_be_visible()
    # The session cookie alone (what a forged form would carry) does not replay anything.
    resp = context.request.post(f"{console.url}/webhooks/replay",
                                form={"subscription": "results", "event_id": "evt_x"})
    assert resp.status == 403
    assert "nothing was replayed" in resp.text()
    forged = context.request.post(f"{console.url}/webhooks/replay",
                                  form={"csrf": "é" * 32, "subscription": "results", "event_id": "evt_x"})
    assert forged.status == 403  # refused, not an error of ours


@pytest.mark.parametrize("width", [1280, 390])  # a laptop and a phone
def test_no_page_has_serious_accessibility_violations(console: Console, browser: Browser, width: int) -> None:
    page = browser.new_page(viewport={"width": width, "height": 900})
    try:
        page.goto(f"{console.url}/sign-in")
        found = {"sign-in": serious_accessibility_violations(page)}
        sign_in(page, console)
        for name, path in [("calls", "/calls"), ("call", f"/calls/{console.seed_call}"),
                           ("failed call", f"/calls/{console.calls['failed']}"), ("keys", "/keys"),
                           ("webhooks", "/webhooks"), ("dead letters", "/webhooks?subscription=flaky")]:
            page.goto(console.url + path)
            found[name] = serious_accessibility_violations(page)
            if SCREENSHOTS:  # the README's pictures, taken on request from these same pages
                page.screenshot(path=Path(SCREENSHOTS) / f"{name.replace(' ', '-')}-{width}.png", full_page=True)
        assert {name: v for name, v in found.items() if v} == {}
    finally:
        page.context.close()


def test_a_dead_letter_is_replayed_from_the_webhooks_page(console: Console, page: Page) -> None:
    sign_in(page, console)
    page.goto(f"{console.url}/webhooks")
    failed = console.calls["failed"]
    letters = page.locator("#dead-letters")
    row = letters.get_by_role("row").filter(has=page.locator(f'a[href$="{failed}"]'))
    for _ in range(100):  # dead-lettered after its three attempts
        if row.count():
            break
        time.sleep(0.1)
        page.reload()
    expect(row).to_contain_text("flaky")
    expect(row).to_contain_text("HTTP 503")

    console.receiver.flaky_up = True
    row.get_by_role("button", name="Replay").click()
    expect(page.get_by_role("status")).to_contain_text("was queued for delivery again")
    console.dev.process.wait_until(lambda: any(r["path"] == "/flaky" and r["data"]["call_id"] == failed
                                               for r in console.receiver.received), "the replayed delivery")
    expect(page.locator(f'#dead-letters a[href$="{failed}"]')).to_have_count(0)
    # The recent deliveries say so too, beside the seed call's.
    recent = page.locator("#recent-deliveries")
    for _ in range(100):
        page.reload()
        if "delivered" in recent.get_by_role("row").filter(has_text="flaky").inner_text():
            break
        time.sleep(0.1)
    expect(recent.get_by_role("row").filter(has_text="flaky")).to_contain_text("call.failed")
    expect(recent.get_by_role("row").filter(has_text="flaky")).to_contain_text("delivered")
    expect(recent.locator(f'a[href$="{console.seed_call}"]').first).to_be_visible()
    page.goto(f"{console.url}/calls/{failed}")
    expect(page.locator("#deliveries").get_by_role("row").filter(has_text="flaky")).to_contain_text("delivered")


def dead_letter_ids(console: Console, subscription: str) -> list[str]:
    resp = httpx.get(f"{console.dev.url}/api/v1/webhooks/dead-letters", params={"subscription": subscription,
                     "limit": 500}, headers={"Authorization": f"Bearer {console.keys['console']}"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["next_cursor"] is None
    return [d["event_id"] for d in resp.json()["data"]]


def dead_letter_rows(page: Page) -> list[str]:
    page.wait_for_load_state()
    return [r.get_attribute("data-event-id") or "" for r in page.locator("#dead-letters tr[data-event-id]").all()]


def test_a_subscriptions_dead_letters_are_paged_and_replayed_all_at_once(
    console: Console, page: Page, context: BrowserContext
) -> None:
    console.receiver.flaky_up = False
    failed = [console.queue("clevertap", workflow_slug="free-trial-followup",
                            metadata={"campaign_id": "dead", "simulate_outcome": "failed"}) for _ in range(26)]
    console.dev.process.wait_until(lambda: len(dead_letter_ids(console, "flaky")) >= len(failed),
                                   "the failed calls' deliveries dead-lettered")
    listed = dead_letter_ids(console, "flaky")

    sign_in(page, console)
    page.goto(f"{console.url}/webhooks")
    page.get_by_label("Subscription", exact=True).select_option("flaky")
    page.get_by_role("button", name="Show").click()
    first = dead_letter_rows(page)
    assert first == listed[:25]  # oldest first, a page of 25
    page.get_by_role("link", name="Newer dead letters →").click()
    assert dead_letter_rows(page) == listed[25:]
    expect(page.get_by_role("link", name="Newer dead letters →")).to_have_count(0)
    page.get_by_role("link", name="← Oldest").click()
    assert dead_letter_rows(page) == first

    # The session cookie alone (what a forged form would carry) replays nothing.
    forged = context.request.post(f"{console.url}/webhooks/replay-all", form={"subscription": "flaky"})
    assert forged.status == 403 and "nothing was replayed" in forged.text()
    assert dead_letter_ids(console, "flaky") == listed

    console.receiver.flaky_up = True
    page.get_by_role("button", name="Replay all for flaky").click()
    expect(page.get_by_role("status")).to_contain_text(f"{len(listed)} dead letters of flaky were queued")
    expect(page.get_by_text("No dead letters for flaky")).to_be_visible()
    console.dev.process.wait_until(
        lambda: {r["data"]["call_id"] for r in console.receiver.received if r["path"] == "/flaky"} >= set(failed),
        "the replayed deliveries")
    assert dead_letter_ids(console, "flaky") == []


def test_paging_through_a_campaign_newest_first(console: Console, page: Page) -> None:
    queued = [console.queue("clevertap", workflow_slug="free-trial-followup",
                            metadata={"campaign_id": "paging", "simulate_outcome": "busy"}) for _ in range(27)]
    sign_in(page, console)
    page.goto(f"{console.url}/calls?metadata=campaign_id%3Dpaging")
    first = rows(page)
    assert first == queued[::-1][:25]
    page.get_by_role("link", name="Older calls →").click()
    expect(page.get_by_role("link", name="← Newest")).to_be_visible()
    assert rows(page) == queued[::-1][25:]
    expect(page.get_by_role("link", name="Older calls →")).to_have_count(0)
    page.get_by_role("link", name="← Newest").click()
    assert rows(page) == first
