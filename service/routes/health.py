"""Liveness (``/healthz``), readiness (``/readyz``) and Prometheus metrics (``/metrics``)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.routes.deps import MetricsDep, StateDep

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    # Liveness only: the process runs its event loop.  Readiness is /readyz.
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(state: StateDep) -> JSONResponse:
    # Ready = can answer: tower and index loaded.  Redis down only degrades answers (the
    # popular items), so it is a field here, never the status: a Redis blip must not take
    # every pod out of the load balancer.
    ready = await state.readiness()
    redis: dict[str, str] = {"redis": ready.redis}
    if ready.redis_error is not None:
        redis["redis_error"] = ready.redis_error
    if ready.reasons:
        return JSONResponse(
            {"status": "unavailable", "reasons": ready.reasons, **redis}, status_code=503
        )
    assert state.engine is not None
    return JSONResponse(
        {
            "status": "ready",
            "model_version": state.engine.model_version,
            "index_version": state.engine.index_version,
            **redis,
        }
    )


@router.get("/metrics")
async def metrics_endpoint(metrics: MetricsDep) -> Response:
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
