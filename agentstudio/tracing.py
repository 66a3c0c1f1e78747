"""OpenTelemetry traces: one trace per call, from the ingest request through the queue, the dialer's
placement and the provider, the conversation's turns, model requests and tools, to each webhook
delivery attempt.

Off by default. On when `OTEL_TRACES_EXPORTER=otlp`, or when it is unset and an OTLP endpoint is
(`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`); `OTEL_SDK_DISABLED=true`
or `OTEL_TRACES_EXPORTER=none` keep it off. The SDK and its exporter (OTLP over HTTP/protobuf) are
imported only then, and read every other `OTEL_*` variable themselves (sampler, batch sizes,
headers, resource attributes). Off, `span()` hands out a shared no-op and costs a function call.

The context travels as a W3C `traceparent`: in the NATS headers of a queued call and of a call's
status events, and in the call's record (`CallState.traceparent`, set when a dialer claims it), which
the conversation reads when the provider connects the call.

The HTTP requests a call makes to other systems (webhook deliveries, `api_call` tools, model
requests) carry the traceparent of their own span, as OpenTelemetry's HTTP client instrumentations
do, so a receiver that traces joins the call's trace; `setup(outbound=False)`
(`AGENTSTUDIO_TRACE_OUTBOUND=false`) keeps trace ids from third parties.

Span attributes name the call (`call_id`, `tenant`, slugs, outcomes), never a phone number (at most
its masked form), a key, a token or a signing secret.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger("agentstudio.tracing")

_W3C = TraceContextTextMapPropagator()
_OFF: contextlib.nullcontext[Span] = contextlib.nullcontext(INVALID_SPAN)
_provider: Any = None  # the SDK's TracerProvider while on
_tracer: trace.Tracer | None = None
_outbound = False  # while on: whether requests to other systems carry the traceparent (setup's `outbound`)


def enabled(env: Mapping[str, str] = os.environ) -> bool:
    """Whether the `OTEL_*` variables ask for traces (see the module's doc)."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        return exporter == "otlp"
    return bool(env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def on() -> bool:
    return _tracer is not None


def setup(role: str, outbound: bool = True) -> bool:
    """Start exporting this process's spans if the environment asks for it; whether it does.
    `role` names the service (`agent-studio-<role>`) unless OTEL_SERVICE_NAME does; `outbound`:
    whether HTTP requests to other systems carry the traceparent (`outgoing`)."""
    global _provider, _tracer, _outbound
    env = os.environ  # the SDK reads the same variables itself
    if _tracer is not None or not enabled(env):
        return _tracer is not None
    # Imported here: the SDK and the exporter's protobuf cost memory that a role without traces keeps.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; attributes passed here win.
    named = {} if env.get("OTEL_SERVICE_NAME") else {"service.name": f"agent-studio-{role}"}
    _provider = TracerProvider(resource=Resource.create(named))  # reads OTEL_TRACES_SAMPLER(_ARG)
    _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))  # reads OTEL_BSP_*, OTEL_EXPORTER_OTLP_*
    _tracer = _provider.get_tracer("agentstudio")
    _outbound = outbound
    log.info("tracing on", extra={"service": named.get("service.name") or env.get("OTEL_SERVICE_NAME")})
    return True


def shutdown() -> None:
    """Export what is buffered and stop (a role's last step; tests turn tracing off again)."""
    global _provider, _tracer, _outbound
    provider, _provider, _tracer, _outbound = _provider, None, None, False
    if provider is not None:
        provider.shutdown()


def flush(timeout_millis: int = 10_000) -> bool:
    return _provider is None or bool(_provider.force_flush(timeout_millis))


def span(name: str, *, kind: SpanKind = SpanKind.INTERNAL, context: Context | None = None,
         attributes: Mapping[str, Any] | None = None) -> contextlib.AbstractContextManager[Span]:
    """A span that is current inside the `with` (a child of the current one unless `context` says
    otherwise); an exception that leaves it marks it as an error, a cancel only names its type."""
    if _tracer is None:
        return _OFF
    return _recording(_tracer, name, kind, context, attributes)


@contextlib.contextmanager
def _recording(tracer: trace.Tracer, name: str, kind: SpanKind, context: Context | None,
               attributes: Mapping[str, Any] | None) -> Iterator[Span]:
    # Not the SDK's record_exception: its event carries the exception's message, and a provider's or
    # a model's error text may quote a phone number or what the callee said. The type is enough.
    with tracer.start_as_current_span(name, context=context, kind=kind, attributes=attributes,
                                      record_exception=False, set_status_on_exception=False) as span:
        try:
            yield span
        except BaseException as exc:  # a cancel too (a barge-in cuts a model request short): typed, not failed
            if "error.type" not in (getattr(span, "attributes", None) or {}):  # the caller's own, if it set one
                span.set_attribute("error.type", type(exc).__name__)
            if isinstance(exc, Exception):
                failed(span, type(exc).__name__)
            raise


def start(name: str, *, kind: SpanKind = SpanKind.INTERNAL, context: Context | None = None,
          attributes: Mapping[str, Any] | None = None) -> Span:
    """A span that outlives a block (a conversation): its owner ends it."""
    if _tracer is None:
        return INVALID_SPAN
    return _tracer.start_span(name, context=context, kind=kind, attributes=attributes)


def annotate(**attributes: Any) -> None:
    """Attributes on the current span (the ingest request's, in a route)."""
    if _tracer is not None:
        trace.get_current_span().set_attributes(attributes)


def inject(headers: MutableMapping[str, str]) -> MutableMapping[str, str]:
    """`headers` with the current span's traceparent added (unchanged when there is none)."""
    if _tracer is not None:
        _W3C.inject(headers)
    return headers


def outgoing(headers: MutableMapping[str, str]) -> MutableMapping[str, str]:
    """`headers` of a request to another system, with the current span's traceparent (and
    tracestate) when tracing is on and setup allowed sending it; else unchanged."""
    if _outbound:
        _W3C.inject(headers)
    return headers


def extract(headers: Mapping[str, str] | None) -> Context | None:
    """The remote parent that `headers` carry, or None (then a span starts from the current context)."""
    if _tracer is None or not headers or "traceparent" not in headers:
        return None
    return _W3C.extract(headers)


def traceparent(of: Span | None = None) -> str | None:
    """The W3C traceparent of `of` (default: the current span), to keep with the call's record."""
    if _tracer is None:
        return None
    carrier: dict[str, str] = {}
    _W3C.inject(carrier, trace.set_span_in_context(of) if of is not None else None)
    return carrier.get("traceparent")


def context_of(traceparent: str | None) -> Context | None:
    """The parent a kept traceparent names, or None."""
    return extract({"traceparent": traceparent}) if traceparent else None


def child_of(parent: Span) -> Context | None:
    """The context for a child of `parent`, a span kept by its owner rather than current."""
    return trace.set_span_in_context(parent) if _tracer is not None else None


def failed(of: Span, description: str) -> None:
    of.set_status(Status(StatusCode.ERROR, description))
