"""The five custom resources (Agent, Workflow, ApiKey, WebhookSubscription, CallPolicy) as pydantic models.

These models are the single source of truth: `agent-studio crds` generates `crds/*.yaml` from them,
`agent-studio validate` and the operator parse manifests with them, and the bundle compiler reads them.
Field names are camelCase on the wire (Kubernetes convention) and snake_case in Python.
"""

from __future__ import annotations

import re

from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from agentstudio.calling_hours import CallingRules

GROUP = "agentstudio.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

SLUG_PATTERN = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
TOOL_NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"
E164_PATTERN = r"^\+[1-9][0-9]{6,14}$"
HEADER_NAME_PATTERN = r"^[A-Za-z0-9-]{1,128}$"
K8S_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# The patterns in words, for messages: a raw regular expression is no help to someone fixing a manifest.
PATTERN_MEANINGS = {
    SLUG_PATTERN: "lowercase letters, digits and dashes, starting and ending with a letter or digit",
    TOOL_NAME_PATTERN: "letters, digits, '_' and '-' (at most 64)",
    E164_PATTERN: "a phone number in E.164 form, such as +14155550123",
    HEADER_NAME_PATTERN: "letters, digits and dashes (at most 128)",
    K8S_NAME_PATTERN: "lowercase letters, digits, '-' and '.', starting and ending with a letter or digit",
}

# The API server quotes a failed `pattern` as the raw expression; the CEL rule beside it adds the words.
Slug = Annotated[
    str,
    Field(
        pattern=SLUG_PATTERN,
        max_length=63,
        json_schema_extra={"x-kubernetes-validations": [
            {"rule": f"self.matches('{SLUG_PATTERN}')", "message": f"must be {PATTERN_MEANINGS[SLUG_PATTERN]}"}
        ]},
    ),
]

Template = Annotated[str, Field(max_length=32768)]
# Free-form JSON (JSON Schemas, request bodies): Kubernetes keeps it as given.
FreeObject = Annotated[
    dict[str, Any],
    Field(json_schema_extra={"type": "object", "x-kubernetes-preserve-unknown-fields": True}),
]

SCOPES = ("calls:create", "calls:read", "webhooks:manage", "dnc:manage")
Scope = Literal["calls:create", "calls:read", "webhooks:manage", "dnc:manage"]
EVENT_TYPES = (
    "call.answered",
    "call.completed",
    "call.failed",
    "call.no_answer",
    "call.busy",
    "call.canceled",
)
EventType = Literal[
    "call.*",
    "call.answered",
    "call.completed",
    "call.failed",
    "call.no_answer",
    "call.busy",
    "call.canceled",
]
Mode = Literal["live", "test"]
DEFAULT_RATE_LIMIT = {"live": 600, "test": 60}


