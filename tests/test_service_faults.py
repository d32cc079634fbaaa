"""Faults: Redis stopped, restarted, paused (SIGSTOP) and flapping; a slow or failing
tower; overload.  Each runs a private redis-server that the test really stops and
restarts on the same port.  Time bounds are generous (a loaded 2-core box): they only tell
"answered within the budget plus slack" from "hung on a dependency"."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from service_fixtures import TINY_MODEL_VERSION, build_version, item_id

from service.app import create_app
from service.settings import Settings
from t2diff_cli.local_stack import RedisServer, redis_binary

BUDGET_MS = 300
SLACK_S = 1.5  # scheduling noise on a shared CI box; a hang would be seconds to forever


@pytest.fixture(scope="module")
def version(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("faults")
    return build_version(root, TINY_MODEL_VERSION, index_version="idx-faults")


@pytest.fixture
def redis_proc() -> Iterator[RedisServer]:
    """A private redis-server (no persistence) that the test stops, restarts and pauses."""
    if redis_binary() is None:
        pytest.skip("redis-server is not on PATH")
    with RedisServer() as server:
        yield server


def make_client(version: tuple[Path, Path], url: str, **overrides) -> TestClient:
    values = {
        "artifacts_dir": version[0],
        "index_dir": version[1],
        "redis_url": url,
        "budget_ms": BUDGET_MS,
        "watch_interval_s": 0,
        "redis_breaker_open_ms": 200,
    }
    values.update(overrides)
    return TestClient(create_app(Settings(**values)))


def warm_user(client: TestClient, within_s: float = 2.0) -> None:
    """Write one behaviour of user u; retried (a client honouring Retry-After would) while
    the circuit breaker is still open after an outage."""
    started = time.perf_counter()
    while True:
        response = client.post("/events", json={"user_id": "u", "item_id": item_id(3)})
        if response.status_code == 200:
            return
        assert response.status_code == 503, response.text
        assert time.perf_counter() - started < within_s, response.text
        time.sleep(0.05)


def timed_recall(client: TestClient, **body) -> tuple[dict, float]:
    started = time.perf_counter()
    response = client.post("/recall", json={"user_id": "u", "k": 5, **body})
    elapsed = time.perf_counter() - started
    assert response.status_code == 200, response.text
    return response.json(), elapsed


def wait_full_answer(client: TestClient, within_s: float) -> float:
    """Seconds until a recall is answered normally again (fails after ``within_s``)."""
    started = time.perf_counter()
    while True:
        body, _ = timed_recall(client)
        if not body["degraded"]:
            return time.perf_counter() - started
        assert time.perf_counter() - started < within_s, body
        time.sleep(0.05)


def test_redis_down_then_back(version: tuple[Path, Path], redis_proc: RedisServer) -> None:
    with make_client(version, redis_proc.url) as client:
        warm_user(client)
        assert not timed_recall(client)[0]["degraded"]
        redis_proc.stop()
        for _ in range(10):  # enough to open the circuit breaker, too
            body, elapsed = timed_recall(client)
            assert body["degraded"] is True
            assert body["degraded_reason"] in {"redis_error", "redis_timeout", "redis_circuit_open"}
            assert len(body["items"]) == 5 and body["model_version"] == TINY_MODEL_VERSION
            assert elapsed < BUDGET_MS / 1000 + SLACK_S
        reasons = {timed_recall(client)[0]["degraded_reason"] for _ in range(3)}
        assert "redis_circuit_open" in reasons
        # Writes cannot be degraded: 503 with Retry-After, quickly.
        write = client.post("/events", json={"user_id": "u", "item_id": item_id(4)})
        assert write.status_code == 503 and write.headers["retry-after"] == "1"
        # Still ready (it answers, degraded), with Redis's state in the body.
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["redis"] == "down", ready.text
        assert client.get("/healthz").status_code == 200
        metrics = client.get("/metrics").text
        assert 't2diff_degraded_total{reason="redis_error"}' in metrics
        assert 't2diff_redis_errors_total{kind="ConnectionError",op="read"}' in metrics

        redis_proc.start()  # empty again (no persistence): the user comes back cold
        back = time.perf_counter()
        warm_user(client)
        wait_full_answer(client, within_s=2.0)
        assert time.perf_counter() - back < 2.0
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["redis"] == "up", ready.text


def redis_up_gauge(client: TestClient) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("t2diff_redis_up "):
            return float(line.split()[1])
    raise AssertionError("no t2diff_redis_up in /metrics")


def test_redis_killed_keeps_the_service_ready_and_answering(
    version: tuple[Path, Path], redis_proc: RedisServer
) -> None:
    """Readiness means "can answer": a Redis crash must not take the pod out of the load
    balancer, since /recall still answers (the popular items, degraded).  Redis's health is
    a field of /readyz's body and the t2diff_redis_up gauge."""
    with make_client(version, redis_proc.url) as client:
        warm_user(client)
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["redis"] == "up", ready.text
        assert redis_up_gauge(client) == 1.0
        redis_proc.kill()  # SIGKILL: gone at once, as in a crash
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        body = ready.json()
        assert body["status"] == "ready" and body["model_version"] == TINY_MODEL_VERSION
        assert body["redis"] == "down" and "cannot reach Redis" in body["redis_error"]
        assert "reasons" not in body
        assert redis_up_gauge(client) == 0.0
        recall, _ = timed_recall(client)
        assert recall["degraded"] is True and len(recall["items"]) == 5
        assert recall["degraded_reason"] in {"redis_error", "redis_timeout", "redis_circuit_open"}
        assert client.get("/readyz").status_code == 200  # still, after failed reads too
        redis_proc.start()
        deadline = time.monotonic() + 30  # a bound on waiting, not a timing claim
        while client.get("/readyz").json()["redis"] != "up":
            assert time.monotonic() < deadline, "Redis never reported up again"
            time.sleep(0.05)
        assert redis_up_gauge(client) == 1.0


