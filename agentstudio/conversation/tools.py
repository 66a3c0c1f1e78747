"""The tools an agent offers the model, and the actions that need no control of the call: capture
(validated against the tool's JSON Schema) and api_call (rendered, guarded, sent, summarised).
end_call, handoff and transfer change the conversation itself and live in conversation.py."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

import orjson

from agentstudio import templating
from agentstudio.bundle import CompiledAgent, CompiledWorkflow
from agentstudio.conversation.outbound import ApiCaller
from agentstudio.conversation.variables import with_params
from agentstudio.json_schema import compiled
from agentstudio.resources import ToolAction
from agentstudio.secrets import SecretInvalid, SecretReader, read_header

# A handoff tool always lets the model say what the next agent needs to know.
SUMMARY_PROPERTY = {
    "type": "string",
    "description": "What the next agent needs to know: who the callee is, what was said and decided so far.",
}


@dataclass(frozen=True)
class AgentTool:
    name: str
    description: str
    parameters: dict[str, Any]
    action: ToolAction


def agent_tools(agent: CompiledAgent, workflow: CompiledWorkflow | None) -> dict[str, AgentTool]:
    """The agent's own tools, plus one handoff tool per workflow handoff rule from this agent that no
    tool of its own already covers (the rule's `when` tells the model when to use it)."""
    tools = {t.name: AgentTool(t.name, t.description, t.parameters, t.action) for t in agent.spec.tools}
    if workflow is not None:
        covered = {t.action.agent for t in tools.values() if t.action.type == "handoff"}
        for rule in workflow.handoffs:
            if rule.from_ != agent.slug or rule.to in covered:
                continue
            covered.add(rule.to)
            name = "handoff_to_" + re.sub(r"[^a-zA-Z0-9_]", "_", rule.to)[:52]
            what = f"Hand the call over to the {rule.to} agent"
            tools[name] = AgentTool(
                name, f"{what} when: {rule.when}" if rule.when else what + ".",
                {"type": "object", "properties": {}}, ToolAction(type="handoff", agent=rule.to),
            )
    return tools


def openai_tools(tools: dict[str, AgentTool]) -> list[dict[str, Any]]:
    out = []
    for tool in tools.values():
        parameters = tool.parameters
        if tool.action.type == "handoff":
            properties = {**parameters.get("properties", {}), "summary": SUMMARY_PROPERTY}
            parameters = {**parameters, "type": "object", "properties": properties}
        out.append({"type": "function", "function": {
            "name": tool.name, "description": tool.description, "parameters": parameters}})
    return out


def capture_problem(tool: AgentTool, arguments: dict[str, Any]) -> str | None:
    """Why the model's arguments break the tool's schema (the model reads it and may try again)."""
    violation = compiled(tool.parameters).violation(arguments)
    if violation is None:
        return None
    where = ".".join(violation.path)
    return f"invalid arguments{' at ' + where if where else ''}: {violation.message}"


@dataclass(frozen=True)
class ApiOutcome:
    for_model: str
    result: dict[str, Any]  # for the transcript: status and a short body, never the request headers
    error: str | None
    elapsed_ms: int


async def run_api_call(
    tool: AgentTool,
    arguments: dict[str, Any],
    variables: dict[str, Any],
    tenant: str,
    allowed_hosts: list[str],
    caller: ApiCaller,
    secrets: SecretReader,
) -> ApiOutcome:
    action = tool.action
    started = time.monotonic()
    scope = with_params(variables, arguments)
    try:
        url = templating.render(action.url or "", scope)
        headers = {name: templating.render(value, scope) for name, value in action.headers.items()}
        body = templating.render_json(action.body, scope) if action.body is not None else None
    except Exception as exc:  # noqa: BLE001 - a sandbox refusal or a type error in a template
        error = f"the tool's template could not be rendered: {type(exc).__name__}"
        return ApiOutcome(_error(error), {}, error, 0)
    for header in action.headers_from_secrets:
        ref = header.secret_key_ref
        try:
            value = await read_header(secrets, tenant, ref)
        except SecretInvalid as exc:
            value, error = None, str(exc)
        else:
            error = f"secret {ref.name}/{ref.key} is not readable"
        if value is None:
            return ApiOutcome(_error(error), {}, error, int((time.monotonic() - started) * 1000))
        headers[header.name] = value
    answer = await caller.call(action.method, url, headers, body, action.timeout_seconds, allowed_hosts)
    summary = answer.for_model()
    result: dict[str, Any] = {"status": answer.status}
    if answer.error is None:
        result["body"] = summary[:500]
    return ApiOutcome(summary, result, answer.error, answer.elapsed_ms)


def _error(message: str) -> str:
    return orjson.dumps({"error": message}).decode()
