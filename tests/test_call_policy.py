"""The CallPolicy kind: its manifest, how a call finds its policy, and what `validate` says about it."""

from __future__ import annotations

from pathlib import Path

from agentstudio.bundle import compile_bundle
from agentstudio.manifests import load_dir
from test_resources import validate

AGENTS = """
apiVersion: agentstudio.io/v1alpha1
kind: Agent
metadata: {name: sales}
spec:
  prompt: "Hello {{ user.name }}"
---
apiVersion: agentstudio.io/v1alpha1
kind: Agent
metadata: {name: support}
spec:
  prompt: "Hi"
  callPolicy: patient
---
apiVersion: agentstudio.io/v1alpha1
kind: Workflow
metadata: {name: renewals}
spec:
  entryAgent: sales
  callPolicy: france-only
---
apiVersion: agentstudio.io/v1alpha1
kind: Workflow
metadata: {name: helpdesk}
spec:
  entryAgent: support
"""

POLICIES = """
apiVersion: agentstudio.io/v1alpha1
kind: CallPolicy
metadata: {name: default}
spec:
  preset: auto
---
apiVersion: agentstudio.io/v1alpha1
kind: CallPolicy
metadata: {name: france-only}
spec:
  preset: france
  cap: {count: 2, windowSeconds: 86400}
---
apiVersion: agentstudio.io/v1alpha1
kind: CallPolicy
metadata: {name: patient}
spec:
  preset: none
  hours:
    mon: ["09:00-12:00", "22:00-02:00"]
    defaultZone: Europe/Berlin
  retries: {maxAttempts: 3, outcomes: [no_answer, voicemail], delaysSeconds: [600, 3600]}
  voicemail: {action: leave_message, message: "Hi {{ user.name }}, we will call again."}
"""


def bundle_of(tmp_path: Path, *texts: str):  # type: ignore[no-untyped-def]
    for i, text in enumerate(texts):
        (tmp_path / f"{i}.yaml").write_text(text)
    resources, problems = load_dir(tmp_path)
    assert problems == []
    result = compile_bundle("t", resources, {})
    assert result.errors == [], result.errors
    assert result.bundle is not None
    return result.bundle


def test_a_call_takes_its_workflows_policy_then_its_agents_then_the_namespace_default(tmp_path: Path) -> None:
    bundle = bundle_of(tmp_path, AGENTS, POLICIES)
    assert bundle.policy_for("renewals", None).preset == "france"
    assert bundle.policy_for("renewals", None).cap.count == 2  # type: ignore[union-attr]
    patient = bundle.policy_for("helpdesk", None)  # the workflow names none: its entry agent's
    assert patient is not None and patient.retries.max_attempts == 3
    assert str(patient.hours.mon[1]) == "22:00-02:00"  # type: ignore[union-attr]
    assert patient.voicemail is not None and patient.voicemail.action == "leave_message"
    assert bundle.policy_for(None, "support") == patient
    assert bundle.policy_for(None, "sales").preset == "auto"  # type: ignore[union-attr]  # the default


def test_without_a_default_policy_a_call_that_names_none_has_none(tmp_path: Path) -> None:
    only_named = POLICIES.split("---", 1)[1]
    bundle = bundle_of(tmp_path, AGENTS, only_named)
    assert bundle.policy_for(None, "sales") is None
    assert bundle.policy_for("renewals", None) is not None


def test_a_policy_travels_in_the_bundle_bytes(tmp_path: Path) -> None:
    from agentstudio.bundle import Bundle

    bundle = bundle_of(tmp_path, AGENTS, POLICIES)
    again = Bundle.from_bytes(bundle.to_bytes())
    assert again.policy_for("helpdesk", None) == bundle.policy_for("helpdesk", None)
    assert again.content_digest() == bundle.content_digest()


def test_a_bundle_compiled_before_the_cap_window_limit_still_loads(tmp_path: Path) -> None:
    """A 120-day cap is refused in a manifest now, but a bundle an earlier version compiled with one is
    read: an upgrade must not leave the tenant's ingest and dialers without a bundle."""
    import orjson
    import pytest
    from pydantic import ValidationError

    from agentstudio.bundle import Bundle

    body = orjson.loads(bundle_of(tmp_path, AGENTS, POLICIES).to_bytes())
    body["policies"]["france-only"]["cap"]["window_seconds"] = 120 * 86400
    older = Bundle.from_bytes(orjson.dumps(body))
    assert older.policy_for("renewals", None).cap.window_seconds == 120 * 86400  # type: ignore[union-attr]
    with pytest.raises(ValidationError, match="less than or equal to 7776000"):
        Bundle.model_validate_json(orjson.dumps(body))  # as a manifest's policy would be


def test_validate_names_the_file_and_field_of_each_policy_error(tmp_path: Path) -> None:
    bad = """
apiVersion: agentstudio.io/v1alpha1
kind: CallPolicy
metadata: {name: broken}
spec:
  preset: frnace
  hours: {mon: ["9:00-17:00"], defaultZone: Mars/Olympus}
  retries: {maxAttempts: 0, outcomes: [ringing]}
  voicemail: {action: leave_message}
  cap: {count: 1, windowSeconds: 7862400}
---
apiVersion: agentstudio.io/v1alpha1
kind: CallPolicy
metadata: {name: templated}
spec:
  voicemail: {action: leave_message, message: "Hi {{ secret }}"}
"""
    referring = AGENTS.replace("callPolicy: france-only", "callPolicy: patiant")
    out = "\n".join(validate(tmp_path, **{"policies.yaml": bad, "agents.yaml": referring, "more.yaml": POLICIES.split("---")[2]}))
    policies = tmp_path / "policies.yaml"
    for expected in [
        f"{policies} (document 1) CallPolicy/broken spec.preset: ",
        "'frnace' is not a preset",
        f"{policies} (document 1) CallPolicy/broken spec.hours.mon[0]: ",
        f"{policies} (document 1) CallPolicy/broken spec.hours.defaultZone: ",
        f"{policies} (document 1) CallPolicy/broken spec.retries.maxAttempts: ",
        f"{policies} (document 1) CallPolicy/broken spec.retries.outcomes[0]: ",
        f"{policies} (document 1) CallPolicy/broken spec.voicemail: ",
        "leave_message needs message",
        # 91 days: longer than the frequency bucket keeps a number's placements
        f"{policies} (document 1) CallPolicy/broken spec.cap.windowSeconds: Input should be less than or equal to 7776000",
        f"{policies} (document 2) CallPolicy/templated spec.voicemail.message: unknown template variable 'secret'",
        f"{tmp_path / 'agents.yaml'} (document 3) Workflow/renewals spec.callPolicy: CallPolicy 'patiant' does not exist; did you mean 'patient'?",
    ]:
        assert expected in out, f"{expected!r} not in:\n{out}"
