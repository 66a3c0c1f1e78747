"""Warnings for templates that read a user variable the workflow's userContextSchema does not declare."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from agentstudio.bundle import compile_bundle
from agentstudio.manifests import Problem
from conftest import EXAMPLES, docs

AGENT = """
apiVersion: agentstudio.io/v1alpha1
kind: Agent
metadata: {name: followup}
spec:
  prompt: "Call {{user.name}} about the {{user.plan_type}} plan."
  firstMessage: "Hi {{user.name}}"
  tools:
    - name: capture
      action: {type: capture}
    - name: log
      action:
        type: api_call
        url: "https://crm.example/users/{{user.user_id}}"
        body: {who: "{{user.user_id}}", tier: "{{user.tier}}", again: ["{{user.tier}}"], plan: "{{user.name}}"}
"""

WORKFLOW = """
apiVersion: agentstudio.io/v1alpha1
kind: Workflow
metadata: {name: free-trial-followup}
spec:
  entryAgent: followup
  userContextSchema:
    type: object
    properties:
      name: {type: string}
"""

OUTSIDER = """
apiVersion: agentstudio.io/v1alpha1
kind: Agent
metadata: {name: outsider}
spec:
  prompt: "Hello {{user.nickname}}"
"""


def warnings_for(*manifests: str) -> list[Problem]:
    result = compile_bundle("t", docs("---".join(manifests)), {})
    assert result.errors == [] and result.bundle is not None, [str(e) for e in result.errors]
    return result.warnings


def test_undeclared_variables_in_the_prompt_and_a_tool_body_warn_once_each() -> None:
    warnings = warnings_for(AGENT, WORKFLOW)
    assert [(w.index, w.path, w.reason) for w in warnings] == [
        (0, "spec.prompt", "UndeclaredVariable"),
        (0, "spec.tools[1].action.body", "UndeclaredVariable"),
    ]
    assert warnings[0].message == (
        "user.plan_type is not declared in workflow free-trial-followup's userContextSchema; "
        "it renders as an empty string when a campaign does not send it"
    )
    assert warnings[1].message.startswith("user.tier is not declared")


def test_user_id_and_declared_variables_do_not_warn() -> None:
    declared = WORKFLOW + "      plan_type: {type: string}\n      tier: {type: string}\n"
    assert warnings_for(AGENT, declared) == []


def test_a_workflow_without_a_schema_or_declared_properties_does_not_warn() -> None:
    no_schema = WORKFLOW.split("  userContextSchema:")[0]
    open_schema = no_schema + "  userContextSchema: {type: object}\n"
    extra_allowed = WORKFLOW + "    additionalProperties: true\n"
    for workflow in (no_schema, open_schema, extra_allowed):
        assert warnings_for(AGENT, workflow) == [], workflow


def test_agents_outside_the_workflow_are_not_checked_against_it() -> None:
    assert warnings_for(AGENT, WORKFLOW, OUTSIDER) == warnings_for(AGENT, WORKFLOW)
    handed_to = WORKFLOW.replace("entryAgent: followup", "entryAgent: followup\n  agents: [outsider]")
    assert [(w.index, w.path) for w in warnings_for(AGENT, handed_to, OUTSIDER)][-1] == (2, "spec.prompt")


def test_warnings_keep_the_bundle_and_follow_the_manifest_order() -> None:
    result = compile_bundle("t", docs("---".join([AGENT, WORKFLOW])), {})
    assert result.bundle is not None
    again = compile_bundle("t", docs("---".join([AGENT, WORKFLOW])), {})
    assert again.warnings == result.warnings and again.bundle is not None
    assert again.bundle.digest == result.bundle.digest


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "agent-studio"), *args], capture_output=True, text=True, timeout=60
    )


def test_validate_prints_each_warning_with_file_resource_and_field_and_still_passes(tmp_path: Path) -> None:
    (tmp_path / "agents.yaml").write_text(AGENT)
    (tmp_path / "workflows.yaml").write_text(WORKFLOW)
    result = cli("validate", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert (
        f"warning: {tmp_path / 'agents.yaml'} Agent/followup spec.prompt: user.plan_type is not declared in "
        "workflow free-trial-followup's userContextSchema; it renders as an empty string when a campaign "
        "does not send it"
    ) in result.stdout.splitlines(), result.stdout
    assert "2 resources, 0 errors, 2 warnings" in result.stdout


def test_the_examples_declare_every_user_variable_they_read() -> None:
    result = cli("validate", str(EXAMPLES))
    assert result.returncode == 0 and "0 errors, 0 warnings" in result.stdout, result.stdout
