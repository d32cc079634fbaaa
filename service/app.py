"""The HTTP face of the recall service (FastAPI).

Routes stay thin: validate, read the session from Redis, hand the rest to the micro-batcher
(:mod:`service.batcher`), which runs :class:`service.core.RecallEngine` in worker threads.
Everything heavy (ONNX session, FAISS index, Redis pool) is created in the lifespan, never
at import, and a failure to load is kept as a reason that ``/readyz`` reports instead of
crashing the process: an orchestrator then sees an unready pod with an explanation rather
than a crash loop.

A recall never waits past its budget (``budget_ms`` of the body or the setting, cut to the
caller's ``X-Request-Deadline-Ms``): each stage is awaited with the time left, and when
Redis or the tower fails or overruns, the answer is the popular items (minus the seen
ones, when the session is known), marked ``degraded`` with the reason.
"""

# No ``from __future__ import annotations``: the request models are built per app (their
# bounds come from the settings) and FastAPI must resolve route annotations to real classes.

import asyncio
import functools
import hmac
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import anyio.to_thread
from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from redis.exceptions import TimeoutError as RedisTimeoutError

from contracts.sessions import MAX_ID_LENGTH, Session
from service.core import RecallEngine, RecallItem, RecallRequest
from service.errors import install_error_handlers
from service.middleware import LOG_FIELDS_KEY, ServiceMiddleware
from service.observability import Metrics
from service.sessions import NewEvent
from service.settings import Settings
from service.state import REDIS_ERRORS, ServiceState, reason_of

log = logging.getLogger(__name__)

# Ids: 1..128 characters, no control characters (they would corrupt logs and keys).
ID_PATTERN = r"^[^\x00-\x1f\x7f]+$"
Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH, pattern=ID_PATTERN)]
# Unix seconds: 0 to 2100-01-01.
MAX_TIMESTAMP = 4_102_444_800.0
DEADLINE_HEADER = "X-Request-Deadline-Ms"


class RecallItemOut(BaseModel):
    item_id: str
    score: float


class RecallResponse(BaseModel):
    user_id: str
    items: list[RecallItemOut]
    model_version: str
    index_version: str
    latency_ms: float
    cold_start: bool
    degraded: bool = False
    degraded_reason: str | None = None
    # Milliseconds per stage this request went through: redis, queue, tower, ann, filter
    # (the last three are its batch's).
    stages_ms: dict[str, float] = Field(default_factory=dict)


class EventsResponse(BaseModel):
    written: int
    duplicates: int


def make_request_models(settings: Settings) -> tuple[type[BaseModel], type[BaseModel]]:
    """The ``POST /recall`` and ``POST /events`` bodies, bounded by this app's settings."""

    class RecallBody(BaseModel):
        # strict: "5" is not a k and "yes" is not a bool; forbid: a misspelt field
        # ("exclude_seem") is an error, not a silently ignored option.
        model_config = ConfigDict(strict=True, extra="forbid")

        user_id: Id
        k: Annotated[int, Field(ge=1, le=settings.max_k)] = settings.default_k
        exclude_seen: bool = True
        budget_ms: Annotated[int, Field(ge=1, le=settings.max_budget_ms)] | None = None

    class EventIn(BaseModel):
        model_config = ConfigDict(strict=True, extra="forbid")

        user_id: Id
        item_id: Id
        timestamp: Annotated[float, Field(ge=0, le=MAX_TIMESTAMP, allow_inf_nan=False)] | None = (
            None
        )
        event_id: Id | None = None

    class EventsBody(BaseModel):
        """One event, or ``{"events": [...]}``."""

        model_config = ConfigDict(strict=True, extra="forbid")

        events: (
            Annotated[
                list[EventIn], Field(min_length=1, max_length=settings.max_events_per_request)
            ]
            | None
        ) = None
        user_id: Id | None = None
        item_id: Id | None = None
        timestamp: Annotated[float, Field(ge=0, le=MAX_TIMESTAMP, allow_inf_nan=False)] | None = (
            None
        )
        event_id: Id | None = None

    return RecallBody, EventsBody


def _state(request: Request) -> ServiceState:
    return request.app.state.service


def _log_fields(request: Request) -> dict[str, Any]:
    return request.scope.get("state", {}).get(LOG_FIELDS_KEY, {})


