"""Prometheus metrics of the voice agent, one registry per runtime (tests run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class VoiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.active = Gauge("agentstudio_conversations_active", "Conversations in progress.", registry=self.registry)
        self.ended = Counter("agentstudio_conversations_ended", "Conversations ended, by reason.", ["end_reason"],
                             registry=self.registry)
        self.refused = Counter("agentstudio_relay_refused", "Relay WebSockets closed before a conversation.",
                               registry=self.registry)
        # The callee waits this long for the first word of each reply: the model's latency plus ours.
        self.first_token = Histogram(
            "agentstudio_model_first_token_seconds", "From a model request to its first text token.",
            buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10), registry=self.registry,
        )
        self.tool_calls = Counter("agentstudio_tool_calls", "Tool calls, by action type and outcome.",
                                  ["type", "outcome"], registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
