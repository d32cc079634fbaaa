"""What a route may depend on (``Depends``): the app's settings and metrics (set when the
app is created) and the service state (set by the lifespan), plus the 503 every route
answers when what it needs is not there.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request

from service.middleware import LOG_FIELDS_KEY
from service.observability import Metrics
from service.settings import Settings
from service.state import ServiceState


def app_settings(request: Request) -> Settings:
    return request.app.state.settings


def app_metrics(request: Request) -> Metrics:
    # Set at creation, not by the lifespan: /metrics answers even before the state loads.
    return request.app.state.metrics


def service_state(request: Request) -> ServiceState:
    return request.app.state.service


def log_fields(request: Request) -> dict[str, Any]:
    """The request's access-log fields (the middleware writes them in its log line)."""
    return request.scope.get("state", {}).get(LOG_FIELDS_KEY, {})


SettingsDep = Annotated[Settings, Depends(app_settings)]
MetricsDep = Annotated[Metrics, Depends(app_metrics)]
StateDep = Annotated[ServiceState, Depends(service_state)]
LogFieldsDep = Annotated[dict[str, Any], Depends(log_fields)]


def unavailable(detail: Any, retry_after_s: int) -> HTTPException:
    return HTTPException(503, detail=detail, headers={"Retry-After": str(retry_after_s)})
