"""The resource models, the CRDs generated from them, and `agent-studio validate`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from agentstudio import crdgen
from agentstudio.bundle import compile_bundle
from agentstudio.manifests import Manifests, load_dir, load_file, read_dir
from agentstudio.resources import Agent, ApiKey, WebhookSubscription, Workflow
from conftest import EXAMPLES, ROOT

MANIFESTS = Path(__file__).parent / "manifests"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "agent-studio"), *args], capture_output=True, text=True, timeout=60
    )


def test_the_smallest_manifests_are_valid_and_defaulted() -> None:
    resources, problems = load_file(MANIFESTS / "minimal.yaml")
    assert problems == []
    agent, workflow, key, sub = (r.resource for r in resources)
    assert isinstance(agent, Agent) and agent.slug == "trial-followup-agent"
    assert agent.spec.language == "en-US" and agent.spec.tools == [] and agent.spec.max_duration_seconds == 600
    assert isinstance(workflow, Workflow) and workflow.slug == "free-trial-followup"
    assert isinstance(key, ApiKey) and key.spec.effective_rate_limit() == 600 and not key.spec.disabled
    assert key.spec.model_copy(update={"mode": "test"}).effective_rate_limit() == 60
    assert isinstance(sub, WebhookSubscription) and sub.spec.events == ["call.completed", "call.failed"]
    result = compile_bundle("default", resources, {})
    assert result.errors == [] and result.bundle is not None
    assert set(result.bundle.workflows) == {"free-trial-followup"}


def test_generated_crds_match_the_committed_files() -> None:
    rendered = crdgen.render_all()
    committed = {p.name: p.read_text() for p in (ROOT / "crds").glob("*.yaml")}
    assert committed == rendered, "crds/ is stale: run `agent-studio crds`"
    assert cli("crds", "--check", "--out", str(ROOT / "crds")).returncode == 0


def _walk(node: Any, path: str = "") -> list[str]:
    """Structural-schema violations: $ref/anyOf, and nodes without a type."""
    problems = []
    if isinstance(node, dict):
        for banned in ("$ref", "anyOf", "oneOf", "allOf", "title", "const", "uniqueItems"):
            if banned in node:
                problems.append(f"{path}: {banned}")
        for name, sub in node.get("properties", {}).items():
            if "type" not in sub and not sub.get("x-kubernetes-preserve-unknown-fields"):
                problems.append(f"{path}.{name}: no type")
            problems += _walk(sub, f"{path}.{name}")
        if isinstance(node.get("items"), dict):
            problems += _walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            problems += _walk(node["additionalProperties"], f"{path}{{}}")
    return problems


@pytest.mark.parametrize("name", sorted(n for n in crdgen.render_all() if "agentstudio.io" in n))
def test_crds_are_structural_and_discoverable(name: str) -> None:
    crd = yaml.safe_load(crdgen.render_all()[name])
    version = crd["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    assert _walk(schema) == []
    assert crd["spec"]["names"]["categories"] == ["agentstudio"] and crd["spec"]["names"]["shortNames"]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"] for c in version["additionalPrinterColumns"]}
    assert {"Ready", "Age"} <= columns
    assert schema["required"] == ["spec"]
    if name.startswith("callpolicies."):
        assert "required" not in schema["properties"]["spec"]  # `spec: {}` is the preset for each number
    else:
        assert schema["properties"]["spec"]["required"]


def test_crd_schemas_carry_patterns_enums_and_cross_field_rules() -> None:
    crds = {n.split(".")[0]: yaml.safe_load(t) for n, t in crdgen.render_all().items()}
    spec = lambda kind: crds[kind]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]  # noqa: E731
    assert spec("agents")["properties"]["slug"]["pattern"]
    # the API server quotes a failed pattern raw; the rule beside it gives the words validate prints
    [rule] = spec("workflows")["properties"]["agents"]["items"]["x-kubernetes-validations"]
    assert rule["message"] == "must be lowercase letters, digits and dashes, starting and ending with a letter or digit"
    action = spec("agents")["properties"]["tools"]["items"]["properties"]["action"]
    assert action["properties"]["type"]["enum"] == ["api_call", "capture", "end_call", "handoff", "transfer", "opt_out"]
    assert any("has(self.url)" in rule["rule"] for rule in action["x-kubernetes-validations"])
    assert spec("apikeys")["properties"]["scopes"]["items"]["enum"] == ["calls:create", "calls:read", "webhooks:manage", "dnc:manage"]
    assert "call.*" in spec("webhooksubscriptions")["properties"]["events"]["items"]["enum"]
    assert spec("workflows")["required"] == ["entryAgent"]


def test_validate_accepts_the_examples() -> None:
    result = cli("validate", str(EXAMPLES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 errors" in result.stdout


def test_validate_reports_every_error_with_file_document_and_field() -> None:
    result = cli("validate", str(MANIFESTS / "bad"))
    assert result.returncode == 1
    out = result.stdout
    agents = str(MANIFESTS / "bad" / "agents.yaml")
    expected = [
        f"{agents} (document 2) Agent/typo-agent spec.frstMessage: unknown field; did you mean 'firstMessage'?",
        f"{agents} (document 3) Agent/bad-slug spec.slug: must be lowercase letters, digits and dashes, "
        "starting and ending with a letter or digit",
        f"{agents} (document 4) Agent/broken-template spec.prompt: template does not parse",
        f"{agents} (document 4) Agent/broken-template spec.tools[0].action.body: unknown template variable 'secret'",
        f"{agents} (document 5) Agent/tool-without-url spec.tools[0].action: api_call needs url",
        f"{MANIFESTS / 'bad' / 'workflows.yaml'} Workflow/missing-agent spec.entryAgent: agent 'ghost-agent' does not exist",
    ]
    for line in expected:
        assert line in out, f"{line!r} not in:\n{out}"


HELPER_WITH_A_TYPO = """
apiVersion: agentstudio.io/v1alpha1
kind: Agent
metadata: {name: helper}
spec:
  prompt: "Help {{ user.name }} with {{ ''.__class__ }}"
  frstMessage: "Hi"
  tools:
    - name: back
      action: {type: handoff, agent: frontdesk}
