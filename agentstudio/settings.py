"""The one settings object: environment variables prefixed AGENTSTUDIO_ (e.g. AGENTSTUDIO_NATS_URL)."""

from __future__ import annotations

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "AGENTSTUDIO_"
# Twilio's TimeLimit ends a call this long after the agent's polite end, in case nothing else ends it.
TIME_LIMIT_BACKSTOP_SECONDS = 60


class InvalidSettings(ValueError):
    """Settings a role cannot run with; the message names the variables (never their values)."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True)

    nats_url: str = Field("nats://127.0.0.1:4222", description="NATS servers, comma-separated.")
    nats_user: str = Field("", description="NATS user (with NATS_PASSWORD): the chart's bundled NATS requires one.")
    nats_password: str = ""
    nats_credentials_file: str = Field("", description="A NATS .creds file (JWT and seed), for an external NATS.")
    nats_replicas: int = Field(
        0, ge=0, le=5, description="Copies of every stream and bucket we create; 0: 3 on a NATS cluster, 1 on one server."
    )
    log_level: str = "INFO"
    host: str = "0.0.0.0"
    port: int = 8080
    max_body_bytes: int = Field(64 * 1024, description="Larger ingest bodies get 413.")
    dnc_import_max_bytes: int = Field(
        64 * 1024 * 1024, description="Larger do-not-call CSV imports get 413 (64 MiB: about 4 million numbers)."
    )
    body_timeout_seconds: float = Field(
        30.0, gt=0, description="A request body not received whole within this of its headers gets 408 and the"
        " connection is closed (slow-loris)."
    )
    publish_timeout_seconds: float = Field(2.0, description="How long ingest waits for the JetStream ack.")
    retry_after_seconds: int = Field(5, description="Retry-After sent with 503.")
    rate_limit_lease_divisor: int = Field(
        50, description="Each ingest process leases limit/divisor requests at a time from the shared counter."
    )
    operator_namespaces: str = Field("", description="Namespaces the operator serves, comma-separated; all if empty.")
    operator_liveness_endpoint: str = Field("", description="e.g. http://0.0.0.0:8081/healthz")
    operator_metrics_port: int = Field(0, ge=0, le=65535, description="Port of the operator's /metrics; 0: not served.")
    metrics_refresh_seconds: float = Field(
        15.0, gt=0, description="How often gauges read from NATS (queue depth, concurrency slots) are refreshed."
    )
    usage_flush_seconds: float = Field(5.0, description="How often ingest adds its key usage counts to NATS.")
    calls_index_dir: str = Field(
        "", description="Where each ingest process keeps its calls table (about 1 KiB a call, rebuilt at"
        " start); the system's temporary folder if empty."
    )
    console_session_seconds: float = Field(
        8 * 3600, gt=0, description="How long a console sign-in lasts (its key's changes end it sooner)."
    )

    # Dialers and telephony
    telephony_provider: str = Field("simulated", description="twilio or simulated; test keys always simulate.")
    public_base_url: str = Field(
        "http://127.0.0.1:8080", description="How Twilio reaches ingest and the relay; https:// with twilio."
    )
    twilio_account_sid: str = ""
    twilio_auth_token: str = Field("", description="Also checks X-Twilio-Signature on status callbacks.")
    twilio_from_number: str = ""
    twilio_api_base_url: str = Field("", description="Override Twilio's API URL (tests: the validating mock).")
    # Twilio's Timeout: "the maximum is 600 seconds" (Calls resource, twilio_api_v2010.json).
    ring_timeout_seconds: int = Field(30, ge=1, le=600, description="How long a call rings before no_answer.")
    max_concurrent_calls_per_tenant: int = Field(10, description="Calls above it wait in the queue.")
    calls_per_second_per_tenant: float = Field(
        25, gt=0, description="The tenant's placements per second across all dialers (its Twilio account's CPS).")
    dispatch_max_attempts: int = Field(5, description="Attempts to place a call before it is dead-lettered.")
    dispatch_max_deliver: int = Field(10_000, description="Deliveries (waiting included) before dead-lettering.")
    dispatch_ack_wait_seconds: float = Field(60.0, description="Redelivery after a dialer dies holding a call.")
    dialer_lease_seconds: float = Field(
        15.0, gt=0, description="A dialer whose heartbeat has not changed for this long is gone: its claims are taken over."
    )
    cap_retry_seconds: float = Field(1.0, description="How soon a call held back by the cap is tried again.")
    dialer_max_in_flight: int = Field(64, description="Calls one dialer handles at once.")
    dialer_max_parked: int = Field(2000, description="Calls one dialer holds while their tenant is at its cap.")
    cap_poll_seconds: float = Field(0.1, description="How often a parked call looks for a free slot.")
    dialing_paused: bool = Field(False, description="Dial nothing: every queued call waits (the tenant-wide pause).")
    pause_recheck_seconds: float = Field(2.0, description="A paused call's first park; it doubles while the pause lasts.")
    stale_call_seconds: float = Field(
        6 * 3600, description="A placed call with no report for this long is failed as stale."
    )
    sweep_interval_seconds: float = Field(300, description="How often dialers look for stale calls.")
    reconcile_after_seconds: float = Field(
        120, description="A call's end not reported this long after it must have come: ask the provider."
    )
    webhook_retry_schedule: str = Field(
        "0,5,300,1800,7200,18000,36000,36000", description="Seconds before each retry of a failed delivery."
    )
    webhook_timeout_seconds: float = Field(10.0, description="Per delivery attempt.")
    llm_timeout_seconds: float = Field(30.0, description="Longest wait for a model's reply to stream.")
    api_call_max_response_bytes: int = Field(64 * 1024, description="api_call tools read at most this much.")
    speech_chars_per_second: float = Field(
        15.0, description="Speaking rate assumed to end a call after its last words and time silence."
    )
    max_call_seconds: float = Field(
        4 * 3600 - TIME_LIMIT_BACKSTOP_SECONDS, gt=0, description="Cap over every agent's maxDurationSeconds."
    )
    twilio_max_call_seconds: int = Field(
        4 * 3600, gt=0, description="The Twilio account's maximum call duration (Twilio's default: 4 h)."
    )
    webhook_secrets: str = Field("kubernetes", description="Where signing secrets are read: kubernetes or none.")
    trace_outbound: bool = Field(
        True, description="With tracing on, webhook deliveries, api_call tools and model requests carry the"
        " call's W3C traceparent; false keeps trace ids from those systems."
    )

    @model_validator(mode="after")
    def _twilio_can_honour(self) -> Settings:
        if self.telephony_provider != "twilio":
            return self
        if not self.public_base_url.startswith("https://"):
            # ConversationRelay only connects to wss:// (Twilio's ConversationRelay onboarding); our relay
            # URL is the public base's with http(s) swapped for ws(s).
            raise ValueError(f"{ENV_PREFIX}PUBLIC_BASE_URL must be https:// with the twilio provider: "
                             "ConversationRelay connects only to wss://")
        if self.max_call_seconds + TIME_LIMIT_BACKSTOP_SECONDS > self.twilio_max_call_seconds:
            raise ValueError(
                f"{ENV_PREFIX}MAX_CALL_SECONDS ({self.max_call_seconds:g}) plus the {TIME_LIMIT_BACKSTOP_SECONDS} s "
                f"TimeLimit backstop exceeds {ENV_PREFIX}TWILIO_MAX_CALL_SECONDS ({self.twilio_max_call_seconds}), "
                "the account's maximum call duration: Twilio would cut calls before the agent ends them")
        return self

    def nats_auth(self) -> dict[str, str]:
        """How this process proves itself to NATS: keyword arguments for `nats.connect`."""
        auth = {"user": self.nats_user, "password": self.nats_password} if self.nats_user else {}
        if self.nats_credentials_file:
            auth["user_credentials"] = self.nats_credentials_file
        return auth

    def retry_schedule(self) -> tuple[float, ...]:
        return tuple(float(x) for x in self.webhook_retry_schedule.split(",") if x.strip())


def from_environment() -> Settings:
    """The settings of a starting role, or InvalidSettings naming each bad variable (not its value,
    which may be a secret)."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            name = ENV_PREFIX + "_".join(str(part) for part in error["loc"]).upper()
            message = error["msg"].removeprefix("Value error, ")
            problems.append(f"{name}: {message}" if error["loc"] else message)
        raise InvalidSettings("; ".join(problems)) from None
