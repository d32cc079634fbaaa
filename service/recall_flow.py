"""One recall within its budget: budget -> Redis breaker -> micro-batch -> fallback.

Plain Python, no web framework: the HTTP route (:mod:`service.routes.recall`) turns the
request into a :class:`~service.core.RecallRequest` and a budget, calls
:meth:`RecallFlow.recall`, and renders the :class:`RecallAnswer` it gets back; tests and
benchmarks can drive the same flow without an app.

A recall never waits past its budget: each stage is awaited with the time left, and when
Redis or the tower fails or overruns, the answer is the popular items (minus the seen ones,
when the session is known), marked ``degraded`` with the reason.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import TimeoutError as RedisTimeoutError

from contracts.sessions import Session
from service.batcher import MicroBatcher
from service.core import RecallEngine, RecallItem, RecallRequest, RecallResult
from service.failures import REDIS_ERRORS, RedisBreaker, is_pool_exhausted, reason_of
from service.observability import Metrics
from service.sessions import SessionStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecallAnswer:
    """What one recall answered, and how it got there (the access log's fields)."""

    user_id: str
    items: list[RecallItem]
    model_version: str
    index_version: str
    latency_ms: float
    cold_start: bool
    k: int
    budget_ms: float
    # Why the answer is the popular fallback; None when the model answered.
    degraded_reason: str | None = None
    degraded: bool = False
    # Seconds per stage this recall went through: redis, queue, tower, ann, filter (the
    # last three are its batch's).
    stages_s: dict[str, float] = field(default_factory=dict)
    # Requests in the micro-batch that answered it; None when no batch ran.
    batch_size: int | None = None

    def response(self) -> dict[str, Any]:
        """The ``POST /recall`` body (``service.routes.models.RecallResponse``)."""
        return {
            "user_id": self.user_id,
            "items": [{"item_id": i.item_id, "score": i.score} for i in self.items],
            "model_version": self.model_version,
            "index_version": self.index_version,
            "latency_ms": round(self.latency_ms, 3),
            "cold_start": self.cold_start,
            "degraded": self.degraded,
            "degraded_reason": self.degraded_reason if self.degraded else None,
            "stages_ms": {name: round(s * 1000, 3) for name, s in self.stages_s.items()},
        }

    def log_fields(self) -> dict[str, Any]:
        """Fields for the request's access-log line, in the order they were always logged."""
        fields: dict[str, Any] = {}
        if self.batch_size is not None:
            fields["batch_size"] = self.batch_size
        fields.update(
            cold_start=self.cold_start, degraded=self.degraded, k=self.k, budget_ms=self.budget_ms
        )
        if self.degraded_reason is not None:
            fields["degraded_reason"] = self.degraded_reason
        return fields


class RecallFlow:
    """The stages of one recall around an engine: the session from Redis (bounded by the
    budget and the circuit breaker), tower + ANN in a micro-batch (bounded by what is left),
    the popular items when either fails or overruns.

    The engine is passed per call, not held: a hot swap replaces the service's engine, and
    a recall uses the one it was given for its whole life (it never mixes versions).
    """

    def __init__(
        self,
        store: SessionStore,
        batcher: MicroBatcher,
        breaker: RedisBreaker,
        metrics: Metrics,
        session_max_len: int,
        default_budget_ms: float,
    ) -> None:
        self.store = store
        self.batcher = batcher
        self.breaker = breaker
        self.metrics = metrics
        self.session_max_len = session_max_len
        self.default_budget_ms = default_budget_ms

    def budget_ms(self, requested_ms: float | None, caller_deadline_ms: float | None) -> float:
        """The request's own budget (else the default), cut to what the caller still waits."""
        budget_ms = float(requested_ms or self.default_budget_ms)
        if caller_deadline_ms is not None:
            budget_ms = min(budget_ms, caller_deadline_ms)
        return budget_ms

    async def recall(
        self,
        engine: RecallEngine,
        request: RecallRequest,
        budget_ms: float,
        started: float | None = None,
    ) -> RecallAnswer:
        """Answer ``request`` within ``budget_ms`` counted from ``started`` (a
        ``time.perf_counter()`` reading; now when None).  Never raises for a failing
        dependency: the answer is then the fallback, ``degraded`` with the reason."""
        started = time.perf_counter() if started is None else started
        deadline = started + budget_ms / 1000
        stages: dict[str, float] = {}
        session, reason = await self._read_session(request.user_id, deadline, stages)

        result: RecallResult | None = None
        batch_size: int | None = None
        if session is not None and len(session) == 0:
            result = engine.cold_start(request)  # no behaviour: nothing to compute
        elif session is not None:
            result, reason, batch_size = await self._run_batch(
                engine, request, session, deadline, stages
            )

        metrics = self.metrics
        if result is not None:
            items, cold_start = result.items, result.cold_start
            model_version, index_version = result.model_version, result.index_version
        else:
            seen = set(session.item_ids) if session is not None and request.exclude_seen else set()
            items, cold_start = engine.popular_items(request.k, seen), False
            model_version, index_version = engine.model_version, engine.index_version
            metrics.degraded.labels(reason or "unknown").inc()
        if cold_start:
            metrics.cold_start.inc()
        return RecallAnswer(
            user_id=request.user_id,
            items=items,
            model_version=model_version,
            index_version=index_version,
            latency_ms=(time.perf_counter() - started) * 1000,
            cold_start=cold_start,
            k=request.k,
            budget_ms=budget_ms,
            degraded_reason=reason,
            degraded=result is None,
            stages_s=stages,
            batch_size=batch_size,
        )

    async def _read_session(
        self, user_id: str, deadline: float, stages: dict[str, float]
    ) -> tuple[Session | None, str | None]:
        """Stage 1: the session from Redis, bounded by the budget and the circuit breaker;
        (session or None, why not)."""
        left = deadline - time.perf_counter()
        if left <= 0:
            return None, "deadline_exhausted"
        if not self.breaker.allow():
            return None, "redis_circuit_open"
        session: Session | None = None
        reason: str | None = None
        t0 = time.perf_counter()
        try:
            (session,) = await asyncio.wait_for(
                self.store.get_sessions([user_id], self.session_max_len), left
            )
            self.breaker.success()
        except (TimeoutError, RedisTimeoutError):
            # asyncio's deadline or redis-py's socket timeout (not a builtin subclass).
            reason = "redis_timeout"
            self.breaker.failure()
            self.metrics.redis_errors.labels("read", "timeout").inc()
        except REDIS_ERRORS as exc:
            if is_pool_exhausted(exc):
                # Redis answers; this replica has more reads in flight than connections.
                # Not a Redis failure: the breaker and t2diff_redis_up stay as they are.
                reason = "redis_pool_exhausted"
                self.metrics.redis_errors.labels("read", "pool_exhausted").inc()
                log.warning("session read found no free Redis connection: %s", reason_of(exc))
            else:
                reason = "redis_error"
                self.breaker.failure()
                self.metrics.redis_errors.labels("read", type(exc).__name__).inc()
                log.warning("session read failed: %s", reason_of(exc))
        stages["redis"] = time.perf_counter() - t0
        self.metrics.stage_latency.labels("redis").observe(stages["redis"])
        return session, reason

    async def _run_batch(
        self,
        engine: RecallEngine,
        request: RecallRequest,
        session: Session,
        deadline: float,
        stages: dict[str, float],
    ) -> tuple[RecallResult | None, str | None, int | None]:
        """Stage 2: tower + ANN in a micro-batch, awaited with what is left of the budget;
        (result or None, why not, the batch's size)."""
        left = deadline - time.perf_counter()
        if left <= 0:
            return None, "budget_exhausted", None
        future = self.batcher.submit(engine, request, session)
        try:
            outcome = await asyncio.wait_for(future, left)
        except TimeoutError:
            return None, "tower_timeout", None
        except Exception as exc:
            log.warning("recall failed: %s", reason_of(exc))
            return None, "tower_error", None
        stages["queue"] = outcome.queue_s
        stages.update(outcome.timings)
        self.metrics.stage_latency.labels("queue").observe(outcome.queue_s)
        return outcome.result, None, outcome.batch_size