"""


def validate(tmp_path: Path, **files: str) -> list[str]:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return cli("validate", str(tmp_path)).stdout.splitlines()


def test_one_pass_reports_template_and_reference_errors_of_documents_with_field_errors(tmp_path: Path) -> None:
    workflow = """
apiVersion: agentstudio.io/v1alpha1
kind: Workflow
metadata: {name: support}
spec:
  entryAgent: nobody
  agents: [helper]
  handoffs: [{from: nobody, to: helper}]
  colour: blue
"""
    out = validate(tmp_path, **{"agents.yaml": HELPER_WITH_A_TYPO, "workflows.yaml": workflow})
    agents, workflows = tmp_path / "agents.yaml", tmp_path / "workflows.yaml"
    assert out == [
        f"error: {agents} Agent/helper spec.frstMessage: unknown field; did you mean 'firstMessage'?",
        f"error: {agents} Agent/helper spec.prompt: '__class__': names starting with '_' are never readable in a template (line 1)",
        f"error: {agents} Agent/helper spec.tools[0].action.agent: agent 'frontdesk' does not exist",
        f"error: {workflows} Workflow/support spec.colour: unknown field",
        f"error: {workflows} Workflow/support spec.entryAgent: agent 'nobody' does not exist",
        f"error: {workflows} Workflow/support spec.agents[0]: agent 'helper' is invalid: "
        "spec.frstMessage: unknown field; did you mean 'firstMessage'?",
        "2 resources, 6 errors, 0 warnings",
    ], "\n".join(out)


def test_a_workflow_naming_an_invalid_agent_says_why_it_is_invalid(tmp_path: Path) -> None:
    workflow = """
apiVersion: agentstudio.io/v1alpha1
kind: Workflow
metadata: {name: support}
spec: {entryAgent: helper}
"""
    two_errors = HELPER_WITH_A_TYPO.replace("metadata: {name: helper}", "metadata: {name: helper}\nstatus: 3")
    found = read_dir_of(tmp_path, {"agents.yaml": two_errors, "workflows.yaml": workflow})
    result = compile_bundle("t", found.resources, {}, found.rejected)
    [problem] = [p for p in result.errors if p.source.endswith("workflows.yaml")]
    assert (problem.path, problem.reason) == ("spec.entryAgent", "AgentInvalid")
    assert problem.message.startswith("agent 'helper' is invalid: ") and problem.message.endswith("(and 1 more)")


def read_dir_of(tmp_path: Path, files: dict[str, str]) -> Manifests:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return read_dir(tmp_path)


def test_near_misses_are_named(tmp_path: Path) -> None:
    manifests = """
apiVersion: agentstudio.io/v1alpha1
kind: Agent
metadata: {name: helper}
spec:
  prompt: "Hi"
  tools: [{name: go, action: {type: handoff, agent: helpr}}]
---
apiVersion: agentstudio.io/v1alpha1
kind: Workflow
metadata: {name: support}
spec:
  entryAgent: helpr
  handoffs: [{from: helpr, to: helper}]
---
apiVersion: agentstudio.io/v1alpha1
kind: Agnet
metadata: {name: x}
---
apiVersion: agentstudio.io/v1alpha1
kind: Agent
metadata: {name: y}
spec:
  prompt: "Hi"
  tools: [{name: go, action: {type: end_call, mehtod: GET}}]