class Model(BaseModel):
    """Strict camelCase model: unknown fields are errors, so typos in manifests are caught."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class SecretKeyRef(Model):
    """A key inside a Secret of the same namespace."""

    name: Annotated[str, Field(pattern=K8S_NAME_PATTERN, max_length=253, description="Secret name.")]
    key: Annotated[str, Field(max_length=253, description="Key inside the Secret's data.")] = "key"


# --- Agent ---------------------------------------------------------------------------------


class Voice(Model):
    """Speech settings passed to Twilio ConversationRelay."""

    tts_provider: Annotated[
        Literal["Google", "Amazon", "ElevenLabs"], Field(description="Text-to-speech provider.")
    ] = "ElevenLabs"
    voice: Annotated[
        str | None, Field(max_length=128, description="Provider voice id; provider default if unset.")
    ] = None
    transcription_provider: Annotated[
        Literal["Google", "Deepgram"], Field(description="Speech-to-text provider.")
    ] = "Deepgram"


class Llm(Model):
    """An OpenAI-compatible chat-completions endpoint."""

    base_url: Annotated[
        str, Field(pattern=r"^https?://", max_length=2048, description="Base URL, e.g. https://api.openai.com/v1.")
    ] = "https://api.openai.com/v1"
    model: Annotated[str, Field(min_length=1, max_length=256, description="Model name.")] = "gpt-4o-mini"
    api_key_secret_ref: Annotated[
        SecretKeyRef | None, Field(description="Secret holding the endpoint's API key.")
    ] = None
    temperature: Annotated[float, Field(ge=0, le=2, description="Sampling temperature.")] = 0.3
    max_tokens: Annotated[int, Field(ge=1, le=32768, description="Upper bound on one reply.")] = 512


class HeaderFromSecret(Model):
    """An HTTP header whose value comes from a Secret (never written in the manifest)."""

    name: Annotated[str, Field(pattern=HEADER_NAME_PATTERN, description="Header name.")]
    secret_key_ref: SecretKeyRef


class ToolAction(Model):
    """What happens when the model calls the tool. `type` selects which other fields apply."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "self.type != 'api_call' || has(self.url)", "message": "api_call needs url"},
                {"rule": "self.type != 'handoff' || has(self.agent)", "message": "handoff needs agent"},
                {
                    "rule": "self.type != 'transfer' || has(self.phoneNumber)",
                    "message": "transfer needs phoneNumber",
                },
            ]
        }
    )

    type: Annotated[
        Literal["api_call", "capture", "end_call", "handoff", "transfer", "opt_out"],
        Field(
            description="api_call: send an HTTP request; capture: store the arguments in the call "
            "record; end_call: hang up after the last words; handoff: pass the call to another agent "
            "of the workflow; transfer: connect the callee to a human number; opt_out: put the "
            "callee's number on the tenant's do-not-call list (the conversation goes on to a polite end)."
        ),
    ]
    method: Annotated[
        Literal["GET", "POST", "PUT", "PATCH", "DELETE"], Field(description="api_call: HTTP method.")
    ] = "POST"
    url: Annotated[Template | None, Field(description="api_call: URL template.")] = None
    headers: Annotated[
        dict[str, Template], Field(description="api_call: header templates.")
    ] = Field(default_factory=dict)
    headers_from_secrets: Annotated[
        list[HeaderFromSecret], Field(max_length=16, description="api_call: headers from Secrets.")
    ] = Field(default_factory=list)
    body: Annotated[
        Any,
        Field(
            description="api_call: JSON body; every string in it is a template rendered value by value.",
            json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
        ),
    ] = None
    timeout_seconds: Annotated[float, Field(gt=0, le=30, description="api_call: request timeout.")] = 10
    agent: Annotated[Slug | None, Field(description="handoff: slug of the agent to hand over to.")] = None
    phone_number: Annotated[
        str | None, Field(pattern=E164_PATTERN, description="transfer: E.164 number to connect.")
    ] = None

    @model_validator(mode="after")
    def _fields_for_type(self) -> ToolAction:
        if self.type == "api_call" and not self.url:
            raise ValueError("api_call needs url")
        if self.type == "handoff" and not self.agent:
            raise ValueError("handoff needs agent")
        if self.type == "transfer" and not self.phone_number:
            raise ValueError("transfer needs phoneNumber")
        # The CRD cannot constrain a map's keys (no propertyNames), so a header name the HTTP client
        # would refuse on the call is refused here, at validate and operator compile time.
        bad = sorted(name for name in self.headers if not re.fullmatch(HEADER_NAME_PATTERN, name))
        if bad:
            raise ValueError(f"headers: {bad[0]!r} is not a header name: must be {PATTERN_MEANINGS[HEADER_NAME_PATTERN]}")
        return self


class Tool(Model):
    """A function the model may call during the conversation."""

    name: Annotated[str, Field(pattern=TOOL_NAME_PATTERN, description="Function name shown to the model.")]
    description: Annotated[str, Field(max_length=4096, description="When the model should call it.")] = ""
    parameters: Annotated[
        FreeObject, Field(description="JSON Schema of the arguments; capture validates against it.")
    ] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    action: ToolAction


