"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from agentstudio.ingest.auth import Service

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Ready: a bundle is loaded and NATS is connected", responses={503: {"description": "Not ready"}})
async def readyz(svc: Service) -> Response:
    ready = svc.ready
    return JSONResponse(
        {"status": "ready" if ready else "not ready", "nats": svc.connected, "tenants": len(svc.snapshot.bundles)},
        status_code=200 if ready else 503,
    )


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    body = request.app.state.metrics.render() + request.app.state.service.metrics.render()
    return Response(body, media_type="text/plain; version=0.0.4")
