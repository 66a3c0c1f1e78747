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
from agentstudio.manifests import load_dir, load_file
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
    assert schema["properties"]["spec"]["required"]


def test_crd_schemas_carry_patterns_enums_and_cross_field_rules() -> None:
    crds = {n.split(".")[0]: yaml.safe_load(t) for n, t in crdgen.render_all().items()}
    spec = lambda kind: crds[kind]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]  # noqa: E731
    assert spec("agents")["properties"]["slug"]["pattern"]
    action = spec("agents")["properties"]["tools"]["items"]["properties"]["action"]
    assert action["properties"]["type"]["enum"] == ["api_call", "capture", "end_call", "handoff", "transfer"]
    assert any("has(self.url)" in rule["rule"] for rule in action["x-kubernetes-validations"])
    assert spec("apikeys")["properties"]["scopes"]["items"]["enum"] == ["calls:create", "calls:read", "webhooks:manage"]
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
        f"{agents}[1] spec.frstMessage: unknown field",
        f"{agents}[2] spec.slug: String should match pattern",
        f"{agents}[3] Agent/broken-template spec.prompt: template does not parse",
        f"{agents}[3] Agent/broken-template spec.tools[0].action.body: unknown template variable 'secret'",
        f"{agents}[4] spec.tools[0].action: api_call needs url",
        f"{MANIFESTS / 'bad' / 'workflows.yaml'} Workflow/missing-agent spec.entryAgent: agent 'ghost-agent' does not exist",
    ]
    for line in expected:
        assert line in out, f"{line!r} not in:\n{out}"


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