class AgentSpec(Model):
    slug: Annotated[Slug | None, Field(description="Slug used by callers; defaults to metadata.name.")] = None
    description: Annotated[str, Field(max_length=4096, description="For people; not sent to the model.")] = ""
    prompt: Annotated[
        Template,
        Field(min_length=1, description="System prompt: a template over user.*, context.*, metadata.*."),
    ]
    first_message: Annotated[
        Template | None, Field(description="Spoken when the callee answers; a template like prompt.")
    ] = None
    language: Annotated[
        str, Field(pattern=r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})*$", description="BCP-47 language.")
    ] = "en-US"
    voice: Voice = Field(default_factory=Voice)
    llm: Llm = Field(default_factory=Llm)
    tools: Annotated[list[Tool], Field(max_length=64, description="Tools the model may call.")] = Field(
        default_factory=list
    )
    max_duration_seconds: Annotated[
        int,
        # The schema cannot see the deployment's Twilio account; the runtime caps by the setting.
        Field(ge=30, le=14400, description="The call ends politely after this long "
              "(at most AGENTSTUDIO_MAX_CALL_SECONDS, by default 4 h less a minute)."),
    ] = 600
    silence_timeout_seconds: Annotated[
        int, Field(ge=3, le=120, description="Seconds of callee silence before the agent checks in or ends.")
    ] = 15
    call_policy: Annotated[
        Slug | None,
        Field(description="Name of the CallPolicy for calls that start with this agent (a workflow's own "
                          "callPolicy comes first); unset: the namespace's CallPolicy named default, if any."),
    ] = None
    allowed_hosts: Annotated[
        list[Annotated[str, Field(max_length=253)]],
        Field(
            max_length=64,
            description="Hosts api_call may reach even when they resolve to private or loopback addresses.",
        ),
    ] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_tool_names(self) -> AgentSpec:
        names = [t.name for t in self.tools]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate tool names: {', '.join(dupes)}")
        return self


# --- Workflow ------------------------------------------------------------------------------


class HandoffRule(Model):
    """When the conversation moves from one agent to another."""

    from_: Annotated[Slug, Field(alias="from", description="Agent handing over.")]
    to: Annotated[Slug, Field(description="Agent taking over.")]
    when: Annotated[
        str, Field(max_length=2048, description="Condition in plain words, given to the model.")
    ] = ""


RESERVED_CONTEXT_KEYS = ("phone_number", "call_id", "agent_slug", "workflow_slug")


class WorkflowSpec(Model):
    slug: Annotated[Slug | None, Field(description="Slug used by callers; defaults to metadata.name.")] = None
    description: Annotated[str, Field(max_length=4096)] = ""
    entry_agent: Annotated[Slug, Field(description="Slug of the agent that starts the call.")]
    agents: Annotated[
        list[Slug], Field(max_length=32, description="Other agents the call may be handed to.")
    ] = Field(default_factory=list)
    handoffs: Annotated[list[HandoffRule], Field(max_length=128)] = Field(default_factory=list)
    shared_context: Annotated[
        dict[str, Annotated[str, Field(max_length=4096)]],
        Field(description="Constant values every agent of the workflow reads as context.<key>."),
    ] = Field(default_factory=dict)
    user_context_schema: Annotated[
        FreeObject | None,
        Field(description="JSON Schema that ingest checks user_context against (400 naming the field)."),
    ] = None
    call_policy: Annotated[
        Slug | None,
        Field(description="Name of the CallPolicy for the workflow's calls; unset: its entry agent's, "
                          "else the namespace's CallPolicy named default, if any."),
    ] = None
    paused: Annotated[
        bool,
        Field(description="true: the workflow's queued calls wait in the queue undialed (nothing is lost); "
                          "false again: they are dialed within seconds."),
    ] = False

    @model_validator(mode="after")
    def _no_reserved_context(self) -> WorkflowSpec:
        clash = sorted(set(self.shared_context) & set(RESERVED_CONTEXT_KEYS))
        if clash:
            raise ValueError(f"sharedContext may not set reserved keys: {', '.join(clash)}")
        return self

    def agent_slugs(self) -> list[str]:
        return [self.entry_agent, *[a for a in self.agents if a != self.entry_agent]]


# --- ApiKey --------------------------------------------------------------------------------


class Rotation(Model):
    """Change `id` to issue a new key; the previous key keeps working for the grace period."""

    id: Annotated[str, Field(min_length=1, max_length=63, description="Any token; a new value rotates the key.")]
    grace_period_seconds: Annotated[
        int, Field(ge=0, le=30 * 86400, description="How long the previous key stays valid.")
    ] = 86400