def _unavailable(detail: Any, retry_after_s: int) -> HTTPException:
    return HTTPException(503, detail=detail, headers={"Retry-After": str(retry_after_s)})


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
    app.state.metrics = metrics
    install_error_handlers(app)
    RecallBody, EventsBody = make_request_models(settings)  # noqa: N806
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

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        # Liveness only: the process runs its event loop.  Readiness is /readyz.
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(request: Request) -> JSONResponse:
        # Ready = can answer: tower and index loaded.  Redis down only degrades answers (the
        # popular items), so it is a field here, never the status: a Redis blip must not
        # take every pod out of the load balancer.
        state = _state(request)
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

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post(
        "/recall",
        response_model=RecallResponse,
        responses={503: {"description": "not ready (artifacts) or overloaded"}},
    )
    async def recall(
        body: RecallBody,  # type: ignore[valid-type]
        request: Request,
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
        state = _state(request)
        engine, store, batcher = state.engine, state.store, state.batcher
        if engine is None or store is None or batcher is None:
            raise _unavailable(
                {"reason": "not ready", "errors": state.errors}, settings.retry_after_s
            )
        budget_ms = float(body.budget_ms or settings.budget_ms)
        if x_request_deadline_ms is not None:
            budget_ms = min(budget_ms, x_request_deadline_ms)
        deadline = started + budget_ms / 1000
        stages: dict[str, float] = {}
        reason: str | None = None
        session: Session | None = None
        recall_request = RecallRequest(body.user_id, body.k, body.exclude_seen)

        # Stage 1: the session from Redis, bounded by the budget and the circuit breaker.
        left = deadline - time.perf_counter()
        if left <= 0:
            reason = "deadline_exhausted"
        elif not state.breaker.allow():
            reason = "redis_circuit_open"
        else:
            t0 = time.perf_counter()
            try:
                (session,) = await asyncio.wait_for(
                    store.get_sessions([body.user_id], settings.session_max_len), left
                )
                state.breaker.success()
            except (TimeoutError, RedisTimeoutError):
                # asyncio's deadline or redis-py's socket timeout (not a builtin subclass).
                reason = "redis_timeout"
                state.breaker.failure()
                metrics.redis_errors.labels("read", "timeout").inc()
            except REDIS_ERRORS as exc:
                reason = "redis_error"
                state.breaker.failure()
                metrics.redis_errors.labels("read", type(exc).__name__).inc()
                log.warning("session read failed: %s", reason_of(exc))
            stages["redis"] = time.perf_counter() - t0
            metrics.stage_latency.labels("redis").observe(stages["redis"])

        # Stage 2: tower + ANN in a micro-batch, awaited with what is left of the budget.
        result = None
        if session is not None and len(session) == 0:
            result = engine.cold_start(recall_request)  # no behaviour: nothing to compute
        elif session is not None:
            left = deadline - time.perf_counter()
            if left <= 0:
                reason = "budget_exhausted"
            else:
                future = batcher.submit(engine, recall_request, session)
                try:
                    outcome = await asyncio.wait_for(future, left)
                except TimeoutError:
                    reason = "tower_timeout"
                except Exception as exc:
                    reason = "tower_error"
                    log.warning("recall failed: %s", reason_of(exc))
                else:
                    result = outcome.result
                    stages["queue"] = outcome.queue_s
                    stages.update(outcome.timings)
                    metrics.stage_latency.labels("queue").observe(outcome.queue_s)
                    _log_fields(request)["batch_size"] = outcome.batch_size

        if result is not None:
            items, cold_start = result.items, result.cold_start
            model_version, index_version = result.model_version, result.index_version
        else:
            seen = set(session.item_ids) if session is not None and body.exclude_seen else set()
            items, cold_start = _fallback(engine, body.k, seen), False
            model_version, index_version = engine.model_version, engine.index_version
            metrics.degraded.labels(reason or "unknown").inc()
        if cold_start:
            metrics.cold_start.inc()
        latency_ms = (time.perf_counter() - started) * 1000
        fields = _log_fields(request)
        fields.update(cold_start=cold_start, degraded=result is None, k=body.k, budget_ms=budget_ms)
        if reason is not None:
            fields["degraded_reason"] = reason
        return {
            "user_id": body.user_id,
            "items": [{"item_id": i.item_id, "score": i.score} for i in items],
            "model_version": model_version,
            "index_version": index_version,
            "latency_ms": round(latency_ms, 3),
            "cold_start": cold_start,
            "degraded": result is None,
            "degraded_reason": reason if result is None else None,
            "stages_ms": {k: round(v * 1000, 3) for k, v in stages.items()},
        }

    @app.post(
        "/events",
        response_model=EventsResponse,
        responses={503: {"description": "Redis unavailable or overloaded; retry"}},
    )
    async def events(body: EventsBody, request: Request) -> dict[str, int]:  # type: ignore[valid-type]
        state = _state(request)
        store = state.store
        if store is None:
            raise _unavailable({"reason": "not ready", "errors": state.errors}, 1)
        now = time.time()
        raw = _events_of(body)
        new = [
            NewEvent(
                e.user_id,
                e.item_id,
                now if e.timestamp is None else float(e.timestamp),
                e.event_id,
            )
            for e in raw
        ]
        if not state.breaker.allow():
            raise _unavailable("session store unavailable (circuit open)", settings.retry_after_s)
        timeout = (settings.redis_connect_timeout_ms + 4 * settings.redis_timeout_ms) / 1000
        try:
            written, duplicates = await asyncio.wait_for(
                store.append_events(new, settings.session_max_len, settings.event_dedup_ttl_s),
                timeout,
            )
            state.breaker.success()
        except (TimeoutError, *REDIS_ERRORS) as exc:
            state.breaker.failure()
            kind = "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
            metrics.redis_errors.labels("write", kind).inc()
            # The outcome is unknown (a timed-out script may have run): a retry with the
            # same event ids is safe, which is what event ids are for.
            raise _unavailable(
                f"session store unavailable: {reason_of(exc)}", settings.retry_after_s
            ) from exc
        metrics.events.labels("written").inc(written)
        metrics.events.labels("duplicate").inc(duplicates)
        if written and state.recomputer is not None:
            # The users' sessions changed: compute their new xhat before they next recall.
            state.recomputer.submit(dict.fromkeys(e.user_id for e in new))
        _log_fields(request).update(events=len(new), written=written, duplicates=duplicates)
        return {"written": written, "duplicates": duplicates}

    if settings.admin_token is not None:
        token = settings.admin_token.get_secret_value().encode()

        def require_admin(
            authorization: Annotated[str | None, Header(max_length=1024)] = None,
        ) -> None:
            scheme, _, given = (authorization or "").partition(" ")
            # compare_digest: the time taken does not tell how much of the token matched.
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token):
                raise HTTPException(
                    401, detail="admin token required", headers={"WWW-Authenticate": "Bearer"}
                )

        @app.post("/admin/reload", dependencies=[Depends(require_admin)])
        async def admin_reload(request: Request) -> JSONResponse:
            outcome = await _state(request).reload("admin", force=True)
            return JSONResponse(
                outcome, status_code=200 if outcome["status"] == "reloaded" else 409
            )

        if settings.release_root is not None:
            release_root = settings.release_root

            @app.post("/admin/rollback", dependencies=[Depends(require_admin)])
            async def admin_rollback(request: Request) -> JSONResponse:
                # The same code as `t2diff rollback` (locked, atomic link switches), then a
                # reload, so the answer says which version serves now.
                from contracts.release import ReleaseError, rollback

                try:
                    entry = await anyio.to_thread.run_sync(
                        functools.partial(rollback, release_root, trigger="admin")
                    )
                except (ReleaseError, OSError) as exc:
                    return JSONResponse(
                        {"status": "failed", "errors": {"rollback": reason_of(exc)}}, 409
                    )
                outcome = await _state(request).reload("admin-rollback", force=True)
                outcome["rollback"] = entry
                return JSONResponse(
                    outcome, status_code=200 if outcome["status"] == "reloaded" else 409
                )

    return app


def _events_of(body: Any) -> list[Any]:
    """The events of a single-or-batch body; 422 naming the field when it is neither."""
    single = (body.user_id, body.item_id, body.timestamp, body.event_id)
    if body.events is not None:
        if any(v is not None for v in single):
            raise _field_error("events", "give either 'events' or one event's fields, not both")
        return list(body.events)
    for name in ("user_id", "item_id"):
        if getattr(body, name) is None:
            raise _field_error(name, "field required (or give 'events')")
    return [body]


def _field_error(field: str, message: str) -> HTTPException:
    return HTTPException(
        422, detail=[{"loc": ["body", field], "msg": message, "type": "value_error"}]
    )


def _fallback(engine: RecallEngine, k: int, seen: set[str]) -> list[RecallItem]:
    return engine.popular_items(k, seen)
