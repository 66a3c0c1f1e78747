"""The config bundle: one tenant's resources compiled into the immutable form ingest and dialers load.

The compiler does every check that spans resources (a Workflow naming a missing Agent, templates that
do not parse, duplicate slugs); a bundle with errors is never produced, so a bad change can never
replace a good bundle. Warnings (a template reading a user variable the workflow's userContextSchema
does not declare) never block a bundle. API keys enter only as SHA-256 digests.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from typing import Annotated, Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, PlainValidator, PrivateAttr

from agentstudio import platforms, templating
from agentstudio.calling_hours.presets import STORED
from agentstudio.json_schema import schema_problem
from agentstudio.manifests import Located, Problem, Rejected, did_you_mean
from agentstudio.platforms import DEFAULT_SUCCESS_STATUS, SuccessStatus
from agentstudio.resources import (
    DEFAULT_POLICY_NAME,
    Agent,
    AgentSpec,
    ApiKey,
    CallPolicy,
    CallPolicySpec,
    Mode,
    Scope,
    SubscriptionFilters,
    WebhookSubscription,
    Workflow,
    HandoffRule,
    SecretKeyRef,
    webhook_secret_ref,
)

SCHEMA_VERSION = 1


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# An agent's spec is held as its JSON and parsed when read, the last PARSED_SPECS kept (by content, so
# an agent unchanged across versions is parsed once): ingest reads no spec, a dialer only its calls'
# agents, and 1,000 agents with prompts of 2-4 KB held 17.5 MiB parsed against 4.7 MiB of JSON.
# A conversation reads its agent's spec on every turn, so more agents than a dialer has conversations
# under way at once; with prompts of 2-4 KB (18 KiB a parsed spec) 1,024 of them hold 18 MiB at most.
PARSED_SPECS = 1024


def _spec_json(value: Any) -> bytes:
    """An agent's spec checked as an AgentSpec, kept as JSON: a body with an invalid agent is still
    refused when it is read, not when a call first reaches the agent."""
    spec = value if isinstance(value, AgentSpec) else AgentSpec.model_validate(value)
    # Not orjson.dumps: its bytes keep the whole buffer it wrote into (32 KiB for a 5 KB spec).
    return spec.model_dump_json().encode()


@lru_cache(maxsize=PARSED_SPECS)
def _parsed(spec_json: bytes) -> AgentSpec:
    return AgentSpec.model_validate_json(spec_json)


class CompiledAgent(Frozen):
    # The body names the spec `spec`, as when it was a parsed field (readers of either kind agree).
    model_config = ConfigDict(frozen=True, extra="forbid", serialize_by_alias=True)

    name: str
    slug: str
    spec_json: Annotated[bytes, PlainValidator(_spec_json), PlainSerializer(orjson.loads)] = Field(alias="spec")
    # Read by ingest on every call (its CallPolicy), so not parsed for it.
    _call_policy: str | None = PrivateAttr(default=None)

    def model_post_init(self, context: Any) -> None:
        self._call_policy = orjson.loads(self.spec_json).get("call_policy")

    @property
    def spec(self) -> AgentSpec:
        return _parsed(self.spec_json)

    @property
    def call_policy(self) -> str | None:
        return self._call_policy


class CompiledWorkflow(Frozen):
    name: str
    slug: str
    entry_agent: str
    agents: list[str]
    handoffs: list[HandoffRule]
    shared_context: dict[str, str]
    user_context_schema: dict[str, Any] | None
    paused: bool = False
    call_policy: str | None = None


class KeyEntry(Frozen):
    """What ingest knows about one key: never the key itself."""

    name: str  # the ApiKey resource; rate limits and idempotency are per ApiKey
    scopes: list[Scope]
    mode: Mode
    rate_limit_per_minute: int
    platform: str | None = None
    # How the platform writes an attribute the profile lacks; such values count as absent at ingest.
    unfilled: re.Pattern[str] | None = None
    success_status: SuccessStatus = DEFAULT_SUCCESS_STATUS  # of an accepted call
    disabled: bool = False
    not_after: datetime | None = None  # expiresAt, or the end of a rotation's grace period
    hint: str | None = None  # what people may see of the key (keys.hint), for the console
    created_at: datetime | None = None


class CompiledSubscription(Frozen):
    name: str
    url: str
    events: list[str]
    filters: SubscriptionFilters
    secret_ref: SecretKeyRef  # where the whsec_ signing secret is (never the secret itself)
    disabled: bool


class Bundle(Frozen):
    """One tenant's compiled configuration at one version."""

    schema_version: int = SCHEMA_VERSION
    tenant: str
    version: int = 0  # the KV revision it was stored at; set by bundle_store, not by the compiler
    digest: str = ""
    compiled_at: datetime
    agents: dict[str, CompiledAgent] = Field(default_factory=dict)
    workflows: dict[str, CompiledWorkflow] = Field(default_factory=dict)
    keys: dict[str, KeyEntry] = Field(default_factory=dict)  # sha256 hex → entry
    subscriptions: list[CompiledSubscription] = Field(default_factory=list)
    policies: dict[str, CallPolicySpec] = Field(default_factory=dict)  # CallPolicy name → spec
    # The tenant's plan: calls of it placed at once across all dialers (the operator's release value
    # calls.maxConcurrentPerTenant); None: each dialer's own setting.
    max_concurrent_calls: int | None = None
    # The tenant's pace: calls placed per second across all dialers (the release's
    # calls.callsPerSecondPerTenant, its Twilio account's CPS); None: each dialer's own setting.
    calls_per_second: float | None = None

    def policy_for(self, workflow_slug: str | None, agent_slug: str | None) -> CallPolicySpec | None:
        """The CallPolicy of a call: its workflow's, else its entry agent's, else the namespace's
        `default`; None when there is none (the call is placed at any hour, once)."""
        name = self.policy_name_for(workflow_slug, agent_slug)
        return self.policies[name] if name is not None else None

    def policy_name_for(self, workflow_slug: str | None, agent_slug: str | None) -> str | None:
        """The name of the CallPolicy `policy_for` gives (for messages that must name it)."""
        workflow = self.workflows.get(workflow_slug) if workflow_slug else None
        entry = self.agents.get(self.entry_slug(workflow_slug, agent_slug) or "")
        name = (workflow.call_policy if workflow else None) or (entry.call_policy if entry else None)
        name = name or DEFAULT_POLICY_NAME
        return name if name in self.policies else None

    def entry_slug(self, workflow_slug: str | None, agent_slug: str | None) -> str | None:
        """The agent a call starts with: its workflow's entry agent, else the agent it names."""
        workflow = self.workflows.get(workflow_slug) if workflow_slug else None
        return workflow.entry_agent if workflow else agent_slug

    def content_digest(self) -> str:
        """Digest of what the bundle says, independent of version and compile time."""
        body = self.model_dump(mode="json", exclude={"version", "digest", "compiled_at"})
        return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json"))

    @classmethod
    def from_bytes(cls, data: bytes) -> Bundle:
        return cls.model_validate_json(data, context={STORED: True})


