"""One conversation between a workflow's agents and the callee, independent of how speech travels.

The transport (Twilio ConversationRelay, or the terminal in `agent-studio dev --chat`) feeds it the
callee's events — start, prompt, interrupt, dtmf, hang-up — and carries its speech through `Voice`.
Replies stream from the model token by token straight into `Voice.text`; tool calls run between
model rounds; a barge-in cancels the reply and keeps only what the callee heard. Every turn goes
into the transcript, which the `Recorder` writes to the call record as the call goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from nats.errors import Error as NatsError

from agentstudio import templating, tracing
from agentstudio.bundle import Bundle, CompiledAgent, CompiledWorkflow
from agentstudio.calls import CallRequest
from agentstudio.conversation.metrics import VoiceMetrics
from agentstudio.conversation.llm import ChatModel, Endpoint, LlmError, TextDelta, ToolCall
from agentstudio.conversation.outbound import ApiCaller
from agentstudio.conversation.tools import AgentTool, agent_tools, capture_problem, openai_tools, run_api_call
from agentstudio.conversation.transcript import Turn, turn
from agentstudio.conversation.variables import call_variables
from agentstudio.do_not_call import DoNotCall
from agentstudio.secrets import SecretInvalid, SecretReader, read_header

log = logging.getLogger("agentstudio.conversation")

SILENCE_CHECK = "The callee has said nothing for {seconds} seconds. Briefly check whether they are still on the line."
SILENCE_GOODBYE = "The callee is still silent. Say a brief, polite goodbye now; the call ends after it."
TIME_UP = "The call has reached its time limit. Say a brief, polite goodbye now; the call ends after it."


class ConversationError(Exception):
    """The conversation cannot go on (a missing agent or an unreadable Secret); safe to log."""


class Voice(Protocol):
    """What the conversation says to the call."""

    async def text(self, token: str, last: bool) -> None: ...

    async def language(self, code: str) -> None: ...

    async def end(self, data: dict[str, Any]) -> None: ...


class Recorder(Protocol):
    def update(self, transcript: list[Turn], captured: dict[str, Any], end_reason: str | None) -> None:
        """Schedule a write of the conversation so far (returns at once; writes coalesce)."""


@dataclass(frozen=True)
class Limits:
    speech_chars_per_second: float = 15.0  # how long speech takes to play, to end after the last words
    max_tool_rounds: int = 6  # model rounds in one reply before it must answer in words
    goodbye_timeout_seconds: float = 10.0
    silence_check_ins: int = 1  # check-ins after silence before the agent says goodbye
    max_call_seconds: float = 14400  # the platform's cap over every agent's maxDurationSeconds


@dataclass(frozen=True)
class Tools:
    """What a conversation may reach: the model, outbound HTTP for api_call, Secrets, and the
    do-not-call list for opt_out."""

    model: ChatModel
    api: ApiCaller
    secrets: SecretReader
    dnc: DoNotCall


@dataclass(frozen=True)
class _ToolRun:
    """What one tool call came to. `answer`: what the model reads back, when not the result or error."""

    result: Any = None
    error: str | None = None
    elapsed_ms: int | None = None
    answer: str | None = None
    ending: tuple[str, dict[str, Any]] | None = None  # end_call or transfer, with the end's data
    handoff: tuple[CompiledAgent, str] | None = None  # the agent taking over, and the summary


class _Ended(Exception):
    """Raised inside a reply when a tool ended the conversation."""


class Conversation:
    def __init__(
        self,
        call: CallRequest,
        bundle: Bundle,
        voice: Voice,
        tools: Tools,
        recorder: Recorder,
        limits: Limits = Limits(),
        observer: Callable[[Turn], None] | None = None,
        metrics: VoiceMetrics | None = None,
    ) -> None:
        self.call = call
        self.bundle = bundle
        self.voice = voice
        self.deps = tools
        self.recorder = recorder
        self.limits = limits
        self.observer = observer
        self.metrics = metrics or VoiceMetrics()
        self.workflow: CompiledWorkflow | None = bundle.workflows.get(call.workflow_slug) if call.workflow_slug else None
        if call.workflow_slug and self.workflow is None:
            raise ConversationError(f"workflow {call.workflow_slug!r} no longer exists")
        self.agent = self._agent(bundle.entry_slug(call.workflow_slug, call.agent_slug) or "")
        self.transcript: list[Turn] = []
        self.captured: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []  # the conversation as the model reads it, without system
        self.inbox: list[str] = []  # what the callee said that the model has not read yet
        self.end_reason: str | None = None
        self.ended = asyncio.Event()
        self._system = ""
        self._summary: str | None = None
        self._tools: dict[str, AgentTool] = {}
        self._endpoint: Endpoint | None = None
        self._reply: asyncio.Task[None] | None = None
        self._streaming = False  # the reply is streaming words (cancellable), not running tools
        self._open_utterance = False  # words sent without their last=true yet
        self._last_said: tuple[Turn, dict[str, Any]] | None = None  # the agent's latest words
        self._speaking_until = 0.0
        self._silence: asyncio.TimerHandle | None = None
        self._silent_checks = 0
        self._deadline: asyncio.TimerHandle | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._loop = asyncio.get_running_loop()
        self.span: tracing.Span = tracing.INVALID_SPAN  # the conversation's, set by whoever opens it

    # --- events from the call ------------------------------------------------------------------

    async def start(self) -> None:
        """The callee answered: the entry agent speaks its first message, or the model opens."""
        limit = min(self.agent.spec.max_duration_seconds, self.limits.max_call_seconds)
        self._deadline = self._loop.call_later(limit, self._spawn, self._time_up)
        try:
            with self._turn("start"):
                await self._enter(self.agent, previous=None)
        except ConversationError as exc:
            log.warning("conversation failed", extra={"call_id": self.call.call_id, "error": str(exc)})
            await self._finish("error", error=str(exc))
            return
        if self.agent.spec.first_message is None:
            self._start_reply()

    async def prompt(self, text: str) -> None:
        """The callee said something (a final transcription)."""
        if self.ended.is_set() or not text.strip():
            return
        self._callee_spoke()
        self._add(turn("message", self.agent.slug, speaker="callee", text=text))
        self.inbox.append(text)
        await self._kick()

    async def interrupt(self, heard: str) -> None:
        """The callee barged in: stop talking; only `heard` of our words reached them."""
        if self.ended.is_set():
            return
        self._callee_spoke()
        cut = await self._cancel_words()
        if self._last_said is not None:
            said, message = self._last_said
            if cut or said.text != heard:
                said.text, said.interrupted = heard, True
                message["content"] = heard
                self._changed()
        self._speaking_until = 0.0

    async def dtmf(self, digit: str) -> None:
        if self.ended.is_set():
            return
        self._callee_spoke()
        self._add(turn("dtmf", self.agent.slug, speaker="callee", digit=digit))
        self.inbox.append(f"(The callee pressed {digit} on the keypad.)")
        await self._kick()

    async def hung_up(self) -> None:
        """The call is gone (the callee hung up, or the transport closed)."""
        if not self.ended.is_set():
            self._close("callee_hangup")
        await self.stop()

    async def stop(self) -> None:
        for handle in (self._silence, self._deadline):
            if handle is not None:
                handle.cancel()
        tasks = [t for t in (self._reply, *self._background) if t is not None and t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        if tasks:  # bounded: a library that swallows a cancel must not keep a hung-up call open
            await asyncio.wait(tasks, timeout=5)

    # --- agents ----------------------------------------------------------------------------------

    def _agent(self, slug: str) -> CompiledAgent:
        agent = self.bundle.agents.get(slug)
        if agent is None:
            raise ConversationError(f"agent {slug!r} no longer exists")
        return agent

    def variables(self) -> dict[str, Any]:
        return call_variables(self.call, self.workflow, self.agent.slug)

    async def _enter(self, agent: CompiledAgent, previous: CompiledAgent | None) -> None:
        """Make `agent` the one talking: its prompt, tools and model; it speaks its first message."""
        spec = agent.spec
        api_key = None
        if (ref := spec.llm.api_key_secret_ref) is not None:
            try:  # the key travels as a header (Authorization: Bearer)
                api_key = await read_header(self.deps.secrets, self.call.tenant, ref)
            except SecretInvalid as exc:
                raise ConversationError(f"agent {agent.slug}: {exc} (spec.llm.apiKeySecretRef)") from None
            if api_key is None:
                raise ConversationError(f"agent {agent.slug}: secret {ref.name}/{ref.key} (spec.llm.apiKeySecretRef) is not readable")
        self.agent = agent
        self._endpoint = Endpoint(spec.llm.base_url, spec.llm.model, api_key, spec.llm.temperature, spec.llm.max_tokens)
        self._tools = agent_tools(agent, self.workflow)
        variables = self.variables()
        try:
            system = templating.render(spec.prompt, variables)
            first = templating.render(spec.first_message, variables) if spec.first_message is not None else None
        except Exception as exc:  # noqa: BLE001 - the sandbox refusing what a manifest's template does
            raise ConversationError(f"agent {agent.slug}: its prompt could not be rendered: {type(exc).__name__}") from None
        if previous is not None:
            system += f"\n\nYou are taking over this call from the {previous.slug} agent."
            if self._summary:
                system += f" Their summary: {self._summary}"
            if self.captured:
                system += f"\nRecorded so far: {orjson.dumps(self.captured).decode()}"
            if spec.language != previous.spec.language:
                await self.voice.language(spec.language)
        self._system = system
        if first is not None:
            await self._say(first)
            self._arm_silence()

    async def _say(self, text: str) -> None:
        """Speak a whole sentence we already have (a first message)."""
        said = turn("message", self.agent.slug, speaker="agent", text=text)
        message = {"role": "assistant", "content": text}
        self.history.append(message)
        self._add(said)
        self._last_said = (said, message)
        await self.voice.text(text, True)
        self._spoken(text)

    # --- replies ----------------------------------------------------------------------------------

    async def _kick(self) -> None:
        """New callee input: restart a reply that is still talking; one running tools reads it next round."""
        if self._reply is not None and not self._reply.done():
            if not self._streaming:
                return
            await self._cancel_words()
        self._start_reply()

    def _start_reply(self, note: str | None = None) -> None:
        self._reply = asyncio.create_task(self._respond(note), name=f"reply-{self.call.call_id}")

    async def _cancel_words(self) -> bool:
        """Stop a reply that is streaming words; whether one was cut short."""
        task = self._reply
        cut = task is not None and not task.done() and self._streaming
        if cut:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self._end_utterance()  # a cut reply is over too (Twilio's own sample says so the same way)
        return cut

    async def _end_utterance(self) -> bool:
        """Send the `last: true` of words sent without it; whether there were any."""
        if not self._open_utterance:
            return False
        self._open_utterance = False
        await self.voice.text("", True)
        return True

    def _turn(self, trigger: str) -> contextlib.AbstractContextManager[tracing.Span]:
        """A turn's span: the agent's answer to what the callee did (`trigger`), child of the conversation."""
        return tracing.span("conversation turn", context=tracing.child_of(self.span),
                            attributes={"call_id": self.call.call_id, "agent": self.agent.slug, "trigger": trigger})

    async def _respond(self, note: str | None = None) -> None:
        with self._turn("callee" if note is None else "note"):
            await self._replies(note)

    async def _replies(self, note: str | None) -> None:
        try:
            rounds = 0
            while True:
                self._take_inbox()
                rounds += 1
                calls = await self._model_round(note, with_tools=rounds <= self.limits.max_tool_rounds)
                note = None
                if calls:
                    previous = self.agent
                    await self._run_tools(calls)
                    if self.agent is not previous and self.agent.spec.first_message is not None and not self.inbox:
                        break  # the new agent greeted; the callee speaks next
                    continue  # the model reads the tool results (or the new agent opens)
                if not self.inbox:
                    break
            self._arm_silence()
        except _Ended:
            pass
        except LlmError as exc:
            log.warning("model failed", extra={"call_id": self.call.call_id, "error": str(exc)})
            await self._finish("model_error", error=str(exc))
        except ConversationError as exc:
            log.warning("conversation failed", extra={"call_id": self.call.call_id, "error": str(exc)})
            await self._finish("error", error=str(exc))

    def _take_inbox(self) -> None:
        if self.inbox:
            self.history.append({"role": "user", "content": "\n".join(self.inbox)})
            self.inbox.clear()

    async def _model_round(self, note: str | None, with_tools: bool = True) -> list[ToolCall]:
        """One streamed model reply: words go out as they come; tool calls are returned."""
        assert self._endpoint is not None
        messages = [{"role": "system", "content": self._system}, *self.history]
        if note:
            messages.append({"role": "system", "content": note})
        said: Turn | None = None
        message: dict[str, Any] = {"role": "assistant", "content": None}
        words: list[str] = []
        calls: list[ToolCall] = []
        self._streaming = True
        asked = self._loop.time()
        with tracing.span("llm request", kind=tracing.SpanKind.CLIENT, attributes={
                "call_id": self.call.call_id, "agent": self.agent.slug, "gen_ai.operation.name": "chat",
                "gen_ai.request.model": self._endpoint.model, "tools_offered": with_tools}) as span:
            try:
                stream = self.deps.model.stream(self._endpoint, messages,
                                                openai_tools(self._tools) if with_tools else [])
                async with contextlib.aclosing(stream):  # a barge-in closes the model's response at once
                    async for event in stream:
                        if isinstance(event, TextDelta):
                            if said is None:
                                self.metrics.first_token.observe(self._loop.time() - asked)
                                span.set_attribute("time_to_first_token_ms",
                                                   round((self._loop.time() - asked) * 1000, 1))
                                span.add_event("first token")
                                said = turn("message", self.agent.slug, speaker="agent", text="")
                                self.history.append(message)
                                self._add(said)
                                self._last_said = (said, message)
                            words.append(event.text)
                            self._open_utterance = True
                            await self.voice.text(event.text, False)
                        elif isinstance(event, ToolCall):
                            calls.append(event)
            finally:
                span.set_attributes({"tool_calls": len(calls), "output_chars": sum(map(len, words))})
                self._streaming = False
                if said is not None:  # what was sent, also when a barge-in cut the stream
                    said.text = message["content"] = "".join(words)
                    self._changed()
        if await self._end_utterance():
            self._spoken("".join(words))
        if calls:
            if said is None:
                self.history.append(message)
            message["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls
            ]
        return calls

    async def _opt_out(self, arguments: dict[str, Any]) -> tuple[str | None, str | None]:
        """The callee asked not to be called again: their number goes on the tenant's list at once,
        and the model, told so, brings the call to a polite end. (result, error)"""
        reason = arguments.get("reason")
        try:
            await self.deps.dnc.add(self.call.tenant, self.call.phone_number, "opt_out",
                                    reason[:500] if isinstance(reason, str) and reason else None)
        except (NatsError, TimeoutError) as exc:
            log.warning("opt-out not recorded", extra={"call_id": self.call.call_id, "error": type(exc).__name__})
            return None, "the opt-out could not be recorded right now; tell the callee it will be handled"
        return "the callee's number is on the do-not-call list and will not be called again", None

    async def _run_tools(self, calls: list[ToolCall]) -> None:
        """Run every tool call of one model reply; each gets its answer in the history."""
        ending: tuple[str, dict[str, Any]] | None = None
        handoff: tuple[CompiledAgent, str] | None = None
        for call in calls:
            tool = self._tools.get(call.name)
            kind = tool.action.type if tool else "unknown"
            arguments = self._arguments(call)
            with tracing.span("tool call", attributes={"call_id": self.call.call_id, "agent": self.agent.slug,
                                                       "tool": call.name, "tool.type": kind}) as span:
                ran = await self._run_tool(call, tool, arguments, handing_off=handoff is not None)
                if ran.error:
                    tracing.failed(span, "tool error")  # the error's text may quote the callee
            ending = ran.ending or ending
            handoff = handoff or ran.handoff
            self.metrics.tool_calls.labels(kind, "error" if ran.error else "ok").inc()
            shown = arguments if isinstance(arguments, dict) else {"raw": call.arguments[:500]}
            self._add(turn("tool", self.agent.slug, tool=call.name, arguments=shown, result=ran.result,
                           error=ran.error, elapsed_ms=ran.elapsed_ms))
            answer = ran.answer
            if answer is None:
                answer = orjson.dumps({"error": ran.error} if ran.error else {"result": ran.result}).decode()
            self.history.append({"role": "tool", "tool_call_id": call.id, "content": answer})
        if ending is not None:
            reason, data = ending
            if reason == "transfer":
                self._add(turn("transfer", self.agent.slug, to=data["transfer_to"]))
            await self._finish(reason, **data)
            raise _Ended
        if handoff is not None:
            target, summary = handoff
            self._add(turn("handoff", self.agent.slug, to=target.slug, summary=summary or None))
            self._summary = summary
            with tracing.span("handoff", attributes={"call_id": self.call.call_id, "from_agent": self.agent.slug,
                                                     "to_agent": target.slug}):
                await self._enter(target, previous=self.agent)

    async def _run_tool(self, call: ToolCall, tool: AgentTool | None, arguments: Any, handing_off: bool) -> _ToolRun:
        """One tool call: its result or error; an end or a handoff is only asked for, by `ending` and
        `handoff`, and happens once every call of the reply has its answer."""
        if tool is None:
            return _ToolRun(error=f"there is no tool named {call.name!r}")
        if not isinstance(arguments, dict):
            return _ToolRun(error="arguments are not a JSON object")
        action = tool.action
        if action.type == "capture":
            error = capture_problem(tool, arguments)
            if error is not None:
                return _ToolRun(error=error)
            self.captured[tool.name] = arguments
            return _ToolRun(result="recorded")
        if action.type == "api_call":
            outcome = await run_api_call(tool, arguments, self.variables(), self.call.tenant,
                                         self.agent.spec.allowed_hosts, self.deps.api, self.deps.secrets)
            return _ToolRun(result=outcome.result, error=outcome.error, elapsed_ms=outcome.elapsed_ms,
                            answer=outcome.for_model)
        if action.type == "opt_out":
            result, error = await self._opt_out(arguments)
            return _ToolRun(result=result, error=error)
        if action.type == "end_call":
            return _ToolRun(result="the call ends after your last words", ending=("end_call", {}))
        if action.type == "transfer":
            return _ToolRun(result="connecting the callee", ending=("transfer", {"transfer_to": action.phone_number}))
        if action.type == "handoff":
            target = action.agent or ""
            if self.workflow is not None and target not in self.workflow.agents:
                return _ToolRun(error=f"agent {target!r} is not part of this workflow")
            if handing_off:
                return _ToolRun(error="the call is already being handed over")
            return _ToolRun(result=f"handing the call to {target}",
                            handoff=(self._agent(target), str(arguments.pop("summary", "") or "")))
        return _ToolRun()

    @staticmethod
    def _arguments(call: ToolCall) -> Any:
        try:
            return orjson.loads(call.arguments or "{}")
        except orjson.JSONDecodeError:
            return None

    # --- silence, time limit and the end ---------------------------------------------------------

    def _callee_spoke(self) -> None:
        self._silent_checks = 0
        if self._silence is not None:
            self._silence.cancel()
            self._silence = None

    def _spoken(self, text: str) -> None:
        """Estimate when the callee has heard `text` (ConversationRelay does not say)."""
        start = max(self._loop.time(), self._speaking_until)
        self._speaking_until = start + len(text) / self.limits.speech_chars_per_second

    def _arm_silence(self) -> None:
        if self.ended.is_set():
            return
        if self._silence is not None:
            self._silence.cancel()
        delay = max(0.0, self._speaking_until - self._loop.time()) + self.agent.spec.silence_timeout_seconds
        self._silence = self._loop.call_later(delay, self._spawn, self._silent)

    def _spawn(self, coro: Callable[[], Any]) -> None:
        task = asyncio.create_task(coro())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _silent(self) -> None:
        if self.ended.is_set() or (self._reply is not None and not self._reply.done()):
            return
        self._silent_checks += 1
        seconds = self.agent.spec.silence_timeout_seconds
        self._add(turn("silence", self.agent.slug, seconds=seconds))
        if self._silent_checks <= self.limits.silence_check_ins:
            self._start_reply(SILENCE_CHECK.format(seconds=seconds))
        else:
            await self._goodbye(SILENCE_GOODBYE, "silence")

    async def _time_up(self) -> None:
        if self.ended.is_set():
            return
        if self._reply is not None and not self._reply.done():
            self._reply.cancel()
            await asyncio.gather(self._reply, return_exceptions=True)
        await self._end_utterance()
        await self._goodbye(TIME_UP, "max_duration")

    async def _goodbye(self, note: str, reason: str) -> None:
        """One last model reply without tools, bounded in time, then the end."""
        self._answer_unanswered()
        with self._turn(reason):
            try:
                async with asyncio.timeout(self.limits.goodbye_timeout_seconds):
                    self._take_inbox()
                    await self._model_round(note, with_tools=False)
            except (LlmError, TimeoutError) as exc:
                log.warning("no goodbye from the model", extra={"call_id": self.call.call_id, "error": str(exc)})
            await self._finish(reason)

    def _answer_unanswered(self) -> None:
        """A reply cut off while its tools ran leaves tool calls without answers, which the model's
        API refuses: answer them as cancelled."""
        answered = {m.get("tool_call_id") for m in self.history if m["role"] == "tool"}
        for message in [m for m in self.history if m.get("tool_calls")]:
            for call in message["tool_calls"]:
                if call["id"] not in answered:
                    at = self.history.index(message) + 1
                    while at < len(self.history) and self.history[at]["role"] == "tool":
                        at += 1
                    self.history.insert(at, {"role": "tool", "tool_call_id": call["id"],
                                             "content": '{"error": "cancelled"}'})

    async def _finish(self, reason: str, **data: Any) -> None:
        """End after the last words have been heard."""
        if self.ended.is_set():
            return
        self._close(reason, data.get("error"))
        wait = self._speaking_until - self._loop.time()
        if wait > 0:
            await asyncio.sleep(min(wait, 30.0))
        await self.voice.end({"reason": reason, **data})

    def _close(self, reason: str, error: str | None = None) -> None:
        self.end_reason = reason
        self._add(turn("end", self.agent.slug, reason=reason, error=error))
        self.ended.set()
        for handle in (self._silence, self._deadline):
            if handle is not None:
                handle.cancel()

    # --- the record ---------------------------------------------------------------------------------

    def _add(self, item: Turn) -> None:
        self.transcript.append(item)
        if self.observer is not None:
            self.observer(item)
        self._changed()

    def _changed(self) -> None:
        self.recorder.update(self.transcript, self.captured, self.end_reason)