class ApiKeySpec(Model):
    scopes: Annotated[
        list[Scope],
        Field(
            min_length=1,
            max_length=len(SCOPES),
            description="calls:create to trigger calls, calls:read to read them and export them, "
            "webhooks:manage to list and replay dead-lettered webhook deliveries, dnc:manage to change "
            "the do-not-call list (checking a number needs dnc:manage or calls:read).",
            json_schema_extra={"x-kubernetes-list-type": "set"},
        ),
    ]
    mode: Annotated[Mode, Field(description="test keys only ever use simulated telephony.")] = "live"
    platform: Annotated[
        str | None,
        Field(
            pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$",
            description="The sending platform: clevertap, moengage, braze, webengage, ... With clevertap "
            "or braze, the platform's form for an attribute the profile lacks ($Name, \"\") counts as absent; "
            "webengage's accepted calls are answered 200.",
        ),
    ] = None
    success_status: Annotated[
        Literal[200, 201] | None,
        Field(description="Status of an accepted call (same body); default 200 for webengage, else 201."),
    ] = None
    rate_limit_per_minute: Annotated[
        int | None, Field(ge=1, le=1_000_000, description="Requests per minute; default 600 live, 60 test.")
    ] = None
    expires_at: Annotated[datetime | None, Field(description="After this instant the key gets 401.")] = None
    disabled: Annotated[bool, Field(description="A disabled key gets 401.")] = False
    secret_ref: Annotated[
        SecretKeyRef | None,
        Field(description="Use this Secret's key (GitOps-managed) instead of generating one."),
    ] = None
    rotation: Annotated[
        Rotation | None, Field(description="Rotate the generated key (not used with secretRef).")
    ] = None

    @model_validator(mode="after")
    def _unique_scopes(self) -> ApiKeySpec:
        if len(set(self.scopes)) != len(self.scopes):
            raise ValueError("scopes must not repeat")
        return self

    def effective_rate_limit(self) -> int:
        return self.rate_limit_per_minute or DEFAULT_RATE_LIMIT[self.mode]


# --- WebhookSubscription -------------------------------------------------------------------


class SubscriptionFilters(Model):
    """Deliver only events of calls that match every filter given."""

    workflow_slugs: Annotated[list[Slug], Field(max_length=64)] = Field(default_factory=list)
    agent_slugs: Annotated[list[Slug], Field(max_length=64)] = Field(default_factory=list)
    metadata: Annotated[
        dict[str, Annotated[str, Field(max_length=1024)]],
        Field(description="metadata.<key> must equal the value."),
    ] = Field(default_factory=dict)
    mode: Annotated[Literal["live", "test", "any"], Field(description="Calls of live keys, test keys or both.")] = "any"


class WebhookSubscriptionSpec(Model):
    url: Annotated[str, Field(pattern=r"^https?://[^\s]+$", max_length=2048, description="Receiver URL.")]
    events: Annotated[
        list[EventType],
        Field(
            min_length=1,
            max_length=16,
            description="Event types; call.* for all.",
            json_schema_extra={"x-kubernetes-list-type": "set"},
        ),
    ]
    secret_ref: Annotated[
        SecretKeyRef | None, Field(description="Secret with the whsec_ signing secret; generated if unset.")
    ] = None
    filters: SubscriptionFilters = Field(default_factory=SubscriptionFilters)
    disabled: bool = False


WEBHOOK_SECRET_KEY = "secret"


def webhook_secret_ref(name: str, spec: WebhookSubscriptionSpec) -> SecretKeyRef:
    """Where a subscription's whsec_ signing secret lives: the referenced Secret, or the one the
    operator generates (`<subscription>-webhook-secret`, data `secret`)."""
    return spec.secret_ref or SecretKeyRef(name=f"{name}-webhook-secret", key=WEBHOOK_SECRET_KEY)


# --- CallPolicy ----------------------------------------------------------------------------

RetryOutcome = Literal["no_answer", "busy", "failed", "voicemail"]
DEFAULT_POLICY_NAME = "default"  # the namespace's policy for calls whose Workflow/Agent names none


