"""What a connection's NATS messages are for: every request, publish and ack of nats-py goes
through Client.publish, so wrapping it on one connection counts what that client sends, by subject.
A request (KV read or write, JetStream publish, fetch) is one round trip; an ack is one message
with no reply."""

from __future__ import annotations

from collections import Counter
from typing import Any

from agentstudio import bus, pacing

# What each NATS request of a dialer is for, by its subject (every request, publish and ack of
# nats-py goes through Client.publish). KV reads are direct gets; KV writes publish to $KV.<bucket>.
BUCKETS = {bus.CALLS_BUCKET: "call state", bus.CONCURRENCY_BUCKET: "concurrency slot", bus.DNC_BUCKET: "do-not-call",
           bus.FREQUENCY_BUCKET: "frequency cap", bus.DIALERS_BUCKET: "liveness", bus.USAGE_BUCKET: "usage",
           bus.BUNDLES_BUCKET: "bundle"}
ACKS = {b"": "ack", b"+ACK": "ack", b"-NAK": "nak", b"+WPI": "in progress", b"+TERM": "term"}
ONE_WAY = frozenset(ACKS.values())  # answered by nothing: messages, not round trips


def purpose(subject: str, payload: bytes) -> str:
    if subject.startswith("$JS.ACK."):
        return ACKS.get(payload.split(b" ")[0], "ack")
    if subject.startswith("$JS.API.CONSUMER.MSG.NEXT."):
        return "fetch"
    for prefix, kind in (("$KV.", "write"), ("$JS.API.DIRECT.GET.KV_", "read")):
        if subject.startswith(prefix):
            bucket = subject.removeprefix(prefix).split(".")[0]
            if bucket == bus.CONCURRENCY_BUCKET and f".{pacing.key('')}" in subject:
                return f"pace {kind}"
            return f"{BUCKETS.get(bucket, bucket)} {kind}"
    if subject.startswith(f"$JS.API.DIRECT.GET.{bus.CALLS_STREAM}"):
        return "call request read"
    if subject.startswith(f"$JS.API.DIRECT.GET.{bus.TRANSCRIPTS_STREAM}"):
        return "transcript read"
    if subject.startswith("$JS.API."):
        return "other JetStream API"
    parts = subject.split(".")
    if parts[0] == "calls" and len(parts) > 2:
        return {"events": "event publish", "schedule": "deferral publish", "dead": "dead letter"}.get(parts[2], subject)
    return "other"


class Counted:
    """Counts a connection's outgoing messages by purpose: each is a request, an ack or a publish."""

    def __init__(self) -> None:
        self.by_purpose: Counter[str] = Counter()

    @property
    def round_trips(self) -> int:
        return sum(c for p, c in self.by_purpose.items() if p not in ONE_WAY)

    @property
    def one_way(self) -> int:
        return sum(c for p, c in self.by_purpose.items() if p in ONE_WAY)

    def wrap(self, nc: Any) -> None:
        publish = nc.publish

        async def counted(subject: str, payload: bytes = b"", *args: Any, **kwargs: Any) -> None:
            self.by_purpose[purpose(subject, payload)] += 1
            await publish(subject, payload, *args, **kwargs)

        nc.publish = counted
