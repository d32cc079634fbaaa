"""The HTTP face of the recall service (FastAPI): the app, its lifespan and its middleware.

The routes live in :mod:`service.routes` (``health``, ``recall``, ``events``, ``admin``) and
reach the service through injected dependencies (:mod:`service.routes.deps`); a recall's
budget -> breaker -> batch -> fallback flow is plain Python (:mod:`service.recall_flow`).
Everything heavy (ONNX session, FAISS index, Redis pool) is created in the lifespan, never
at import, and a failure to load is kept as a reason that ``/readyz`` reports instead of
crashing the process: an orchestrator then sees an unready pod with an explanation rather
than a crash loop.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.errors import install_error_handlers
from service.middleware import ServiceMiddleware
from service.observability import Metrics
from service.routes import admin, events, health, recall
from service.routes.models import DEADLINE_HEADER, make_request_models
from service.settings import Settings
from service.state import ServiceState

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = ServiceState(settings, metrics)
        app.state.service = state
        await state.start()
        if state.errors:
            log.error("service starting NOT ready: %s", state.errors)
        try:
            yield
        finally:
            await state.close()

    app = FastAPI(title="T2Diff recall", version="0.2.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = metrics
    install_error_handlers(app)
    if settings.cors_origins:  # off unless origins are configured
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Content-Type", "X-Request-ID", DEADLINE_HEADER],
        )
    app.add_middleware(
        ServiceMiddleware,
        metrics=metrics,
        max_body_bytes=settings.max_body_bytes,
        max_in_flight=settings.max_in_flight,
        retry_after_s=settings.retry_after_s,
    )
    recall_body, events_body = make_request_models(settings)
    app.include_router(health.router)
    app.include_router(recall.recall_router(recall_body))
    app.include_router(events.events_router(events_body))
    if settings.admin_token is not None:
        app.include_router(admin.reload_router)
        if settings.release_root is not None:
            app.include_router(admin.rollback_router)
    return app