@dataclass(frozen=True)
class KeyMaterial:
    """The digest of one valid key of an ApiKey, with when it stops being valid (rotation)."""

    digest: str
    not_after: datetime | None = None
    hint: str | None = None
    created_at: datetime | None = None


@dataclass
class CompileResult:
    bundle: Bundle | None
    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)


def compile_bundle(
    tenant: str,
    resources: list[Located],
    key_material: dict[str, list[KeyMaterial]],
    rejected: Sequence[Rejected] = (),
    max_concurrent_calls: int | None = None,
    calls_per_second: float | None = None,
) -> CompileResult:
    """Compile one tenant's resources. `key_material` maps ApiKey name → digests of its valid keys.

    `rejected` are the tenant's documents that did not parse (their errors are the caller's): their
    templates and the agents they name are still checked, so one pass reports every error, and a
    reference to a rejected agent says it is invalid rather than missing.
    """
    errors: list[Problem] = []
    warnings: list[Problem] = []
    by_kind: dict[str, list[Located]] = {}
    named: set[tuple[str, str]] = set()
    for item in resources:
        by_kind.setdefault(item.resource.kind, []).append(item)
        _check_unique_name(item, named, errors)

    # The manifest form (camelCase) of every Agent and Workflow spec, parsed or not: the checks below
    # read it, so a rejected document is checked the same way.
    specs: list[tuple[Located | Rejected, dict[str, Any]]] = [
        (item, item.resource.spec.model_dump(by_alias=True)) for item in resources  # type: ignore[union-attr]
        if item.resource.kind in ("Agent", "Workflow")
    ] + [(r, r.spec) for r in rejected if r.kind in ("Agent", "Workflow")]
    agent_specs = [(item, spec) for item, spec in specs if _kind(item) == "Agent"]
    invalid = {r.slug: r for r in rejected if r.kind == "Agent"}

    agents: dict[str, CompiledAgent] = {}
    for item in by_kind.get("Agent", []):
        agent: Agent = item.resource  # type: ignore[assignment]
        if _claim_slug(agent.slug, agents, item, errors):
            agents[agent.slug] = CompiledAgent(name=agent.name, slug=agent.slug, spec=agent.spec)
        errors += _schema_problems(agent, item)
    for located_or_rejected, spec in agent_specs:
        errors += _template_problems(located_or_rejected, spec)

    for located_or_rejected, spec in specs:
        if _kind(located_or_rejected) == "Workflow":
            errors += _workflow_problems(spec, located_or_rejected, agents, invalid)
    workflows: dict[str, CompiledWorkflow] = {}
    for item in by_kind.get("Workflow", []):
        wf: Workflow = item.resource  # type: ignore[assignment]
        if _claim_slug(wf.slug, workflows, item, errors):
            workflows[wf.slug] = CompiledWorkflow(
                name=wf.name,
                slug=wf.slug,
                entry_agent=wf.spec.entry_agent,
                agents=wf.spec.agent_slugs(),
                handoffs=wf.spec.handoffs,
                shared_context=wf.spec.shared_context,
                user_context_schema=wf.spec.user_context_schema,
                paused=wf.spec.paused,
                call_policy=wf.spec.call_policy,
            )

    for located_or_rejected, spec in agent_specs:
        for i, tool in enumerate(_items(spec.get("tools"))):
            action = tool.get("action") if isinstance(tool, dict) else None
            if isinstance(action, dict) and action.get("type") == "handoff" and isinstance(action.get("agent"), str):
                problem = _agent_problem(located_or_rejected, f"spec.tools[{i}].action.agent", action["agent"], agents, invalid)
                errors += [problem] if problem else []
    warnings += _undeclared_user_variables(
        [(item, spec) for item, spec in agent_specs if isinstance(item, Located)], by_kind.get("Workflow", [])
    )

    keys: dict[str, KeyEntry] = {}
    for item in by_kind.get("ApiKey", []):
        ak: ApiKey = item.resource  # type: ignore[assignment]
        for material in key_material.get(ak.name, []):
            not_after = min(
                (t for t in (ak.spec.expires_at, material.not_after) if t is not None), default=None
            )
            keys[material.digest] = KeyEntry(
                name=ak.name,
                scopes=list(ak.spec.scopes),
                mode=ak.spec.mode,
                rate_limit_per_minute=ak.spec.effective_rate_limit(),
                platform=ak.spec.platform,
                unfilled=platforms.unfilled(ak.spec.platform),
                success_status=platforms.success_status(ak.spec.platform, ak.spec.success_status),
                disabled=ak.spec.disabled,
                not_after=not_after,
                hint=material.hint,
                created_at=material.created_at,
            )

    subscriptions = [
        CompiledSubscription(
            name=sub.name,
            url=sub.spec.url,
            events=list(sub.spec.events),
            filters=sub.spec.filters,
            secret_ref=webhook_secret_ref(sub.name, sub.spec),
            disabled=sub.spec.disabled,
        )
        for sub in (i.resource for i in by_kind.get("WebhookSubscription", []))
        if isinstance(sub, WebhookSubscription)
    ]

    policies: dict[str, CallPolicySpec] = {}
    for item in by_kind.get("CallPolicy", []):
        policy: CallPolicy = item.resource  # type: ignore[assignment]
        policies[policy.name] = policy.spec
        if policy.spec.voicemail is not None and policy.spec.voicemail.message is not None:
            errors += [
                _at(item, "spec.voicemail.message", p.message + (f" (line {p.line})" if p.line else ""), "InvalidTemplate")
                for p in templating.check(policy.spec.voicemail.message, templating.PROMPT_ROOTS)
            ]
    for located_or_rejected, spec in specs:
        name = spec.get("callPolicy")
        if isinstance(name, str) and name not in policies:
            message = f"CallPolicy {name!r} does not exist{did_you_mean(name, policies)}"
            errors.append(_at(located_or_rejected, "spec.callPolicy", message, "CallPolicyNotFound"))

    if errors:
        return CompileResult(None, errors, warnings)
    bundle = Bundle(
        tenant=tenant,
        compiled_at=datetime.now(timezone.utc),
        agents=agents,
        workflows=workflows,
        keys=keys,
        subscriptions=subscriptions,
        policies=policies,
        max_concurrent_calls=max_concurrent_calls,
        calls_per_second=calls_per_second,
    )
    return CompileResult(bundle.model_copy(update={"digest": bundle.content_digest()}), errors, warnings)


