"""The recall flow without the web framework (service/recall_flow.py): budget -> Redis
breaker -> micro-batch -> fallback, driven directly.  Real Redis, real ONNX Runtime and
FAISS over the tiny export; no app, no HTTP."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest
from service_fixtures import TINY_MODEL_VERSION, build_version, item_id

from service.batcher import MicroBatcher
from service.core import RecallEngine, RecallRequest
from service.failures import RedisBreaker
from service.observability import Metrics
from service.recall_flow import RecallAnswer, RecallFlow
from service.sessions import NewEvent, SessionStore
from service.settings import Settings
from service.state import load_engine

T = TypeVar("T")
PREFIX = "t2flow"
SESSION_MAX_LEN = 5


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> RecallEngine:
    artifacts, index_dir = build_version(tmp_path_factory.mktemp("flow"), TINY_MODEL_VERSION)
    loaded, errors = load_engine(Settings(), artifacts, index_dir)
    assert loaded is not None, errors
    return loaded


def with_flow(
    redis_url: str,
    body: Callable[[RecallFlow, SessionStore], Awaitable[T]],
    breaker: RedisBreaker | None = None,
    **store_options: int,
) -> T:
    """Run ``body(flow, store)`` on a fresh event loop, the store and batcher created in it
    (as the app's lifespan does) and closed afterwards."""

    async def main() -> T:
        options = {"timeout_ms": 1000, "pool_timeout_ms": 1000, **store_options}
        store = SessionStore(redis_url, prefix=PREFIX, **options)
        metrics = Metrics()
        batcher = MicroBatcher(1, 8, 0.0, metrics)
        batcher.start()
        flow = RecallFlow(
            store,
            batcher,
            breaker or RedisBreaker(failures=3, open_s=60.0),
            metrics,
            session_max_len=SESSION_MAX_LEN,
            default_budget_ms=5000,
        )
        try:
            return await body(flow, store)
        finally:
            await batcher.close()
            await store.close()

    return asyncio.run(main())


def test_known_user_is_answered_by_the_model_without_seen_items(
    engine: RecallEngine, redis_url: str
) -> None:
    seen = [item_id(1), item_id(2)]

    async def body(flow: RecallFlow, store: SessionStore) -> RecallAnswer:
        await store.append_events(
            [NewEvent("u1", item, float(n)) for n, item in enumerate(seen)],
            SESSION_MAX_LEN,
            dedup_ttl_s=60,
        )
        return await flow.recall(engine, RecallRequest("u1", 5), flow.budget_ms(None, None))

    answer = with_flow(redis_url, body)
    assert not answer.degraded and not answer.cold_start
    assert answer.degraded_reason is None
    assert len(answer.items) == 5 and not set(seen) & {i.item_id for i in answer.items}
    assert answer.model_version == engine.model_version
    assert answer.batch_size == 1
    assert {"redis", "queue", "tower", "ann", "filter"} <= set(answer.stages_s)
    response = answer.response()
    assert response["degraded"] is False and response["degraded_reason"] is None
    assert answer.log_fields()["batch_size"] == 1


def test_unknown_user_gets_the_cold_start_answer(engine: RecallEngine, redis_url: str) -> None:
    async def body(flow: RecallFlow, store: SessionStore) -> RecallAnswer:
        return await flow.recall(engine, RecallRequest("nobody", 3), 5000.0)

    answer = with_flow(redis_url, body)
    assert answer.cold_start and not answer.degraded
    assert [i.item_id for i in answer.items] == [
        i.item_id for i in engine.popular_items(3, frozenset())
    ]
    assert answer.batch_size is None  # nothing to compute: no batch ran


def test_spent_budget_answers_the_fallback_without_reading_redis(
    engine: RecallEngine, redis_url: str
) -> None:
    async def body(flow: RecallFlow, store: SessionStore) -> RecallAnswer:
        # The budget ran out before the flow started (a caller's deadline already passed).
        started = time.perf_counter() - 1.0
        return await flow.recall(engine, RecallRequest("u1", 4), 1.0, started)

    answer = with_flow(redis_url, body)
    assert answer.degraded and answer.degraded_reason == "deadline_exhausted"
    assert "redis" not in answer.stages_s
    assert [i.item_id for i in answer.items] == [
        i.item_id for i in engine.popular_items(4, frozenset())
    ]


def test_open_breaker_answers_the_fallback(engine: RecallEngine, redis_url: str) -> None:
    breaker = RedisBreaker(failures=1, open_s=600.0)
    breaker.failure()  # one failure opens it

    async def body(flow: RecallFlow, store: SessionStore) -> RecallAnswer:
        return await flow.recall(engine, RecallRequest("u1", 2), 5000.0)

    answer = with_flow(redis_url, body, breaker=breaker)
    assert answer.degraded and answer.degraded_reason == "redis_circuit_open"
    assert answer.response()["degraded_reason"] == "redis_circuit_open"
    assert answer.log_fields()["degraded_reason"] == "redis_circuit_open"


def test_unreachable_redis_answers_the_fallback_and_counts_a_failure(
    engine: RecallEngine, closed_redis_url: str
) -> None:
    breaker = RedisBreaker(failures=1, open_s=600.0)

    answer = with_flow(
        closed_redis_url,
        lambda flow, store: flow.recall(engine, RecallRequest("u1", 2), 5000.0),
        breaker=breaker,
    )
    assert answer.degraded and answer.degraded_reason in ("redis_error", "redis_timeout")
    assert breaker.is_open  # the failure was counted


def test_exhausted_pool_is_not_a_redis_failure(engine: RecallEngine, redis_url: str) -> None:
    breaker = RedisBreaker(failures=1, open_s=600.0)

    async def body(flow: RecallFlow, store: SessionStore) -> RecallAnswer:
        # The pool's one connection is taken (as by another request in flight), so the
        # read finds none free within pool_timeout_ms.
        held = await store._pool.get_connection()
        try:
            return await flow.recall(engine, RecallRequest("u1", 2), 5000.0)
        finally:
            await store._pool.release(held)

    answer = with_flow(redis_url, body, breaker, max_connections=1, pool_timeout_ms=20)
    assert answer.degraded and answer.degraded_reason == "redis_pool_exhausted"
    assert not breaker.is_open  # Redis answered; a busy pool must not open the breaker


def test_budget_is_cut_to_the_callers_deadline(redis_url: str) -> None:
    async def body(flow: RecallFlow, store: SessionStore) -> list[float]:
        return [
            flow.budget_ms(None, None),
            flow.budget_ms(300, None),
            flow.budget_ms(300, 120.0),
            flow.budget_ms(None, 9000.0),
        ]

    assert with_flow(redis_url, body) == [5000.0, 300.0, 120.0, 5000.0]


def test_flow_loads_without_the_web_framework() -> None:
    # A fresh interpreter: this one has FastAPI loaded by other tests.
    code = (
        "import sys, service.recall_flow; "
        "assert not {'fastapi', 'starlette', 'torch'} & set(sys.modules), sorted(sys.modules)"
    )
    root = Path(__file__).parents[1]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=120)
