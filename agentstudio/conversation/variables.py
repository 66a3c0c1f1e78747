"""What templates see during a call: `user` (user_context plus user_id), `context` (phone number,
call id, agent and workflow slugs, the workflow's sharedContext), `metadata`, and in tool actions
`params` (the model's arguments). All of it is data: templates come only from manifests."""

from __future__ import annotations

from typing import Any

from agentstudio.bundle import CompiledWorkflow
from agentstudio.calls import CallRequest


def call_variables(call: CallRequest, workflow: CompiledWorkflow | None, agent_slug: str) -> dict[str, Any]:
    user = dict(call.user_context)
    if call.user_id is not None:
        user["user_id"] = call.user_id
    context: dict[str, Any] = dict(workflow.shared_context) if workflow else {}
    context.update(
        phone_number=call.phone_number,
        call_id=call.call_id,
        agent_slug=agent_slug,
        workflow_slug=call.workflow_slug,
    )
    return {"user": user, "context": context, "metadata": dict(call.metadata)}


def with_params(variables: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    return {**variables, "params": params}
