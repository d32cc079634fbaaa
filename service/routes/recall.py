"""``POST /recall``: validate, then hand the request to the framework-free recall flow
(:class:`service.recall_flow.RecallFlow`: budget -> Redis breaker -> micro-batch ->
fallback) and render its answer."""

# No ``from __future__ import annotations``: the body model is built per app and FastAPI
# must resolve the route's annotations to real classes.

import time
from typing import Annotated, Any

from fastapi import APIRouter, Header
from pydantic import BaseModel

from service.core import RecallRequest
from service.routes.deps import LogFieldsDep, SettingsDep, StateDep, unavailable
from service.routes.models import RecallResponse


def recall_router(recall_body: type[BaseModel]) -> APIRouter:
    """The route for this app's body model (its bounds come from the app's settings)."""
    router = APIRouter()

    @router.post(
        "/recall",
        response_model=RecallResponse,
        responses={503: {"description": "not ready (artifacts) or overloaded"}},
    )
    async def recall(
        body: recall_body,  # type: ignore[valid-type]
        state: StateDep,
        settings: SettingsDep,
        log_fields: LogFieldsDep,
        x_request_deadline_ms: Annotated[
            float | None,
            Header(
                ge=0,
                le=60_000,
                allow_inf_nan=False,
                description="milliseconds the caller still waits for this answer",
            ),
        ] = None,
    ) -> dict[str, Any]:
        started = time.perf_counter()
        # Read once: a hot swap replaces state.engine, this request keeps the one it got.
        engine, flow = state.engine, state.recall_flow
        if engine is None or flow is None:
            raise unavailable(
                {"reason": "not ready", "errors": state.errors}, settings.retry_after_s
            )
        budget_ms = flow.budget_ms(body.budget_ms, x_request_deadline_ms)
        request = RecallRequest(body.user_id, body.k, body.exclude_seen)
        answer = await flow.recall(engine, request, budget_ms, started)
        log_fields.update(answer.log_fields())
        return answer.response()

    return router
