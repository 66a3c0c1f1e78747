"""`agent-studio dev DIR --chat SLUG`: the seed's example campaign, run end to end in the terminal with
the user as the callee — typed lines in, the agent's words and the call's events out."""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from agentstudio.natsserver import free_port
from conftest import EXAMPLES
from processes import Process
from scripted_model import Reply, ScriptedModel

LLM_KEY = "sk-test-" + "c" * 24
KEY_ENV = "AGENTSTUDIO_SECRET_LLM_CREDENTIALS_API_KEY"  # the examples' Secret llm-credentials/api-key
PHONE = "+15005550006"  # Twilio's magic test number: valid, and nobody's phone
JOHN = ["--user-id", "user-123",
        "--user-context", '{"name":"John","trial_started_at":"2026-02-01","plan_type":"premium"}',
        "--metadata", '{"campaign_id":"trial_recovery_jan"}']
FIRST_MESSAGE = "agent> Hi John, this is the Tap Health assistant. Do you have a minute?"
CAPTURED = {"faced_issues": True, "issue": "The OTP never arrived", "wants_help": True}
GOODBYE = "Thanks John, someone from our team will help you with the OTP. Goodbye!"


class Chat:
    """`agent-studio dev --chat` in a subprocess: lines typed on its stdin, its stdout read line by line
    (stderr, where warnings and logs go, is kept apart in a log so it cannot split a line we match; a
    failing test's report shows both)."""

    def __init__(self, folder: Path, slug: str, *args: str, env: dict[str, str]) -> None:
        self.process = Process.agent_studio("dev", str(folder), "--port", str(free_port()), "--chat", slug, *args,
                                            log=folder.parent / "chat.log", env=env, read_stdout=True, stdin=True)
        self.proc = self.process.proc
        self.seen: list[str] = []

    def next_line(self, timeout: float = 15) -> str:
        line = self.process.next_line(timeout)
        if line is None:
            raise AssertionError(f"the process closed its output\n{self.process.output()}")
        self.seen.append(line)
        return line

    def until(self, prefix: str, timeout: float = 15) -> str:
        """Skip the start-up lines up to the first one that starts with `prefix`."""
        while not (line := self.next_line(timeout)).startswith(prefix):
            pass
        return line

    def rest(self, timeout: float = 15) -> list[str]:
        """Every line until the process closes its output."""
        out = []
        while (line := self.process.next_line(timeout)) is not None:
            self.seen.append(line)
            out.append(line)
        return out

    def say(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def hang_up(self) -> None:
        """Ctrl-D: end of input."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    def wait(self, timeout: float = 10) -> int:
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        self.process.kill()


def examples_for(tmp_path: Path, model_url: str, **spec: Any) -> Path:
    """A copy of examples/ with the Agent on the scripted model (and `spec` set on it)."""
    folder = tmp_path / "campaign"
    shutil.copytree(EXAMPLES, folder)
    agents = folder / "agents.yaml"
    docs = [d for d in yaml.safe_load_all(agents.read_text()) if d]
    for doc in docs:
        doc["spec"]["llm"]["baseUrl"] = model_url
        doc["spec"].update(spec)
    agents.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return folder


def environment(model_key: bool = True, fast_speech: bool = False) -> dict[str, str]:
    """This environment without any AGENTSTUDIO_ setting of ours, plus the model's key."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTSTUDIO_")}
    if model_key:
        env[KEY_ENV] = LLM_KEY
    if fast_speech:
        # The runtime waits until the agent's last words have been heard (at 15 chars/s, as a voice
        # speaks them) before it hangs up; the terminal shows them at once.
        env["AGENTSTUDIO_SPEECH_CHARS_PER_SECOND"] = "1000"
    return env


@pytest.fixture
def model() -> Iterator[ScriptedModel]:
    with ScriptedModel(api_key=LLM_KEY) as scripted:
        yield scripted


@pytest.fixture
def chats() -> Iterator[list[Chat]]:
    started: list[Chat] = []
    yield started
    for chat in started:
        chat.kill()


def test_the_seed_campaign_runs_end_to_end_in_the_terminal(
    tmp_path: Path, model: ScriptedModel, chats: list[Chat]
) -> None:
    model.script([
        Reply("I see you started your free trial on February 1st but didn't finish activating it. "
              "Did anything get in the way?"),
        Reply(tool_calls=[("capture_lead_response", CAPTURED), ("log_call", {"outcome": "needs_help"})]),
        Reply(GOODBYE, tool_calls=[("end_call", {})]),
    ])
    folder = examples_for(tmp_path, model.url)
    chat = Chat(folder, "free-trial-followup", "--phone", PHONE, *JOHN, env=environment(fast_speech=True))
    chats.append(chat)

    # The call goes in like a campaign's, with the folder's test-mode key, and John's phone rings.
    assert chat.until("chat: ").startswith(
        f"chat: calling {PHONE} with workflow_slug free-trial-followup (key sandbox).")
    assert chat.next_line() == FIRST_MESSAGE
    chat.say("Yes, sure.")
    assert chat.next_line() == ("agent> I see you started your free trial on February 1st but didn't finish "
                                "activating it. Did anything get in the way?")
    chat.say("The OTP never arrived, I'd like help.")

    # Everything up to the end, in order and nothing else: the tools, the goodbye, who ended the call.
    ending = [chat.next_line() for _ in range(5)]
    assert ending == [
        '  [tool capture_lead_response {"faced_issues":true,"issue":"The OTP never arrived","wants_help":true}'
        ' → "recorded"]',
        # The example's CRM is a placeholder on a reserved domain: the request is never sent.
        '  [tool log_call {"outcome":"needs_help"} → crm.example.com is reserved for documentation; '
        'nothing answers there]',
        f"agent> {GOODBYE}",
        '  [tool end_call {} → "the call ends after your last words"]',
        "  [the agent ended the call: end_call]",
    ], "\n".join(chat.seen)

    # The call record, then dev stops by itself.
    rest = chat.rest()
    assert rest[-1] == "stopped", rest
    assert len([line for line in rest if re.fullmatch(r"call \S+: completed, \d+ s, ended by end_call", line)]) == 1, \
        rest
    captured_at = rest.index("captured: {")
    assert json.loads("{" + "\n".join(rest[captured_at + 1: rest.index("}", captured_at) + 1])) == {
        "capture_lead_response": CAPTURED}
    assert chat.wait() == 0

    # The model was asked three times, with the key from the environment and John's own prompt.
    assert len(model.requests) == 3
    assert all(h["authorization"] == f"Bearer {LLM_KEY}" for h in model.headers)
    first = model.requests[0]["messages"]
    assert first[0]["role"] == "system"
    assert "The user John started their free trial on 2026-02-01" in first[0]["content"]
    assert "{{" not in first[0]["content"]
    assert first[1:] == [
        {"role": "assistant", "content": "Hi John, this is the Tap Health assistant. Do you have a minute?"},
        {"role": "user", "content": "Yes, sure."},
    ]
    assert model.requests[1]["messages"][-1] == {"role": "user", "content": "The OTP never arrived, I'd like help."}
    tool_answers = [m["content"] for m in model.requests[2]["messages"] if m["role"] == "tool"]
    assert tool_answers[0] == '{"result":"recorded"}'
    assert "reserved for documentation" in json.loads(tool_answers[1])["error"]


def test_end_of_input_hangs_up(tmp_path: Path, model: ScriptedModel, chats: list[Chat]) -> None:
    folder = examples_for(tmp_path, model.url)
    chat = Chat(folder, "free-trial-followup", *JOHN, env=environment())  # with the default --phone
    chats.append(chat)
    chat.until("chat: calling ")
    assert chat.next_line() == FIRST_MESSAGE  # (not "ingest refused the call")
    chat.hang_up()
    rest = chat.rest()
    assert rest[:2] == ["[you hung up]", "  [the agent ended the call: callee_hangup]"], rest
    record = r"call \S+: completed, \d+ s, ended by callee_hangup"
    assert len([line for line in rest if re.fullmatch(record, line)]) == 1, rest
    assert not any(line.startswith("captured:") for line in rest)
    assert rest[-1] == "stopped"
    assert chat.wait() == 0
    assert model.requests == []  # the agent's first message is the manifest's, not the model's


@pytest.mark.parametrize("key", [None, ""], ids=["unset", "empty"])
def test_a_missing_model_key_is_named_and_nothing_is_placed(
    tmp_path: Path, model: ScriptedModel, chats: list[Chat], key: str | None
) -> None:
    folder = examples_for(tmp_path, model.url)
    env = environment(model_key=False)
    if key is not None:
        env[KEY_ENV] = key  # `KEY= scripts/dev --chat …`: set, but to nothing
    chat = Chat(folder, "free-trial-followup", "--phone", PHONE, *JOHN, env=env)
    chats.append(chat)
    rest = chat.rest()
    assert (f"chat: agent trial-followup-agent reads its model key from Secret llm-credentials/api-key: "
            f"set {KEY_ENV}") in rest, rest
    # No call: nobody's phone rings for a conversation that could only end in `error`.
    assert not any(line.startswith(("chat: calling", "agent>", "call ", "  [")) for line in rest), rest
    assert rest[-1] == "stopped"
    assert chat.wait() == 1  # a script can tell the chat never called
    assert model.requests == []


def test_an_unknown_slug_lists_the_ones_there_are(tmp_path: Path, model: ScriptedModel, chats: list[Chat]) -> None:
    folder = examples_for(tmp_path, model.url)
    chat = Chat(folder, "no-such-slug", env=environment())
    chats.append(chat)
    rest = chat.rest()
    assert "chat: no workflow or agent 'no-such-slug'; there are: free-trial-followup, trial-followup-agent" in rest
    assert not any(line.startswith(("chat: calling", "agent>", "call ")) for line in rest), rest
    assert rest[-1] == "stopped"
    assert chat.wait() == 1  # a script can tell the chat never called


class Crm(BaseHTTPRequestHandler):
    """A CRM on loopback that records what log_call sends."""

    received: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802 - the http.server API
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append({"path": self.path, "json": json.loads(body)})
        answer = b'{"logged":true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: Any) -> None:
        pass


def test_log_call_reaches_a_crm_the_agent_allows(tmp_path: Path, model: ScriptedModel, chats: list[Chat]) -> None:
    Crm.received = []
    crm = ThreadingHTTPServer(("127.0.0.1", 0), Crm)
    threading.Thread(target=crm.serve_forever, daemon=True).start()
    try:
        model.script([Reply("Noted. Goodbye!", tool_calls=[("log_call", {"outcome": "not_interested"}),
                                                            ("end_call", {})])])
        folder = examples_for(tmp_path, model.url, allowedHosts=["127.0.0.1"])
        agents = folder / "agents.yaml"
        agents.write_text(agents.read_text().replace(
            "https://crm.example.com/calls/log", f"http://127.0.0.1:{crm.server_port}/calls/log"))
        chat = Chat(folder, "free-trial-followup", "--phone", PHONE, *JOHN, env=environment(fast_speech=True))
        chats.append(chat)
        assert chat.until("agent> ") == FIRST_MESSAGE
        chat.say("No thanks, not interested.")
        assert chat.next_line() == "agent> Noted. Goodbye!"
        assert chat.next_line() == ('  [tool log_call {"outcome":"not_interested"} → '
                                    '{"status":200,"body":"{\\"status\\":200,\\"body\\":{\\"logged\\":true}}"}]')
        rest = chat.rest()
        assert rest[-1] == "stopped"
        assert chat.wait() == 0
    finally:
        crm.shutdown()
        crm.server_close()
    # What the campaign sent reached the CRM through the templates.
    assert Crm.received == [{"path": "/calls/log", "json": {
        "phone": PHONE, "user_id": "user-123", "campaign": "trial_recovery_jan", "outcome": "not_interested"}}]