def test_redis_paused_answers_within_budget(
    version: tuple[Path, Path], redis_proc: RedisServer
) -> None:
    # Production-like tight Redis timeouts; the budget bounds the stage anyway.
    with make_client(version, redis_proc.url, redis_timeout_ms=50) as client:
        warm_user(client)
        redis_proc.pause()  # TCP still accepts, Redis answers nothing
        try:
            for _ in range(4):
                body, elapsed = timed_recall(client)
                assert body["degraded"] is True
                assert body["degraded_reason"] in {
                    "redis_error",
                    "redis_timeout",
                    "redis_circuit_open",
                }
                assert elapsed < BUDGET_MS / 1000 + SLACK_S
        finally:
            redis_proc.resume()
        assert wait_full_answer(client, within_s=2.0) < 2.0


def test_redis_flapping_never_fails_a_request(
    version: tuple[Path, Path], redis_proc: RedisServer
) -> None:
    with make_client(version, redis_proc.url) as client:
        warm_user(client)
        stop = threading.Event()
        statuses: list[int] = []

        def hammer() -> None:
            while not stop.is_set():
                r = client.post("/recall", json={"user_id": "u", "k": 5})
                statuses.append(r.status_code)

        with ThreadPoolExecutor(max_workers=4) as pool:
            futures = [pool.submit(hammer) for _ in range(4)]
            for _ in range(3):
                time.sleep(0.2)
                redis_proc.stop()
                time.sleep(0.2)
                redis_proc.start()
            stop.set()
            for f in futures:
                f.result()
        assert statuses and set(statuses) == {200}
        warm_user(client)
        assert wait_full_answer(client, within_s=2.0) < 2.0


def test_slow_tower_is_abandoned_not_awaited(
    version: tuple[Path, Path], redis_proc: RedisServer
) -> None:
    with make_client(version, redis_proc.url) as client:
        warm_user(client)
        engine = client.app.state.service.engine
        real = engine.recall_batch
        release = threading.Event()

        def stuck(*args, **kwargs):  # a tower call that overruns any budget
            release.wait(10)
            return real(*args, **kwargs)

        engine.recall_batch = stuck
        try:
            body, elapsed = timed_recall(client, budget_ms=200)
            assert body["degraded"] is True and body["degraded_reason"] == "tower_timeout"
            assert item_id(3) not in [i["item_id"] for i in body["items"]]  # seen excluded
            assert elapsed < 0.2 + SLACK_S
        finally:
            release.set()
            engine.recall_batch = real
        assert wait_full_answer(client, within_s=5.0) < 5.0


def test_failing_tower_falls_back(version: tuple[Path, Path], redis_proc: RedisServer) -> None:
    with make_client(version, redis_proc.url) as client:
        warm_user(client)
        engine = client.app.state.service.engine

        def broken(*args, **kwargs):
            raise RuntimeError("ORT exploded")

        engine.recall_batch = broken
        body, _ = timed_recall(client)
        assert body["degraded"] is True and body["degraded_reason"] == "tower_error"
        del engine.recall_batch
        assert not timed_recall(client)[0]["degraded"]


def test_overload_is_shed_with_retry_after(
    version: tuple[Path, Path], redis_proc: RedisServer
) -> None:
    with make_client(version, redis_proc.url, max_in_flight=2, budget_ms=2000) as client:
        warm_user(client)
        engine = client.app.state.service.engine
        real = engine.recall_batch

        def slow(*args, **kwargs):
            time.sleep(0.3)
            return real(*args, **kwargs)

        engine.recall_batch = slow
        with ThreadPoolExecutor(max_workers=8) as pool:
            responses = list(
                pool.map(lambda _: client.post("/recall", json={"user_id": "u"}), range(8))
            )
        statuses = sorted(r.status_code for r in responses)
        assert set(statuses) <= {200, 503} and 200 in statuses and 503 in statuses
        shed = [r for r in responses if r.status_code == 503]
        assert all(r.headers["retry-after"] == "1" for r in shed)
        assert "t2diff_shed_total" in client.get("/metrics").text