---
apiVersion: agentstudio.io/v1alpha1
kind: Agent
metadata: {name: z}
spce: {prompt: "Hi"}
"""
    out = "\n".join(validate(tmp_path, **{"all.yaml": manifests}))
    for line in (
        "(document 1) Agent/helper spec.tools[0].action.agent: agent 'helpr' does not exist; did you mean 'helper'?",
        "(document 2) Workflow/support spec.entryAgent: agent 'helpr' does not exist; did you mean 'helper'?",
        "(document 2) Workflow/support spec.handoffs[0].to: agent 'helper' is not one of the workflow's agents; "
        "did you mean 'helpr'?",
        "(document 3) kind: must be one of Agent, Workflow, ApiKey, WebhookSubscription, CallPolicy; did you mean 'Agent'?",
        "(document 4) Agent/y spec.tools[0].action.mehtod: unknown field; did you mean 'method'?",
        "(document 5) Agent/z spce: unknown field; did you mean 'spec'?",
    ):
        assert line in out, f"{line!r} not in:\n{out}"
    # far from every name: no guess
    assert "'ghost-agent' does not exist\n" in cli("validate", str(MANIFESTS / "bad")).stdout


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    out = validate(tmp_path, **{"broken.yaml": "apiVersion: agentstudio.io/v1alpha1\nkind: Agent\nmetadata:\n  name: x\n spec: y\n"})
    assert out[0].startswith(f"error: {tmp_path / 'broken.yaml'}: not valid YAML at line 5, column 2: "), out
    assert "<unicode string>" not in "\n".join(out)


def test_counts_are_singular_for_one(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text((MANIFESTS / "bad" / "workflows.yaml").read_text())
    assert cli("validate", str(tmp_path)).stdout.splitlines()[-1] == "1 resource, 1 error, 0 warnings"
    (tmp_path / "a.yaml").write_text("""
apiVersion: agentstudio.io/v1alpha1
kind: Agent
metadata: {name: a}
spec: {prompt: "Hi {{ user.plan }}"}
---
apiVersion: agentstudio.io/v1alpha1
kind: Workflow
metadata: {name: w}
spec: {entryAgent: a, userContextSchema: {type: object, properties: {name: {type: string}}}}
""")
    assert cli("validate", str(tmp_path)).stdout.splitlines()[-1] == "2 resources, 0 errors, 1 warning"


def test_load_dir_skips_other_kubernetes_objects_and_state(tmp_path: Path) -> None:
    (tmp_path / "secret.yaml").write_text("apiVersion: v1\nkind: Secret\nmetadata: {name: s}\n")
    (tmp_path / ".agent-studio").mkdir()
    (tmp_path / ".agent-studio" / "x.yaml").write_text("nonsense: [")
    (tmp_path / "a.yaml").write_text((MANIFESTS / "minimal.yaml").read_text())
    resources, problems = load_dir(tmp_path)
    assert problems == [] and len(resources) == 4


def test_duplicate_slugs_and_handoff_targets_are_errors(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("""
apiVersion: agentstudio.io/v1alpha1
kind: Agent
metadata: {name: one}
spec: {slug: same, prompt: "x"}
---
apiVersion: agentstudio.io/v1alpha1
kind: Agent
metadata: {name: two}
spec:
  slug: same
  prompt: "x"
  tools: [{name: go, action: {type: handoff, agent: nobody}}]
---
apiVersion: agentstudio.io/v1alpha1
kind: Workflow
metadata: {name: wf}
spec:
  entryAgent: same
  handoffs: [{from: same, to: stranger}]
""")
    resources, problems = load_dir(tmp_path)
    assert problems == []
    messages = [str(e) for e in compile_bundle("t", resources, {}).errors]
    assert any("slug 'same' is already used by 'one'" in m for m in messages), messages
    assert any("spec.tools[0].action.agent: agent 'nobody' does not exist" in m for m in messages), messages
    assert any("spec.handoffs[0].to: agent 'stranger' is not one of the workflow's agents" in m for m in messages)


def test_a_header_name_the_http_client_would_refuse_is_refused_before_publishing(tmp_path: Path) -> None:
    """The CRD cannot constrain a map's keys, so validate (and the operator's compile) must: such a
    name made every call of the tool fail inside the HTTP client."""
    agent = """
apiVersion: agentstudio.io/v1alpha1
kind: Agent
metadata: {name: crm}
spec:
  prompt: Log it.
  tools:
    - name: log
      action: {type: api_call, url: "https://crm.example.org/log", headers: {"X-Tenant": "a", "X-Clé": "b"}}
"""
    out = validate(tmp_path, **{"agent.yaml": agent})
    assert any(line.endswith("Agent/crm spec.tools[0].action: headers: 'X-Clé' is not a header name: "
                             "must be letters, digits and dashes (at most 128)") for line in out), out


def test_a_webhook_subscription_name_with_a_dot_is_refused_naming_the_field(tmp_path: Path) -> None:
    """Its name is one token of its delivery subject and its consumer's name, which a dot would split
    (JetStream refuses the consumer: the subscription would never deliver)."""
    subscription = """
apiVersion: agentstudio.io/v1alpha1
kind: WebhookSubscription
metadata: {name: crm.results}
spec: {url: "https://hooks.example.com/calls", events: [call.completed]}
"""
    out = validate(tmp_path, **{"subs.yaml": subscription})
    assert out == [f"error: {tmp_path / 'subs.yaml'} WebhookSubscription/crm.results metadata.name: must be lowercase "
                   "letters, digits and dashes, starting and ending with a letter or digit",
                   "1 resource, 1 error, 0 warnings"], out