def _at(item: Located | Rejected, path: str, message: str, reason: str = "Invalid") -> Problem:
    return Problem(item.source, path, message, item.index, reason)


def _kind(item: Located | Rejected) -> str:
    return item.resource.kind if isinstance(item, Located) else item.kind


def _items(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _agent_problem(
    item: Located | Rejected, path: str, slug: str, agents: dict[str, CompiledAgent], invalid: dict[str, Rejected]
) -> Problem | None:
    """What is wrong with naming agent `slug`, if anything: it is invalid, or it does not exist."""
    if slug in agents:
        return None
    if (bad := invalid.get(slug)) is not None:
        first = bad.problems[0]
        more = f" (and {len(bad.problems) - 1} more)" if len(bad.problems) > 1 else ""
        at = f"{first.path}: " if first.path else ""
        return _at(item, path, f"agent {slug!r} is invalid: {at}{first.message}{more}", "AgentInvalid")
    return _at(item, path, f"agent {slug!r} does not exist{did_you_mean(slug, [*agents, *invalid])}", "AgentNotFound")


def _check_unique_name(item: Located, named: set[tuple[str, str]], errors: list[Problem]) -> None:
    """The second and later resource of a kind with one name is an error; `named` holds the
    (kind, name) pairs seen so far, so a namespace of thousands is checked in one pass."""
    key = (item.resource.kind, item.resource.name)
    if key not in named:
        named.add(key)
    else:
        errors.append(_at(item, "metadata.name", f"another {item.resource.kind} is named {item.resource.name!r}", "DuplicateName"))


def _claim_slug(slug: str, taken: dict[str, Any], item: Located, errors: list[Problem]) -> bool:
    if slug in taken:
        errors.append(_at(item, "spec.slug", f"slug {slug!r} is already used by {taken[slug].name!r}", "DuplicateSlug"))
        return False
    return True


def _agent_templates(spec: dict[str, Any]) -> list[tuple[str, str, frozenset[str]]]:
    """(manifest path, template source, allowed roots) of every template in an agent's spec (manifest
    form; a rejected document may hold anything, so what is not a string is not a template)."""
    templates: list[tuple[str, str, frozenset[str]]] = [
        (f"spec.{key}", spec[key], templating.PROMPT_ROOTS)
        for key in ("prompt", "firstMessage")
        if isinstance(spec.get(key), str)
    ]
    for i, tool in enumerate(_items(spec.get("tools"))):
        action = tool.get("action") if isinstance(tool, dict) else None
        if not isinstance(action, dict):
            continue
        base = f"spec.tools[{i}].action"
        if isinstance(action.get("url"), str):
            templates.append((f"{base}.url", action["url"], templating.TOOL_ROOTS))
        headers = action.get("headers")
        if isinstance(headers, dict):
            templates += [(f"{base}.headers.{k}", v, templating.TOOL_ROOTS) for k, v in headers.items() if isinstance(v, str)]
        templates += [(f"{base}.body", s, templating.TOOL_ROOTS) for s in templating.json_strings(action.get("body"))]
    return templates


def _schema_problems(agent: Agent, item: Located) -> list[Problem]:
    return [
        _at(item, f"spec.tools[{i}].parameters", f"not a valid JSON Schema: {why}", "InvalidSchema")
        for i, tool in enumerate(agent.spec.tools)
        if (why := schema_problem(tool.parameters)) is not None
    ]


def _template_problems(item: Located | Rejected, spec: dict[str, Any]) -> list[Problem]:
    return [
        _at(item, path, problem.message + (f" (line {problem.line})" if problem.line else ""), "InvalidTemplate")
        for path, source, roots in _agent_templates(spec)
        for problem in templating.check(source, roots)
    ]


def _declared_user_keys(schema: dict[str, Any] | None) -> frozenset[str] | None:
    """The user_context keys a userContextSchema names; None when it does not limit them."""
    if not schema or not isinstance(schema.get("properties"), dict):
        return None
    # An explicit additionalProperties (true or a schema) or patternProperties says other keys are
    # expected too, so a name missing from `properties` is no sign of a typo.
    if schema.get("additionalProperties", False) is not False or schema.get("patternProperties"):
        return None
    return frozenset(schema["properties"])


def _undeclared_user_variables(
    agent_items: list[tuple[Located, dict[str, Any]]], workflow_items: list[Located]
) -> list[Problem]:
    """Warn where an agent's template reads user.X and a workflow it serves does not declare X.

    The schema promises nothing about an undeclared key, and a missing variable renders as an empty
    string: the model would read "started their trial on ." and nobody would notice.
    """
    by_slug: dict[str, Located] = {}
    for item, _ in agent_items:
        by_slug.setdefault(item.resource.slug, item)  # a duplicate slug is an error already
    serving: dict[tuple[str, int | None], list[tuple[str, frozenset[str]]]] = {}  # agent → (workflow, keys)
    for wf_item in sorted(workflow_items, key=lambda w: w.resource.name):
        wf: Workflow = wf_item.resource  # type: ignore[assignment]
        declared = _declared_user_keys(wf.spec.user_context_schema)
        if declared is None:
            continue
        for slug in wf.spec.agent_slugs():
            if (agent_item := by_slug.get(slug)) is not None:
                serving.setdefault((agent_item.source, agent_item.index), []).append((wf.name, declared))

    warnings: list[Problem] = []
    for item, spec in agent_items:
        workflows = serving.get((item.source, item.index), [])
        seen: set[tuple[str, str, str]] = set()  # every string of a tool body shares one path
        for path, source, roots in _agent_templates(spec):
            if templating.check(source, roots):
                continue  # already an error
            # user_id is the request's own field, not a user_context key
            names = {p[1] for p in templating.variable_paths(source) if len(p) > 1 and p[0] == "user"} - {"user_id"}
            for name in sorted(names):
                for wf_name, declared in workflows:
                    if name in declared or (path, name, wf_name) in seen:
                        continue
                    seen.add((path, name, wf_name))
                    message = (
                        f"user.{name} is not declared in workflow {wf_name}'s userContextSchema; "
                        "it renders as an empty string when a campaign does not send it"
                    )
                    warnings.append(_at(item, path, message, "UndeclaredVariable"))
    return warnings


def _workflow_problems(
    spec: dict[str, Any], item: Located | Rejected, agents: dict[str, CompiledAgent], invalid: dict[str, Rejected]
) -> list[Problem]:
    """A workflow's references to agents (manifest form, so a rejected workflow is checked too)."""
    named = [("spec.entryAgent", spec.get("entryAgent"))]
    named += [(f"spec.agents[{i}]", slug) for i, slug in enumerate(_items(spec.get("agents")))]
    named = [(path, slug) for path, slug in named if isinstance(slug, str)]
    problems = [p for path, slug in named if (p := _agent_problem(item, path, slug, agents, invalid)) is not None]
    members = {slug for _, slug in named}
    for i, rule in enumerate(_items(spec.get("handoffs"))):
        for side in ("from", "to"):
            slug = rule.get(side) if isinstance(rule, dict) else None
            if isinstance(slug, str) and slug not in members:
                message = f"agent {slug!r} is not one of the workflow's agents{did_you_mean(slug, members)}"
                problems.append(_at(item, f"spec.handoffs[{i}].{side}", message, "InvalidHandoff"))
    schema = spec.get("userContextSchema")
    if isinstance(schema, dict) and (why := schema_problem(schema)):
        problems.append(_at(item, "spec.userContextSchema", f"not a valid JSON Schema: {why}", "InvalidSchema"))
    return problems
