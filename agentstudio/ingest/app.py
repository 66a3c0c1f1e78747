"""The ingest FastAPI application."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from agentstudio import tracing
from agentstudio.ingest.body_deadline import BodyDeadlineMiddleware
from agentstudio.ingest.console import pages as console
from agentstudio.ingest.errors import (
    ApiError, document_errors, handle_api_error, handle_http_error, handle_validation_error,
)
from agentstudio.ingest.metrics import IngestMetrics, MetricsMiddleware
from agentstudio.ingest.routes import calls, deliveries, do_not_call, health, providers, webhooks
from agentstudio.ingest.service import IngestService
from agentstudio.ingest.traces import TraceMiddleware
from agentstudio.settings import Settings


def create_app(settings: Settings | None = None, service: IngestService | None = None) -> FastAPI:
    """Build the app. With `service` given, the caller owns its start and stop (tests, `dev`)."""
    settings = settings or Settings()
    owned = service is None
    svc = service or IngestService(settings)
    if owned:  # a process of its own (each of uvicorn's workers): its traces, if the OTEL_* variables ask
        tracing.setup("ingest", outbound=settings.trace_outbound)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if owned:
            await svc.start()
        try:
            yield
        finally:
            if owned:
                await svc.stop()
                tracing.shutdown()

    app = FastAPI(
        title="Agent Studio ingest",
        version="v1",
        description="Marketing platforms trigger AI voice calls by POSTing one JSON body.",
        lifespan=lifespan,
    )
    app.state.service = svc
    app.state.metrics = IngestMetrics()
    app.add_exception_handler(ApiError, handle_api_error)
    app.add_exception_handler(RequestValidationError, handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, handle_http_error)
    app.include_router(webhooks.router)
    app.include_router(calls.router)
    app.include_router(deliveries.router)
    app.include_router(do_not_call.router)
    app.include_router(providers.router)
    app.include_router(health.router)
    console.install(app)
    document_errors(app)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    app.add_middleware(BodyDeadlineMiddleware, seconds=settings.body_timeout_seconds)
    if tracing.on():  # outermost, so the span holds the whole request; absent, it costs nothing
        app.add_middleware(TraceMiddleware)
    return app