class Retries(Model):
    """Attempts after an unanswered call; every attempt waits for the calling window."""

    max_attempts: Annotated[
        int, Field(ge=1, le=10, description="Attempts in all, the first included; 1 = never retry.")
    ] = 1
    # Not `on`: YAML 1.1 (PyYAML, many GitOps tools) reads an unquoted `on` key as the boolean true.
    outcomes: Annotated[
        list[RetryOutcome],
        Field(max_length=4, description="Outcomes that are retried: no_answer, busy, failed (the provider "
              "could not connect it), voicemail (a machine answered).",
              json_schema_extra={"x-kubernetes-list-type": "set"}),
    ] = Field(default_factory=lambda: ["no_answer", "busy"])
    delays_seconds: Annotated[
        list[Annotated[int, Field(ge=1, le=3 * 86400)]],
        Field(min_length=1, max_length=9, description="Wait before attempt 2, 3, ...; the last repeats. "
              "A retry due outside the calling window waits for its next opening."),
    ] = Field(default_factory=lambda: [1800])


class Voicemail(Model):
    """What to do when a machine answers (Twilio answering-machine detection)."""

    action: Annotated[
        Literal["hang_up", "leave_message"],
        Field(description="hang_up: end the call at once; leave_message: wait for the beep, speak "
              "`message`, hang up. Either way the outcome is `voicemail` (retried if retries.outcomes says so)."),
    ]
    message: Annotated[
        Template | None,
        Field(description="leave_message: what is said after the beep; a template like an agent's prompt."),
    ] = None

    @model_validator(mode="after")
    def _message_for_leave(self) -> Voicemail:
        if self.action == "leave_message" and not self.message:
            raise ValueError("leave_message needs message")
        return self


class CallPolicySpec(CallingRules):
    """When and how often a number may be called, and what happens when nobody (or a machine) answers.

    `preset`: the jurisdiction rules by name, `auto` (by the callee's number) or `none`; `hours`
    replaces the preset's hours and `cap` its frequency cap."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True,
        json_schema_extra={"x-kubernetes-validations": [
            {"rule": "!has(self.voicemail) || self.voicemail.action != 'leave_message' || has(self.voicemail.message)",
             "message": "voicemail: leave_message needs message"},
        ]},
    )

    description: Annotated[str, Field(max_length=4096)] = ""
    retries: Retries = Field(default_factory=Retries)
    voicemail: Annotated[
        Voicemail | None, Field(description="Unset: no answering-machine detection; whoever answers hears the agent.")
    ] = None


# --- Status and the resource envelope ------------------------------------------------------


class Condition(Model):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: Annotated[str, Field(pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$", max_length=1024)]
    message: Annotated[str, Field(max_length=32768)] = ""
    last_transition_time: datetime
    observed_generation: int | None = None


# What the API server fills in before the operator has written anything: the convention of Flux's
# own kinds. kstatus (Flux's health checks, `kpt live status`) reads an object with no status as
# Current, i.e. healthy; with observedGeneration -1 ≠ metadata.generation it reads InProgress.
UNOBSERVED_STATUS = {"observedGeneration": -1}


class Status(Model):
    """Written by the operator only, through the status subresource; conditions as kstatus reads them."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"default": UNOBSERVED_STATUS})

    observed_generation: Annotated[
        int, Field(description="metadata.generation the operator last reported on; -1 until it has.")
    ] = -1
    conditions: list[Condition] = Field(default_factory=list)


class ObjectMeta(BaseModel):
    """The parts of Kubernetes metadata we read; the rest is kept as given."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: Annotated[str, Field(pattern=K8S_NAME_PATTERN, max_length=253)]
    namespace: str | None = None
    generation: int | None = None
    uid: str | None = None


class LabelMeta(ObjectMeta):
    """Metadata of a kind whose name becomes one token of a NATS subject and a consumer's name (a
    WebhookSubscription's delivery queue): one DNS label, no dots, which would split the token."""

    name: Annotated[str, Field(pattern=SLUG_PATTERN, max_length=63)]


