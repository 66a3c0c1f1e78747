"""The one settings object: environment variables prefixed AGENTSTUDIO_ (e.g. AGENTSTUDIO_NATS_URL)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AGENTSTUDIO_", frozen=True)

    nats_url: str = Field("nats://127.0.0.1:4222", description="NATS servers, comma-separated.")
    log_level: str = "INFO"
    host: str = "0.0.0.0"
    port: int = 8080
    max_body_bytes: int = Field(64 * 1024, description="Larger ingest bodies get 413.")
    publish_timeout_seconds: float = Field(2.0, description="How long ingest waits for the JetStream ack.")
    retry_after_seconds: int = Field(5, description="Retry-After sent with 503.")
    rate_limit_lease_divisor: int = Field(
        50, description="Each ingest process leases limit/divisor requests at a time from the shared counter."
    )
    operator_namespaces: str = Field("", description="Namespaces the operator serves, comma-separated; all if empty.")
    operator_liveness_endpoint: str = Field("", description="e.g. http://0.0.0.0:8081/healthz")
    usage_flush_seconds: float = Field(5.0, description="How often ingest adds its key usage counts to NATS.")
