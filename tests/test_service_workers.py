"""Several uvicorn workers (``T2DIFF_WORKERS=2``): each process loads its own tower, index
and Redis pool; concurrent requests spread over them all get the same, correct answers."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis
from service_fixtures import build_version, item_id

from contracts.sessions import encode_event, session_key
from t2diff_cli.local_stack import free_port, service_process, service_settings

USERS = [f"user-{n}" for n in range(8)]


@pytest.fixture
def server(tmp_path: Path, redis_url: str) -> Iterator[str]:
    artifacts, index = build_version(tmp_path, "workers-v1")
    client = redis.Redis.from_url(redis_url)
    for n, user in enumerate(USERS):
        key = session_key(user)
        client.delete(key)
        client.rpush(key, *[encode_event(item_id(1 + (n + k) % 20), 1e6 + k) for k in range(6)])
    env = {
        **service_settings(artifacts, index, redis_url, free_port()),
        "T2DIFF_WORKERS": "2",
        "T2DIFF_BUDGET_MS": "5000",
        # Not a fault test: generous Redis timeouts, so a busy CI box does not degrade it.
        "T2DIFF_REDIS_TIMEOUT_MS": "2000",
        "T2DIFF_REDIS_CONNECT_TIMEOUT_MS": "2000",
        "T2DIFF_REDIS_POOL_TIMEOUT_MS": "2000",
        "T2DIFF_WATCH_INTERVAL_S": "0",
        "T2DIFF_LOG_LEVEL": "warning",
        "PYTHONPATH": str(Path.cwd()),
    }
    try:
        # Readiness is answered by whichever worker: ask until both have been.
        with service_process(
            env, 60, log_path=tmp_path / "service.log", ready_in_a_row=10, stop_timeout_s=30
        ) as base:
            yield base
    finally:
        client.delete(*[session_key(user) for user in USERS])


def test_two_workers_answer_concurrent_requests_consistently(server: str) -> None:
    def recall(user: str) -> tuple[str, list[str], str | None]:
        response = httpx.post(f"{server}/recall", json={"user_id": user, "k": 5}, timeout=30)
        assert response.status_code == 200, response.text
        body = response.json()
        return user, [item["item_id"] for item in body["items"]], body.get("degraded_reason")

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(recall, USERS * 8))
    answers: dict[str, list[str]] = {}
    for user, items, degraded in results:
        assert degraded is None and len(items) == 5, (degraded, items)
        # Same session, same fixed noise: every worker gives the same answer.
        assert answers.setdefault(user, items) == items
    assert len(answers) == len(USERS)