class Resource(BaseModel):
    """A namespaced agentstudio.io object: apiVersion, kind, metadata, spec, status."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    KIND: ClassVar[str]
    PLURAL: ClassVar[str]
    SHORT_NAMES: ClassVar[tuple[str, ...]]
    PRINTER_COLUMNS: ClassVar[tuple[dict[str, str], ...]]
    DESCRIPTION: ClassVar[str]
    ROOT_RULES: ClassVar[tuple[dict[str, str], ...]] = ()  # CEL rules on the whole object (its name)

    api_version: Annotated[Literal["agentstudio.io/v1alpha1"], Field(alias="apiVersion")]
    kind: str
    metadata: ObjectMeta
    status: Status | None = None

    @property
    def name(self) -> str:
        return self.metadata.name


READY = {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'}
REASON = {
    "name": "Reason",
    "type": "string",
    "jsonPath": '.status.conditions[?(@.type=="Ready")].reason',
    "priority": "1",
}
AGE = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}


class Agent(Resource):
    KIND = "Agent"
    PLURAL = "agents"
    SHORT_NAMES = ("agt",)
    DESCRIPTION = "A voice agent: prompt, first message, voice, model and tools."
    PRINTER_COLUMNS = (
        READY,
        {"name": "Slug", "type": "string", "jsonPath": ".status.slug"},
        {"name": "Model", "type": "string", "jsonPath": ".spec.llm.model"},
        REASON,
        AGE,
    )
    kind: Literal["Agent"]
    spec: AgentSpec

    @property
    def slug(self) -> str:
        return self.spec.slug or self.metadata.name


class Workflow(Resource):
    KIND = "Workflow"
    PLURAL = "workflows"
    SHORT_NAMES = ("wf",)
    DESCRIPTION = "Agents chained with handoff rules; a call starts at entryAgent."
    PRINTER_COLUMNS = (
        READY,
        {"name": "Slug", "type": "string", "jsonPath": ".status.slug"},
        {"name": "Entry", "type": "string", "jsonPath": ".spec.entryAgent"},
        REASON,
        AGE,
    )
    kind: Literal["Workflow"]
    spec: WorkflowSpec

    @property
    def slug(self) -> str:
        return self.spec.slug or self.metadata.name


class ApiKey(Resource):
    KIND = "ApiKey"
    PLURAL = "apikeys"
    SHORT_NAMES = ("ak",)
    DESCRIPTION = "An API key for ingest; the key itself lives in a Secret, only its hash leaves the operator."
    PRINTER_COLUMNS = (
        READY,
        {"name": "Mode", "type": "string", "jsonPath": ".spec.mode"},
        {"name": "Platform", "type": "string", "jsonPath": ".spec.platform"},
        {"name": "Key", "type": "string", "jsonPath": ".status.keyHint"},
        {"name": "Scopes", "type": "string", "jsonPath": ".spec.scopes", "priority": "1"},
        REASON,
        AGE,
    )
    kind: Literal["ApiKey"]
    spec: ApiKeySpec


class WebhookSubscription(Resource):
    KIND = "WebhookSubscription"
    PLURAL = "webhooksubscriptions"
    SHORT_NAMES = ("whs",)
    DESCRIPTION = "Where signed call status events are delivered."
    PRINTER_COLUMNS = (
        READY,
        {"name": "URL", "type": "string", "jsonPath": ".spec.url"},
        {"name": "Events", "type": "string", "jsonPath": ".spec.events", "priority": "1"},
        REASON,
        AGE,
    )
    ROOT_RULES = ({"rule": "self.metadata.name.matches('" + SLUG_PATTERN + "')",
                   "message": "metadata.name must be " + PATTERN_MEANINGS[SLUG_PATTERN]
                   + " (no dots: it names the subscription's delivery queue)"},)
    kind: Literal["WebhookSubscription"]
    metadata: LabelMeta
    spec: WebhookSubscriptionSpec


class CallPolicy(Resource):
    KIND = "CallPolicy"
    PLURAL = "callpolicies"
    SHORT_NAMES = ("cpol",)
    DESCRIPTION = ("Calling hours (in the callee's time zones), frequency cap, retries and voicemail; "
                   "the one named default applies to the namespace's calls that name none.")
    PRINTER_COLUMNS = (
        READY,
        {"name": "Preset", "type": "string", "jsonPath": ".spec.preset"},
        {"name": "Attempts", "type": "integer", "jsonPath": ".spec.retries.maxAttempts"},
        REASON,
        AGE,
    )
    kind: Literal["CallPolicy"]
    spec: CallPolicySpec


KINDS: dict[str, type[Resource]] = {
    k.KIND: k for k in (Agent, Workflow, ApiKey, WebhookSubscription, CallPolicy)
}
AnyResource = Agent | Workflow | ApiKey | WebhookSubscription | CallPolicy
